"""Hostile generated programs (issue 14) must stay inside the evaluation sandbox.

Each attack is the code a model could emit in front of a correct MBPP solution; it is scored
through ``tools/eval_code.py --evaluate_only`` (the CLI's own code path: samples.jsonl ->
post-processing -> run_programs -> bubblewrap), and the test checks from the outside that the
attack failed. Attacks only aim at 127.0.0.1, temporary paths, a throw-away ``sleep`` process and
canary files the test creates; the fork bomb is depth-bounded (at most ~340 processes even with
no limit at all) so that a broken sandbox cannot take the machine down with it.
"""
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from mindformers_ext.eval import execution
from mindformers_ext.eval.execution import (UNSAFE_FLAG, SandboxUnavailable, check_sandbox,
                                            run_program)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- attacks begin (also exec'd by a stand-alone script that replays them on older code)
SOLUTION = "def square(x):\n    return x * x\n"


def attack_read_secrets(secret_name, leak_paths):
    """Look for the evaluator's secret everywhere a process could find it; print it, write it
    to files outside, and report what was found."""
    return f"""
import glob, os, sys
found = {{}}
for p in ["/proc/%d/environ" % os.getppid()] + glob.glob("/proc/*/environ"):
    try:
        data = open(p, "rb").read()
    except Exception:
        continue
    if {secret_name.encode()!r} in data:
        found[p] = data.decode("latin-1")
if {secret_name!r} in os.environ:
    found["os.environ"] = os.environ[{secret_name!r}]
leak = repr(found)
print(leak)
print(leak, file=sys.stderr)
for target in {leak_paths!r}:
    try:
        with open(target, "w") as fh:
            fh.write(leak)
    except Exception:
        pass
raise RuntimeError("REPORT " + ("LEAKED " + leak if found else "nothing found"))
"""


def attack_write_outside(targets):
    """Create files outside the run's temporary directory, with every route Python offers."""
    return f"""
import importlib, os, posix
ok = []
for i, target in enumerate({targets!r}):
    try:
        if i % 2:
            fd = posix.open(target, posix.O_WRONLY | posix.O_CREAT, 0o644)
            posix.write(fd, b"written by a generated program")
            posix.close(fd)
        else:
            with open(target, "w") as fh:
                fh.write("written by a generated program")
        ok.append(target)
    except Exception as err:
        pass
raise RuntimeError("REPORT wrote %r" % ok)
"""


def attack_delete(paths, dirs):
    """Delete canaries outside the run's directory: reload(shutil), posix.unlink, ctypes, rm -rf."""
    return f"""
import ctypes, importlib, os, posix, shutil, subprocess
done = []
shutil = importlib.reload(shutil)
subprocess = importlib.reload(subprocess)
for d in {dirs!r}:
    for how in ("rmtree", "rm"):
        if not os.path.exists(d):  # (not there to delete: not a success)
            continue
        try:
            if how == "rmtree":
                shutil.rmtree(d)
            else:
                subprocess.run(["rm", "-rf", d], check=True, capture_output=True)
            if not os.path.exists(d):
                done.append((how, d))
        except Exception:
            pass
for p in {paths!r}:
    for how in ("posix.unlink", "ctypes.unlink", "posix_spawn rm"):
        if not os.path.exists(p):
            continue
        try:
            if how == "posix.unlink":
                posix.unlink(p)
            elif how == "ctypes.unlink":
                if ctypes.CDLL(None).unlink(p.encode()) != 0:
                    raise OSError("unlink failed")
            else:
                pid = os.posix_spawn("/bin/rm", ["rm", "-f", p], {{}})
                os.waitpid(pid, 0)
            if not os.path.exists(p):
                done.append((how, p))
        except Exception:
            pass
raise RuntimeError("REPORT deleted %r" % done)
"""


def attack_connect(port, abstract_name):
    """Connect to a TCP port on the host's 127.0.0.1 and to an abstract unix socket."""
    return f"""
import socket
got = []
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
    s.sendall(b"LEAK")
    s.close()
    got.append("tcp")
except Exception as err:
    got.append("tcp: %s" % type(err).__name__)
try:
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.settimeout(2)
    u.connect("\\0" + {abstract_name!r})
    u.sendall(b"LEAK")
    u.close()
    got.append("unix")
except Exception as err:
    got.append("unix: %s" % type(err).__name__)
raise RuntimeError("REPORT %r" % got)
"""


def attack_detached_child(token, host_file, delay_s):
    """Leave processes behind: posix_spawn(setsid=True) and a double fork + setsid, each
    writing ``host_file`` ``delay_s`` seconds later."""
    script = f"sleep {delay_s}; echo survived > {host_file}; sleep 30; :"
    return f"""
import importlib, os
os = importlib.reload(os)
os.posix_spawn("/bin/sh", ["sh", "-c", {script!r}, {token!r}], {{}}, setsid=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["sh", "-c", {script!r}, {token!r}])
    os._exit(0)
os.wait()
"""


def attack_kill(victim_pid):
    """Kill the evaluator (our parent) and another host process, through ctypes and through a
    reloaded ``os`` (the guard had set os.kill to None)."""
    return f"""
import ctypes, importlib, os, signal
tried = []
for name, fn in [
        ("ctypes ppid", lambda: ctypes.CDLL(None).kill(os.getppid(), 9)),
        ("ctypes victim", lambda: ctypes.CDLL(None).kill({victim_pid}, 9)),
        ("reload(os) ppid", lambda: importlib.reload(os).kill(os.getppid(), signal.SIGKILL)),
        ("reload(os) victim", lambda: importlib.reload(os).kill({victim_pid}, signal.SIGKILL)),
        ("reload(os) killpg", lambda: importlib.reload(os).killpg(
            importlib.reload(os).getpgid({victim_pid}), signal.SIGKILL))]:
    try:
        tried.append((name, fn()))
    except Exception as err:
        tried.append((name, type(err).__name__))
raise RuntimeError("REPORT %r" % tried)
"""


def attack_fork_bomb(token):
    """A fork bomb, depth-bounded so that it cannot exceed ~340 processes whatever happens;
    every process then parks in ``sh`` (named ``token``) and the original spins."""
    return f"""
import importlib, os
os = importlib.reload(os)
def bomb(depth):
    for _ in range(4):
        try:
            pid = os.fork()
        except OSError:
            continue
        if pid == 0:
            if depth < 3:
                bomb(depth + 1)
            try:
                os.execv("/bin/sh", ["sh", "-c", "sleep 60; :", {token!r}])
            finally:
                os._exit(0)
bomb(0)
while True:
    pass
"""


def attack_count_forks(limit):
    """Fork sleeping children until the kernel refuses (at most ``limit``); report the count."""
    return f"""
import importlib, os, time
os = importlib.reload(os)
n = 0
for _ in range({limit}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
raise RuntimeError("REPORT forked %d" % n)
"""


def attack_list_processes():
    """What processes can the program see?"""
    return """
import os
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
cmds = []
for p in pids:
    try:
        cmds.append(open("/proc/%d/cmdline" % p, "rb").read().split(b"\\0")[0].decode()[-20:])
    except Exception:
        cmds.append("?")
raise RuntimeError("REPORT %d processes %r" % (len(pids), cmds))
"""
# --- attacks end


MBPP_RECORD = {"task_id": 11, "text": "Write a python function to square a number.",
               "code": "def square(x):\r\n    return x * x", "test_setup_code": "",
               "test_list": ["assert square(3) == 9", "assert square(-2) == 4"],
               "challenge_test_list": []}


def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_code_cli_sandbox",
                                                  os.path.join(_REPO, "tools", "eval_code.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cli():
    check_sandbox()  # fails (names bwrap and --unsafe_no_sandbox) where there is no sandbox
    return _load_cli()


def evaluate(cli, tmp_path, hostile, timeout=5.0, extra=()):
    """Score one MBPP sample, ``hostile`` code in front of a correct solution, the way
    ``tools/eval_code.py --evaluate_only`` does. Returns (sample result, output dir, seconds)."""
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps(MBPP_RECORD) + "\n", encoding="utf-8")
    out = tmp_path / f"eval_{secrets.token_hex(4)}"
    out.mkdir()
    completion = f"Here you go:\n```python\n{hostile}\n{SOLUTION}```\nDone."
    (out / "samples.jsonl").write_text(json.dumps(
        {"task_id": 11, "sample_idx": 0, "completion": completion}) + "\n", encoding="utf-8")
    t0 = time.monotonic()
    summary = cli.main(["--task", "mbpp", "--mbpp_path", str(mbpp), "--evaluate_only",
                        "--output", str(out), "--timeout", str(timeout), "--workers", "1",
                        "--no_progress", *extra])
    elapsed = time.monotonic() - t0
    assert summary["n_samples"] == 1
    with open(out / "results.jsonl", encoding="utf-8") as fh:
        row = json.loads(fh.readline())
    return row["samples"][0], out, elapsed


def host_processes_with(token):
    """Host pids whose command line contains ``token`` (zombies have none: they are dead)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if token.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def wait_until_gone(token, seconds=3.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not host_processes_with(token):
            return []
        time.sleep(0.05)
    return host_processes_with(token)


def files_under(path):
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                yield os.path.join(root, name), fh.read()


# ---------------------------------------------------------------- attacks


def test_evaluator_secrets_are_not_readable(cli, tmp_path, monkeypatch, capsys):
    secret = "fake-" + secrets.token_hex(12)
    # in the evaluator's environment (what a child would inherit) ...
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # ... and in the /proc/PID/environ of a host process (putenv does not change this
    # process's own /proc/self/environ, so a stand-in evaluator holds it from its start)
    holder = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin",
                                                    "AWS_SECRET_ACCESS_KEY": secret},
                              start_new_session=True)
    deadline = time.time() + 10  # until the child has exec'd (before that its environ can read empty)
    while True:
        with open(f"/proc/{holder.pid}/environ", "rb") as fh:
            if secret.encode() in fh.read():
                break
        assert time.time() < deadline, "the stand-in process never showed the secret in its environ"
        time.sleep(0.01)
    token = secrets.token_hex(6)
    leak_paths = [str(tmp_path / "leak.txt"), f"/tmp/mfx_leak_{token}",
                  os.path.join(_REPO, f".mfx_leak_{token}")]
    try:
        res, out, _ = evaluate(cli, tmp_path, attack_read_secrets("AWS_SECRET_ACCESS_KEY",
                                                                  leak_paths))
        assert "REPORT nothing found" in res["error"], res  # it ran, and found nothing
        for path, data in files_under(out):
            assert secret.encode() not in data, path
        assert secret not in capsys.readouterr().out
        for path in leak_paths:
            assert not os.path.exists(path), path
    finally:
        holder.kill()
        holder.wait()
        for path in leak_paths[1:]:
            if os.path.exists(path):
                os.remove(path)


def test_no_writes_outside_the_private_tmpfs(cli, tmp_path):
    token = secrets.token_hex(6)
    targets = [os.path.join(_REPO, f".mfx_written_{token}"), f"/tmp/mfx_written_{token}",
               str(tmp_path / "written.txt"), os.path.join(_REPO, "tests", f".mfx_w_{token}"),
               f"/sandbox/fine_{token}", f"/tmp/fine_{token}"]
    try:
        res, _, _ = evaluate(cli, tmp_path, attack_write_outside(targets))
        assert res["error"].startswith("RuntimeError: REPORT wrote"), res
        # the project and the test's directory are not even visible; /tmp and /sandbox are
        # the sandbox's own tmpfs mounts: those writes worked there, and vanished with it
        assert f"/sandbox/fine_{token}" in res["error"] and f"/tmp/fine_{token}" in res["error"]
        for path in (targets[0], targets[2], targets[3]):
            assert path not in res["error"]
        for path in targets:
            assert not os.path.exists(path), path
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)


def test_files_outside_cannot_be_deleted(cli, tmp_path):
    token = secrets.token_hex(6)
    canary_dir = tmp_path / "canaries"
    (canary_dir / "sub").mkdir(parents=True)
    files = [canary_dir / "a.txt", canary_dir / "sub" / "b.txt", tmp_path / "c.txt",
             f"/tmp/mfx_canary_{token}.txt", os.path.join(_REPO, f".mfx_canary_{token}")]
    try:
        for path in files:
            with open(path, "w") as fh:
                fh.write("canary")
        res, _, _ = evaluate(cli, tmp_path, attack_delete([str(p) for p in files],
                                                          [str(canary_dir)]))
        assert res["error"] == "RuntimeError: REPORT deleted []", res
        for path in files:
            with open(path) as fh:
                assert fh.read() == "canary", path
    finally:
        for path in files[3:]:
            if os.path.exists(path):
                os.remove(path)


def test_no_connection_to_host_sockets(cli, tmp_path):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    name = f"mfx_sandbox_test_{secrets.token_hex(6)}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + name)
    unix.listen(8)
    unix.setblocking(False)
    try:
        res, _, _ = evaluate(cli, tmp_path, attack_connect(tcp.getsockname()[1], name))
        assert "REPORT ['tcp: ConnectionRefusedError', 'unix: ConnectionRefusedError']" in \
            res["error"], res
        for srv in (tcp, unix):
            with pytest.raises(BlockingIOError):
                srv.accept()
    finally:
        tcp.close()
        unix.close()


def test_detached_processes_die_with_the_run(cli, tmp_path):
    token = f"mfx_detached_{secrets.token_hex(6)}"
    host_file = tmp_path / "survived.txt"
    t0 = time.monotonic()
    res, _, _ = evaluate(cli, tmp_path, attack_detached_child(token, str(host_file), 3))
    assert res["status"] == "pass", res  # the attack itself ran without error
    assert wait_until_gone(token) == []
    time.sleep(max(0.0, t0 + 5.0 - time.monotonic()))  # past the 3 s the children waited
    assert not host_file.exists()
    assert host_processes_with(token) == []


def test_evaluator_survives_kill_attempts(cli, tmp_path):
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)  # its own group
    try:
        res, _, _ = evaluate(cli, tmp_path, attack_kill(victim.pid))
        assert "REPORT" in res["error"], res
        assert victim.poll() is None  # the host process is alive
        # ... and so is this evaluator (we are still here), able to score the next sample
        res, _, _ = evaluate(cli, tmp_path, "")
        assert res["status"] == "pass", res
    finally:
        victim.kill()
        victim.wait()


def test_fork_bomb_is_contained(cli, tmp_path):
    token = f"mfx_bomb_{secrets.token_hex(6)}"
    res, _, elapsed = evaluate(cli, tmp_path, attack_fork_bomb(token), timeout=3.0)
    assert res["status"] == "timeout", res
    assert elapsed < 3.0 + 10.0
    assert wait_until_gone(token) == []


def test_process_count_is_limited():
    res = run_program(attack_count_forks(100) + SOLUTION, timeout=10, max_processes=16)
    assert res.error.startswith("RuntimeError: REPORT forked"), res
    forked = int(res.error.rsplit(" ", 1)[1])
    assert 0 < forked < 16, res


def test_only_the_sandbox_processes_are_visible(cli, tmp_path):
    res, _, _ = evaluate(cli, tmp_path, attack_list_processes())
    count = int(res["error"].split("REPORT ", 1)[1].split()[0])
    assert count <= 3, res  # bwrap's init, the program (and nothing of the host)
    assert "pytest" not in res["error"]


# ---------------------------------------------------------------- limits

def test_limits_inside_the_sandbox():
    prog = ("import resource\n"
            "got = [resource.getrlimit(getattr(resource, n))[0] for n in "
            "('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_CORE')]\n"
            "assert got == [256 * 2**20, 3, 8, 2**20, 0], got\n")
    res = run_program(prog, timeout=2, memory_limit_mb=256, max_processes=8, max_output_mb=1,
                      guard=False)
    assert res.passed, res
    res = run_program("open('big', 'wb').write(b'x' * (3 * 2**20))", max_output_mb=1)
    assert res.status == "fail" and "File too large" in res.error, res  # EFBIG
    # many files, each under the size limit: the tmpfs is full at tmpfs_mb
    res = run_program("for i in range(40):\n    open('/tmp/f%d' % i, 'wb').write(b'x' * 2**20)",
                      max_output_mb=2, tmpfs_mb=8)
    assert res.status == "fail" and "No space left on device" in res.error, res
    res = run_program("import time\nt = time.time()\nwhile True:\n    pass", timeout=1)
    assert res.status == "timeout", res


def test_environment_inside_is_empty(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    res = run_program("import os\nraise RuntimeError(repr(sorted(os.environ.items())))")
    env = dict(eval(res.error.split("RuntimeError: ", 1)[1]))
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PWD": "/sandbox",
                   "LC_ALL": "C.UTF-8", "HOME": "/sandbox", "TMPDIR": "/tmp",
                   "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, env
    res = run_program("raise RuntimeError(open('/proc/1/environ', 'rb').read())")
    assert "hunter2" not in res.error


def test_only_interpreter_files_are_visible():
    # A virtualenv inside the project (CI's .ci-venv, a user's .venv) is bound read-only because the
    # interpreter lives there, so the project directory itself exists inside; nothing else of it may.
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix)}
    repo = os.path.realpath(_REPO)
    allowed = {os.path.relpath(p, repo).split(os.sep)[0] for p in prefixes if p.startswith(repo + os.sep)}
    prog = ("import os\n"
            "repo = %r\n"
            "listing = sorted(os.listdir(repo)) if os.path.isdir(repo) else []\n"
            "raise RuntimeError(repr((sorted(os.listdir('/')), listing, "
            "os.path.exists(os.path.join(repo, 'README.md')), "
            "os.path.exists('/sys'), os.path.exists('/run'), sorted(os.listdir('/tmp')))))"
            % _REPO)
    res = run_program(prog)
    top, listing, readme, sys_, run, tmp = eval(res.error.split("RuntimeError: ", 1)[1])
    assert set(listing) <= allowed and not readme, (listing, allowed)
    assert not sys_ and not run and tmp == []
    # the interpreter's own directories (wherever the checkout or venv lives: /check, /work, ...)
    interp_tops = {os.path.realpath(p).strip("/").split("/")[0]
                   for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                             os.path.dirname(sys.executable))}
    interp_tops |= {os.path.abspath(p).strip("/").split("/")[0]
                    for p in (sys.prefix, sys.exec_prefix, os.path.dirname(sys.executable))}
    assert set(top) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin",
                        "sandbox", "tmp", "usr"} | interp_tops, (top, interp_tops)
    res = run_program("open('/usr/mfx_x', 'w')")
    assert "Read-only file system" in res.error or "Permission denied" in res.error, res


# ---------------------------------------------------------------- fail closed

def test_missing_bwrap_fails_closed(tmp_path, monkeypatch):
    monkeypatch.delenv("MFX_BWRAP", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap \(bwrap\) is not installed") \
            as err:
        run_program("assert True")
    assert UNSAFE_FLAG in str(err.value) and "apt-get install bubblewrap" in str(err.value)
    monkeypatch.setenv("MFX_BWRAP", str(tmp_path / "no-such-bwrap"))
    with pytest.raises(SandboxUnavailable, match="MFX_BWRAP=.*no-such-bwrap is not an executable"):
        run_program("assert True")
    cli = _load_cli()
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps(MBPP_RECORD) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="--unsafe_no_sandbox"):
        cli.main(["--task", "mbpp", "--mbpp_path", str(mbpp), "--evaluate_only",
                  "--output", str(tmp_path / "out"), "--no_progress"])
    # the explicit flag runs without isolation, loudly
    out = tmp_path / "unsafe"
    out.mkdir()
    (out / "samples.jsonl").write_text(json.dumps(
        {"task_id": 11, "sample_idx": 0, "completion": f"```python\n{SOLUTION}```"}) + "\n")
    with pytest.warns(UserWarning, match="WITHOUT a sandbox"):
        summary = cli.main(["--task", "mbpp", "--mbpp_path", str(mbpp), "--evaluate_only",
                            "--output", str(out), "--no_progress", UNSAFE_FLAG])
    assert summary["pass@1"] == 1.0


def test_unusable_namespaces_fail_closed(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = --version ]; then echo 'bubblewrap 0.8.0'; exit 0; fi\n"
                    "echo 'bwrap: No permissions to creating new namespace, likely because the "
                    "kernel does not allow non-privileged user namespaces.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MFX_BWRAP", str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to creating new namespace") \
            as err:
        run_program("assert True")
    assert UNSAFE_FLAG in str(err.value)
    old = tmp_path / "old-bwrap"
    old.write_text("#!/bin/sh\necho 'bubblewrap 0.4.0'\n")
    old.chmod(0o755)
    monkeypatch.setenv("MFX_BWRAP", str(old))
    with pytest.raises(SandboxUnavailable, match=r"0\.4\.0, 0\.8\.0 or newer"):
        run_program("assert True")


def test_sandbox_start_failure_is_an_error_not_a_failed_sample(tmp_path, monkeypatch):
    """A sandbox that breaks after the start-up check raises instead of scoring the sample."""
    check_sandbox()
    real = execution._bwrap_path()
    flaky = tmp_path / "bwrap"
    flaky.write_text(f"#!/bin/sh\nif [ -e {tmp_path}/broken ]; then echo 'bwrap: boom' >&2; "
                     f"exit 1; fi\nexec {real} \"$@\"\n")
    flaky.chmod(0o755)
    monkeypatch.setenv("MFX_BWRAP", str(flaky))
    assert run_program("assert True").passed
    (tmp_path / "broken").write_text("")
    with pytest.raises(execution.SandboxError, match="bwrap: boom"):
        run_program("assert True")
    # a program cannot fake that: exiting 1 with bwrap's words is an ordinary failure
    (tmp_path / "broken").unlink()
    res = run_program("import os, sys\nprint('bwrap: boom', file=sys.stderr)\n"
                      "sys.stderr.flush()\nos._exit(1)")
    assert res.status == "fail" and res.error == "bwrap: boom"


def test_signal_exit_of_sandboxed_program_is_reported():
    res = run_program("import ctypes, os\nctypes.CDLL(None).kill(os.getpid(), 11)")
    assert res.status == "fail" and "SIGSEGV" in res.error, res


def test_sandbox_dies_with_the_evaluator(tmp_path):
    """An evaluator killed by SIGKILL (no clean-up code runs) takes its sandboxes with it."""
    token = f"mfx_orphan_{secrets.token_hex(6)}"
    hostile = attack_detached_child(token, str(tmp_path / "survived.txt"), 30) + \
        "import time\ntime.sleep(60)\n"
    script = tmp_path / "evaluator.py"
    script.write_text(
        "import importlib.util, os, sys, threading, time\n"
        f"spec = importlib.util.spec_from_file_location('ex', {execution.__file__!r})\n"
        "ex = importlib.util.module_from_spec(spec)\n"
        "sys.modules['ex'] = ex\n"
        "spec.loader.exec_module(ex)\n"
        f"threading.Thread(target=ex.run_programs, args=([(0, {hostile!r})],),\n"
        "                 kwargs=dict(workers=1, timeout=60, progress=False)).start()\n"
        "time.sleep(60)\n")
    evaluator = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not host_processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_processes_with(token), "the detached children never started"
        evaluator.kill()
        evaluator.wait()
        assert wait_until_gone(token) == []
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
            evaluator.wait()
        for pid in host_processes_with(token):
            os.kill(pid, 9)
