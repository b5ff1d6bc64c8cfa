"""Issue 17, distributed: msrun jobs that load checkpoints run on CPU, and the launcher reports failures.

* ``tools/msrun_launcher.sh`` waits for the workers in every argument form (msrun ``--join=True``) and
  exits non-zero with the failing worker's last error lines when one fails (before: the 1- and
  2-argument forms returned 0 while every worker died);
* a 2-worker data-parallel finetune with ``--load_checkpoint`` (and the seeds' ``--auto_trans_ckpt True``
  on a full checkpoint) runs on CPU (before: "Unsupported op [Barrier] on CPU") and ends with the
  weights of one process on the same global batch; resuming it under msrun works too;
* the WizardCoder YAML (semi-auto, pipeline_stage 2) falls back to data parallel under msrun on CPU.
"""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_msrun import _launch, free_port
from test_run_mindformer import FINETUNE_TINY, REPO, RUN, _env, _latest_ckpt, write_tiny_mindrecord

STEP = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*\d+\], loss:\[([0-9.]+)/")
FORMS = {  # argument form -> the launcher's arguments after the command (LOG_DIR filled in per test)
    "1": lambda port, log: [],
    "2": lambda port, log: ["2"],
    "6": lambda port, log: ["2", str(port), log, "False", "120"],
    "9": lambda port, log: ["2", "2", "127.0.0.1", str(port), "0", log, "True", "120"],
}


# ------------------------------------------------------------------------------ launcher exit status
FAKE_MSRUN = r"""#!/bin/bash
# msrun stand-in: records its arguments, writes worker logs, and fails like msrun --join=True does
# when worker 1 raised.
log_dir=output/msrun_log; workers=8
for a in "$@"; do
  case $a in
    --log_dir=*) log_dir=${a#--log_dir=} ;;
    --local_worker_num=*) workers=${a#--local_worker_num=} ;;
  esac
done
mkdir -p "$log_dir"
echo "$@" > "$log_dir/args.txt"
for ((r = 0; r < workers; r++)); do
  printf '[INFO] ME(1): starting\nworker %d\n' "$r" > "$log_dir/worker_$r.log"
done
if [ "$FAKE_FAIL" = 1 ]; then
  printf 'Traceback (most recent call last):\n  File "train.py", line 3, in <module>\nRuntimeError: \n----\nUnsupported op [Barrier] on CPU\n[INFO] DISTRIBUTED(1): noise\n' >> "$log_dir/worker_1.log"
  echo "RuntimeError: Distributed job exited with exception." >&2
  exit 1
fi
"""


@pytest.fixture()
def fake_msrun(tmp_path):
    path = tmp_path / "fake_msrun"
    path.write_text(FAKE_MSRUN)
    path.chmod(0o755)
    env = _env()
    env["MSRUN"] = str(path)
    return env


@pytest.mark.parametrize("form", sorted(FORMS))
def test_launcher_fails_when_a_worker_fails_in_every_form(form, fake_msrun, tmp_path):
    """Every argument form waits (--join=True) and turns a failed worker into a non-zero exit status with
    that worker's error lines on stderr."""
    log = str(tmp_path / "logs")
    args = FORMS[form](free_port(), log)
    log_dir = log if form in ("6", "9") else str(tmp_path / "output" / "msrun_log")
    result = _launch("train.py --x 1", *args, env=dict(fake_msrun, FAKE_FAIL="1"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--join=True" in open(os.path.join(log_dir, "args.txt")).read()
    assert "the job failed (msrun exit status 1)" in result.stderr
    assert f"{os.path.relpath(log_dir, tmp_path) if form in ('1', '2') else log_dir}/worker_1.log: last error" \
        in result.stderr
    assert "Unsupported op [Barrier] on CPU" in result.stderr and "noise" not in result.stderr
    assert "worker_0.log: last error" not in result.stderr
    ok = _launch("train.py --x 1", *args, env=fake_msrun, cwd=tmp_path)
    assert ok.returncode == 0 and "finished successfully" in ok.stdout, ok.stdout + ok.stderr


BOOM = """import os, sys
if os.environ.get("MS_ROLE") == "MS_SCHED":
    sys.exit(0)
rank = int(os.environ.get("RANK_ID", "0"))
if rank == int(sys.argv[1]):
    raise ValueError(f"boom from rank {rank}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
def test_launcher_with_real_msrun(form, tmp_path):
    """The same with MindSpore's msrun and a script whose last worker raises (1-argument form: 8 workers)."""
    (tmp_path / "boom.py").write_text(BOOM)
    args = FORMS[form](free_port(), str(tmp_path / "logs"))
    last = 7 if form == "1" else 1
    result = _launch(f"boom.py {last}", *args, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"worker_{last}.log: last error" in result.stderr and f"ValueError: boom from rank {last}" in result.stderr
    ok = _launch("boom.py 99", *FORMS[form](free_port(), str(tmp_path / "logs")), cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr


# ------------------------------------------------------------------------------ finetune with --load_checkpoint
SEQ, SAMPLES, STEPS = 16, 16, 4
COMMON = ["--config", FINETUNE_TINY, "--run_mode", "finetune", "--epochs", "1",
          "--model.model_config.vocab_size", "512", "--model.model_config.seq_length", str(SEQ),
          "--lr_schedule.learning_rate", "1e-4", "--callbacks.1.save_checkpoint_steps", "4"]
TOLERANCE = 1e-6  # as tests/test_dp_equivalence.py: float summation order only


def _weights(ckpt):
    return {n: p.asnumpy() for n, p in ckpt.items() if n.startswith(("model.", "lm_head"))}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """16 samples and an initial checkpoint far from the YAML's seeded random init (weights ~N(0, 0.05))."""
    import mindspore as ms
    from mindformers.tools.register import MindFormerConfig
    from research.deepseek1_5.deepseek1_5 import DeepSeekCoderForCausalLM
    from research.deepseek1_5.deepseek1_5_config import DeepSeekCoderConfig

    root = tmp_path_factory.mktemp("msrun_ckpt")
    data = write_tiny_mindrecord(root / "train.mindrecord", samples=SAMPLES, seq_length=SEQ, seed=5)
    config = dict(MindFormerConfig(FINETUNE_TINY).model.model_config)
    config.pop("type")
    config.update(vocab_size=512, seq_length=SEQ)
    model = DeepSeekCoderForCausalLM(DeepSeekCoderConfig(**config))
    rng = np.random.default_rng(11)
    init = {}
    for p in model.get_parameters():
        value = (1.0 + 0.1 * rng.standard_normal(p.shape)) if "norm" in p.name else 0.05 * rng.standard_normal(p.shape)
        init[p.name] = value.astype(np.float32)
        p.set_data(ms.Tensor(init[p.name]))
    path = str(root / "init.ckpt")
    ms.save_checkpoint(model, path)
    return {"root": root, "data": data, "ckpt": path, "init": init}


@pytest.fixture(scope="module")
def single_process(start):
    """One process, batch 4, --load_checkpoint init.ckpt."""
    out = start["root"] / "single"
    result = subprocess.run([sys.executable, RUN, *COMMON, "--train_data", start["data"], "--output_dir", str(out),
                             "--runner_config.batch_size", "4", "--load_checkpoint", start["ckpt"]],
                            cwd=start["root"], env=_env(), capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"loaded 21 weights from {start['ckpt']}" in log
    return _latest_ckpt(str(out)), log


@pytest.mark.slow
def test_two_worker_finetune_with_load_checkpoint_equals_one_process(start, single_process, tmp_path):
    """msrun, 2 CPU workers of batch 2 (global batch 4), the seeds' --load_checkpoint FILE --auto_trans_ckpt
    True: each rank loads the full checkpoint (one info line: nothing to transform), and both end with the
    single-process weights (max abs difference <= 1e-6)."""
    out = tmp_path / "out"
    cmd = (f"{RUN} {' '.join(COMMON)} --use_parallel True --train_data {start['data']} --output_dir {out} "
           f"--runner_config.batch_size 2 --load_checkpoint {start['ckpt']} --auto_trans_ckpt True")
    result = _launch(cmd, "2", str(free_port()), str(tmp_path / "msrun_log"), "True", "300", cwd=str(tmp_path))
    logs = {r: (tmp_path / "msrun_log" / f"worker_{r}.log").read_text(errors="replace") for r in (0, 1)}
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + logs[0][-3000:]
    reference, _ = single_process
    for rank, log in logs.items():
        assert log.count("auto_trans_ckpt: nothing to transform") == 1, rank
        assert f"loaded 21 weights from {start['ckpt']}" in log, rank
        assert [int(m.group(2)) for m in STEP.finditer(log)] == list(range(1, STEPS + 1)), rank
        final = _latest_ckpt(str(out), rank)
        assert int(final["step_num"].asnumpy()) == STEPS
        got, want = _weights(final), _weights(reference)
        assert sorted(got) == sorted(want)
        worst = max(float(np.abs(got[n] - want[n]).max()) for n in want)
        print(f"rank {rank}: max abs weight difference to one process {worst:.3e}")
        assert worst <= TOLERANCE
        # the run started from init.ckpt (4 Adam steps of lr 1e-4 move a weight by < 1e-3), not from the
        # YAML's random init (N(0, 0.02) there, 0.05 here)
        assert max(float(np.abs(got[n] - start["init"][n]).max()) for n in got) < 1e-3


@pytest.mark.slow
def test_resume_under_msrun_on_cpu(start, tmp_path):
    """--resume_training under msrun (MindFormers' own resume path, with its barriers) runs on CPU: the
    second epoch continues at step 5 of 8 from each rank's checkpoint."""
    out = tmp_path / "out"
    base = (f"{RUN} {' '.join(COMMON)} --use_parallel True --train_data {start['data']} --output_dir {out} "
            f"--runner_config.batch_size 2")
    first = _launch(f"{base} --load_checkpoint {start['ckpt']}", "2", str(free_port()), str(tmp_path / "log1"),
                    "False", "300", cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _launch(f"{base.replace('--epochs 1', '--epochs 2')} --load_checkpoint {out / 'checkpoint'} "
                      "--resume_training True", "2", str(free_port()), str(tmp_path / "log2"), "False", "300",
                      cwd=str(tmp_path))
    log = (tmp_path / "log2" / "worker_1.log").read_text(errors="replace")
    assert resumed.returncode == 0, resumed.stderr[-3000:] + log[-3000:]
    assert "Barrier" not in log
    assert [(int(m.group(1)), int(m.group(2))) for m in STEP.finditer(log)] == [(2, s) for s in range(1, STEPS + 1)]
    assert int(_latest_ckpt(str(out), 1)["step_num"].asnumpy()) == 2 * STEPS


# ------------------------------------------------------------------------------ CPU fallback under msrun
WIZARD_YAML = os.path.join(REPO, "research", "wizardcoder", "run_wizardcoder.yaml")
WIZARD_TINY = ("--model.model_config.vocab_size 49153 --model.model_config.hidden_size 64 "
               "--model.model_config.num_layers 2 --model.model_config.num_heads 4 "
               "--model.model_config.intermediate_size 96 --model.model_config.n_position 64 "
               "--model.model_config.seq_length 16 --model.model_config.compute_dtype float32 "
               "--model.model_config.param_init_type float32 --runner_config.batch_size 1 "
               "--runner_config.sink_mode False --callbacks.1.save_checkpoint_steps 4 --epochs 1")


@pytest.mark.slow
def test_wizardcoder_yaml_falls_back_to_data_parallel_under_msrun(tmp_path):
    """run_wizardcoder.yaml (semi-auto, model_parallel 4, pipeline_stage 2, num_parallel_workers 8) on 2 CPU
    workers: data parallel with every split at 1 (before: "Select CPU operator[AllReduce] fail")."""
    data = write_tiny_mindrecord(tmp_path / "train.mindrecord", samples=8, seq_length=16, seed=2)
    cmd = (f"{os.path.join(REPO, 'research', 'wizardcoder', 'run_wizardcoder.py')} --config {WIZARD_YAML} "
           f"--run_mode finetune --use_parallel True --train_data {data} --output_dir {tmp_path / 'out'} {WIZARD_TINY}")
    result = _launch(cmd, "2", str(free_port()), str(tmp_path / "msrun_log"), "False", "300", cwd=str(tmp_path))
    log = (tmp_path / "msrun_log" / "worker_0.log").read_text(errors="replace")
    assert result.returncode == 0, result.stderr[-3000:] + log[-3000:]
    assert "parallel_config.pipeline_stage 2 -> 1" in log and "parallel_config.model_parallel 4 -> 1" in log
    assert len(STEP.findall(log)) == 4  # 8 samples / 2 ranks / batch 1
    assert glob.glob(str(tmp_path / "out" / "checkpoint" / "rank_1" / "*.ckpt"))
