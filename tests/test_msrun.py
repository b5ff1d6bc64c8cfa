"""tools/msrun_launcher.sh: MindFormers' argument forms, clear errors, and a real 2-worker data-parallel finetune."""
import contextlib
import glob
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import msrun_lock
from test_run_mindformer import FINETUNE_TINY, LOSS, REPO, _env, _latest_ckpt, write_tiny_mindrecord

LAUNCHER = os.path.join(REPO, "tools", "msrun_launcher.sh")


def free_port():
    """A TCP port that is free now (the OS picks it), for msrun's master_port: parallel test runs
    cannot collide on a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*args, env=None, cwd=None, timeout=600):
    """The launcher; a real msrun job (no fake ``MSRUN`` in ``env``) holds :func:`conftest.msrun_lock`."""
    env = env or _env()
    with contextlib.nullcontext() if "MSRUN" in env else msrun_lock():
        return subprocess.run(["bash", LAUNCHER, *args], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture()
def fake_msrun(tmp_path):
    """An msrun stand-in that prints the arguments it receives, one per line."""
    path = tmp_path / "fake_msrun"
    path.write_text("#!/bin/bash\nfor a in \"$@\"; do echo \"ARG $a\"; done\n")
    path.chmod(0o755)
    env = _env()
    env["MSRUN"] = str(path)
    return env


def _args(result, cwd=None, log_dir="output/msrun_log", succeeded=True):
    """msrun's arguments as the fake printed them: on the console with JOIN True, in
    LOG_DIR/msrun_console.log with JOIN False (the launcher always waits: msrun --join=True); the launch
    must have succeeded unless ``succeeded`` is False."""
    if succeeded:
        assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    console = os.path.join(cwd or ".", log_dir, "msrun_console.log")
    if os.path.exists(console):
        with open(console, encoding="utf-8") as f:
            text += f.read()
    return [line[4:] for line in text.splitlines() if line.startswith("ARG ")]


def test_argument_forms_and_defaults(fake_msrun, tmp_path):
    cmd = "tools/run_mindformer.py --config 'a b.yaml' --run_mode finetune"
    tail = ["tools/run_mindformer.py", "--config", "a b.yaml", "--run_mode", "finetune"]
    one = _launch(cmd, env=fake_msrun, cwd=tmp_path)
    assert "default 8 local workers" in one.stdout
    assert _args(one, tmp_path) == ["--worker_num=8", "--local_worker_num=8", "--master_port=8118",
                                    "--log_dir=output/msrun_log", "--join=True", "--cluster_time_out=7200", *tail]
    assert _args(_launch(cmd, "2", env=fake_msrun, cwd=tmp_path), tmp_path)[:2] == ["--worker_num=2",
                                                                                     "--local_worker_num=2"]
    assert _args(_launch(cmd, "4", "9000", "logs/x", "True", "300", env=fake_msrun, cwd=tmp_path), tmp_path,
                 "logs/x") == ["--worker_num=4", "--local_worker_num=4", "--master_port=9000", "--log_dir=logs/x",
                               "--join=True", "--cluster_time_out=300", *tail]
    # the seed README's 9-argument single-node form, then a real two-node one
    assert _args(_launch(cmd, "8", "8", "127.0.0.1", "9543", "0", "output/msrun_log", "False", "3000",
                         env=fake_msrun, cwd=tmp_path), tmp_path)[:3] == ["--worker_num=8", "--local_worker_num=8",
                                                                          "--master_port=9543"]
    assert _args(_launch(cmd, "16", "8", "10.0.0.1", "9543", "1", "log", "False", "3000", env=fake_msrun, cwd=tmp_path),
                 tmp_path, "log") == [
        "--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=9543", "--node_rank=1",
        "--log_dir=log", "--join=True", "--cluster_time_out=3000", *tail]


def test_upstream_spelling_runs_our_run_mindformer(fake_msrun, tmp_path):
    """Upstream's `bash scripts/msrun_launcher.sh "run_mindformer.py ..." 2` from the repository root."""
    shim = os.path.join(REPO, "scripts", "msrun_launcher.sh")
    run = subprocess.run(["bash", shim, "run_mindformer.py --config x.yaml", "2"], env=fake_msrun, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert "this project's is tools/run_mindformer.py" in run.stdout
    assert _args(run, tmp_path)[-3:] == [os.path.join(REPO, "tools", "run_mindformer.py"), "--config", "x.yaml"]


def test_wrong_arguments_and_missing_msrun(fake_msrun, tmp_path):
    bad = _launch("x.py", "2", "3", env=fake_msrun)
    assert bad.returncode == 1 and "expected 1, 2, 6 or 9 arguments, got 3" in bad.stderr and "Usage" in bad.stderr
    bad = _launch("x.py", "two", env=fake_msrun)
    assert bad.returncode == 1 and "WORKER_NUM must be a positive integer, got 'two'" in bad.stderr
    bad = _launch("x.py", "2", "8118", "log", "maybe", "10", env=fake_msrun)
    assert bad.returncode == 1 and "JOIN must be True or False" in bad.stderr
    env = dict(fake_msrun, MSRUN="msrun-not-installed", PATH="/usr/bin:/bin")
    missing = _launch("x.py", "2", env=env)
    assert missing.returncode == 1 and "msrun not found" in missing.stderr


def test_a_master_port_in_use_is_refused_before_msrun_starts(fake_msrun, tmp_path):
    """A port something listens on where this node would start the scheduler (127.0.0.1 for a
    single-node job, MASTER_ADDR when it is this host's) is refused with a message naming it, and msrun
    never runs; a multi-node job whose MASTER_ADDR is another host's does not check (its scheduler runs
    there)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args in (["2", port, "log", "False", "10"], ["2", "2", "127.0.0.1", port, "0", "log", "False", "10"],
                     ["4", "2", "127.0.0.1", port, "0", "log", "False", "10"]):
            bad = _launch("x.py", *args, env=fake_msrun, cwd=tmp_path)
            assert bad.returncode == 1, bad.stdout + bad.stderr
            assert f"MASTER_PORT {port} is in use on 127.0.0.1" in bad.stderr
            assert _args(bad, tmp_path, "log", succeeded=False) == [], "msrun ran although the port is taken"
        remote = _launch("x.py", "4", "2", "192.0.2.1", port, "1", "log", "False", "10", env=fake_msrun, cwd=tmp_path)
        assert f"--master_port={port}" in _args(remote, tmp_path, "log")
    free = _launch("x.py", "2", port, "log", "False", "10", env=fake_msrun, cwd=tmp_path)
    assert f"--master_port={port}" in _args(free, tmp_path, "log")


@pytest.mark.slow
def test_data_parallel_finetune_two_workers(tmp_path):
    """2 local CPU workers, each on its own half of the data: the gradients are all-reduced for real,
    so both ranks end with identical weights although their losses differ."""
    data = write_tiny_mindrecord(tmp_path / "train.mindrecord", samples=16, seq_length=16, seed=5)
    out = tmp_path / "out"
    cmd = (f"{os.path.join(REPO, 'tools', 'run_mindformer.py')} --config {FINETUNE_TINY} --run_mode finetune "
           f"--use_parallel True --train_data {data} --output_dir {out} --epochs 1 "
           "--model.model_config.vocab_size 512 --model.model_config.seq_length 16 --callbacks.1.save_checkpoint_steps 4")
    result = _launch(cmd, "2", str(free_port()), str(tmp_path / "msrun_log"), "True", "300", cwd=str(tmp_path))
    logs = {rank: (tmp_path / "msrun_log" / f"worker_{rank}.log").read_text(errors="replace") for rank in (0, 1)}
    assert result.returncode == 0, result.stdout[-2000:] + "\n".join(v[-3000:] for v in logs.values())
    losses = {rank: [float(m.group(5)) for m in LOSS.finditer(text)] for rank, text in logs.items()}
    assert len(losses[0]) == len(losses[1]) == 4  # 16 samples / 2 ranks / batch 2
    assert losses[0][0] != losses[1][0]  # different data on each rank
    ckpt0, ckpt1 = _latest_ckpt(str(out), 0), _latest_ckpt(str(out), 1)
    assert int(ckpt0["step_num"].asnumpy()) == 4
    weights = [n for n in ckpt0 if n.startswith(("model.", "lm_head"))]
    assert weights
    for name in weights:
        np.testing.assert_array_equal(ckpt0[name].asnumpy(), ckpt1[name].asnumpy(), err_msg=name)
