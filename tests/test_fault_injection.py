"""Issue 14, part 7: a finetune killed with SIGKILL at random steps, three times, and resumed each time
ends with the weights and Adam moments of an uninterrupted run, in files of the same names.

The tiny DeepSeek-Coder finetune of ``test_run_mindformer.py`` (512-entry vocabulary, 40 records,
2 epochs of 20 steps, a checkpoint every 3 steps, ``keep_checkpoint_max: 3``). The kill comes when the
run's loss line reaches the chosen step (the run may be a step or two further by then). After the
second kill the newest checkpoint is truncated, as a torn write would leave it: the next resume must
skip it, say so, and go back to the one before.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from test_run_mindformer import FINETUNE_TINY, LOSS, RUN, _env, write_tiny_mindrecord

STEPS_PER_EPOCH = 20
ARGS = ("--config", FINETUNE_TINY, "--run_mode", "finetune", "--model.model_config.vocab_size", "512",
        "--callbacks.1.save_checkpoint_steps", "3", "--callbacks.1.keep_checkpoint_max", "3", "--epochs", "2")


def _run(out, data, resume, kill_at=None):
    """Run the finetune into ``out``; with ``kill_at``, SIGKILL it once its loss line reaches that step.
    Returns the output."""
    argv = [sys.executable, RUN, *ARGS, "--train_data", data, "--output_dir", str(out)]
    if resume:
        argv += ["--resume_training", "True"]
    env = dict(_env(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, cwd=str(out.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            match = LOSS.search(line)
            if kill_at is not None and match and \
                    (int(match.group(1)) - 1) * STEPS_PER_EPOCH + int(match.group(3)) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    output = "".join(lines)
    assert proc.returncode == (-signal.SIGKILL if kill_at is not None else 0), output[-4000:]
    return output


def _checkpoints(out):
    return {os.path.basename(f): f for f in glob.glob(os.path.join(out, "checkpoint", "rank_0", "*.ckpt"))}


@pytest.mark.slow
def test_finetune_killed_three_times_matches_an_uninterrupted_run(tmp_path):
    import mindspore as ms

    data = write_tiny_mindrecord(tmp_path / "train.mindrecord", samples=40, seq_length=32)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight, data, resume=False)

    rng = random.Random(14)
    kills = [rng.randint(5, 12), rng.randint(17, 24), rng.randint(28, 35)]
    truncated = None
    for i, step in enumerate(kills + [None]):
        output = _run(killed, data, resume=i > 0, kill_at=step)
        if i > 0:
            assert "resume_training: resuming from" in output
        if i == 2:  # the resume after the torn write skipped it, naming it
            assert f"skipped {truncated}, which does not load" in output and "truncated" in output
        if i == 1:  # a torn write of the newest checkpoint
            truncated = max(_checkpoints(killed).values(), key=os.path.getmtime)
            os.chmod(truncated, 0o600)
            with open(truncated, "r+b") as f:
                f.truncate(os.path.getsize(truncated) // 2)

    names = sorted(_checkpoints(straight))
    assert names == ["deepseek_coder_tiny_rank_0-2_36.ckpt", "deepseek_coder_tiny_rank_0-2_39.ckpt",
                     "deepseek_coder_tiny_rank_0-2_40.ckpt"]
    assert sorted(_checkpoints(killed)) == names
    for out in (straight, killed):
        meta = json.loads((out / "checkpoint" / "rank_0" / "meta.json").read_text())
        assert meta == {"last_epoch": 2, "last_step": 40, "last_ckpt_file": "deepseek_coder_tiny_rank_0-2_40.ckpt"}
    for name in names:
        reference = ms.load_checkpoint(_checkpoints(straight)[name])
        resumed = ms.load_checkpoint(_checkpoints(killed)[name])
        step = int(name[:-5].rsplit("_", 1)[1])
        assert int(resumed["step_num"].asnumpy()) == step and int(resumed["global_step"].asnumpy()[0]) == step
        compared = [n for n in reference if n.startswith(("model.", "lm_head", "adam_m.", "adam_v."))]
        assert len(compared) > 60 and sorted(compared) == sorted(n for n in resumed if n in compared)
        for key in compared:
            np.testing.assert_allclose(resumed[key].asnumpy(), reference[key].asnumpy(), rtol=0, atol=1e-6,
                                       err_msg=f"{name}: {key}")
