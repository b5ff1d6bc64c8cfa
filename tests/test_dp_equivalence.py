"""Data parallel and gradient accumulation are the same computation as one process on the whole batch.

Through the real finetune path (``tools/run_mindformer.py`` -> MindFormers' Trainer ->
``PortableTrainOneStepCell`` + ``PortableAdamW``) on the tiny DeepSeek-Coder YAML, 16 samples,
4 optimizer steps of 4 samples each:

* reference: one process, batch 4;
* gradient accumulation: one process, 2 micro-batches of 2 per step (default suite);
* data parallel: ``msrun`` with 2 workers of batch 2 (global batch 4), and 2 workers x 2 micro-batches
  of 1 (slow).

All must end with the same weights (max abs <= 1e-6), the same Adam moments, the same per-step loss
(the reference loss is the mean of the ranks' / micro-batches' losses) and the same pre-clipping
global gradient norm (which catches gradients summed instead of averaged: Adam itself is nearly
scale invariant and clipping is active here).

Why the samples line up: ``shuffle: False``, and MindDataset's sharding is interleaved (rank r of 2 reads
samples r, r + 2, r + 4, ...), so at step t rank 0 reads samples 4t, 4t + 2 and rank 1 4t + 1, 4t + 3:
the reference's batch t (4t .. 4t + 3). Every sample has the same number of scored tokens (the first
labels are masked alike), so the mean over the batch equals the mean of the per-rank / per-micro-batch
means; with unequal token counts the two differ (MindFormers averages per-rank means, as PyTorch DDP
does).

Why learning rate 1e-4: the runs differ only in float summation order (2 partial sums instead of one,
1 thread per worker instead of 2), and Adam divides each update by sqrt(v), which amplifies the
rounding of gradient elements that are small by cancellation. At the YAML's 3e-3 the reference run
against itself with the samples of each batch reversed (the same maths) already differs by 6e-6, data
parallel by 3e-6; the difference scales with the learning rate. At 1e-4 one step still moves the
weights by about 1e-4 (checked below), a hundred times the tolerance.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_msrun import _launch, free_port
from test_run_mindformer import FINETUNE_TINY, REPO, _env, _latest_ckpt, _run, write_tiny_mindrecord

STEP = re.compile(r"step:\[\s*(\d+)/\s*\d+\], loss:\[([0-9.]+)/[^\n]*?global_norm: ([0-9.eE+-]+)")
SAMPLES, SEQ, STEPS, GLOBAL_BATCH = 16, 16, 4, 4
COMMON = ("--config", FINETUNE_TINY, "--run_mode", "finetune", "--epochs", "1",
          "--model.model_config.vocab_size", "512", "--model.model_config.seq_length", str(SEQ),
          "--lr_schedule.learning_rate", "1e-4", "--callbacks.1.save_checkpoint_steps", "1")
TOLERANCE = 1e-6


def _steps(text):
    """{step: (loss, global_norm)} from MFLossMonitor's lines."""
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in STEP.finditer(text)}


def _weights(ckpt):
    return {n: p.asnumpy() for n, p in ckpt.items() if n.startswith(("model.", "lm_head"))}


def _compare_checkpoints(expected, actual):
    """Max abs weight difference; Adam moments and counters must agree as well."""
    assert set(expected) == set(actual)
    for name in ("global_step", "step_num", "epoch_num", "scale_sense"):
        np.testing.assert_array_equal(expected[name].asnumpy(), actual[name].asnumpy(), err_msg=name)
    for name in expected:
        if name.startswith(("adam_m.", "adam_v.")):
            want, got = expected[name].asnumpy(), actual[name].asnumpy()
            # relative to the tensor's largest entry (small entries are cancellations; measured ~2e-6)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    want, got = _weights(expected), _weights(actual)
    assert want
    return max(float(np.abs(want[n] - got[n]).max()) for n in want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4: per-step (loss, global norm), the last checkpoint, and the largest weight
    change of the last step."""
    root = tmp_path_factory.mktemp("dp_reference")
    data = write_tiny_mindrecord(root / "train.mindrecord", samples=SAMPLES, seq_length=SEQ, seed=5)
    out = root / "out"
    log = _run(*COMMON, "--train_data", data, "--output_dir", str(out), "--runner_config.batch_size",
               str(GLOBAL_BATCH), cwd=root)
    steps = _steps(log)
    assert sorted(steps) == list(range(1, STEPS + 1)), log[-3000:]
    final = _latest_ckpt(str(out))
    assert int(final["step_num"].asnumpy()) == STEPS
    previous = [f for f in os.listdir(out / "checkpoint" / "rank_0") if f.endswith(f"-1_{STEPS - 1}.ckpt")]
    assert previous, os.listdir(out / "checkpoint" / "rank_0")
    import mindspore as ms

    before = _weights(ms.load_checkpoint(str(out / "checkpoint" / "rank_0" / previous[0])))
    moved = max(float(np.abs(w - before[n]).max()) for n, w in _weights(final).items())
    return {"data": data, "steps": steps, "ckpt": final, "last_step_change": moved}


def _check_steps(reference_steps, steps, what):
    assert sorted(steps) == sorted(reference_steps), what
    for step, (loss, norm) in reference_steps.items():
        assert abs(steps[step][0] - loss) <= 2e-6, (what, step, steps[step][0], loss)
        assert abs(steps[step][1] - norm) <= 1e-5 * norm, (what, step, steps[step][1], norm)


def test_gradient_accumulation_equals_one_step_on_the_whole_batch(reference, tmp_path):
    """2 micro-batches of 2 per optimizer step == one step on the batch of 4."""
    out = tmp_path / "out"
    log = _run(*COMMON, "--train_data", reference["data"], "--output_dir", str(out),
               "--runner_config.batch_size", "2", "--gradient_accumulation_steps", "2", cwd=tmp_path)
    assert "gradient accumulation over 2 micro-batches of 2" in log
    _check_steps(reference["steps"], _steps(log), "gradient accumulation")
    assert reference["last_step_change"] > 100 * TOLERANCE  # the tolerance is far below one step's change
    worst = _compare_checkpoints(reference["ckpt"], _latest_ckpt(str(out)))
    print(f"gradient accumulation vs one batch: max abs weight difference {worst:.3e}")
    assert worst <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("batch, accumulation", [(2, 1), (1, 2)], ids=["2x2", "2x2x1-accumulated"])
def test_two_worker_data_parallel_equals_one_process(reference, tmp_path, batch, accumulation):
    """msrun, 2 CPU workers, global batch 4 (per worker: ``batch`` x ``accumulation`` micro-batches)."""
    out = tmp_path / "out"
    cmd = (f"{os.path.join(REPO, 'tools', 'run_mindformer.py')} {' '.join(COMMON)} --use_parallel True "
           f"--train_data {reference['data']} --output_dir {out} --runner_config.batch_size {batch} "
           f"--gradient_accumulation_steps {accumulation}")
    result = _launch(cmd, "2", str(free_port()), str(tmp_path / "msrun_log"), "True", "300", cwd=str(tmp_path))
    logs = {rank: (tmp_path / "msrun_log" / f"worker_{rank}.log").read_text(errors="replace") for rank in (0, 1)}
    assert result.returncode == 0, result.stdout[-2000:] + "\n".join(v[-3000:] for v in logs.values())
    ranks = {rank: _steps(text) for rank, text in logs.items()}
    assert ranks[0][1][0] != ranks[1][1][0]  # each worker reads its own samples
    mean = {s: ((ranks[0][s][0] + ranks[1][s][0]) / 2, ranks[0][s][1]) for s in ranks[0]}
    _check_steps(reference["steps"], mean, "data parallel")
    assert {s: v[1] for s, v in ranks[0].items()} == {s: v[1] for s, v in ranks[1].items()}
    ckpt0, ckpt1 = _latest_ckpt(str(out), 0), _latest_ckpt(str(out), 1)
    for name, weight in _weights(ckpt0).items():
        np.testing.assert_array_equal(weight, ckpt1[name].asnumpy(), err_msg=name)
    worst = _compare_checkpoints(reference["ckpt"], ckpt0)
    print(f"data parallel {batch}x{accumulation} vs one process: max abs weight difference {worst:.3e}")
    assert worst <= TOLERANCE


PER_TOKEN_SCRIPT = """
import os, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
rank, size = 0, 1
if os.environ.get("MS_ROLE"):  # under msrun: data parallel over the workers
    from mindspore.communication import get_group_size, get_rank, init
    init()
    rank, size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
from mindformers_ext.runner.wrapper import PortableTrainOneStepCell


class PerTokenLoss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(3, 1, weight_init="normal", bias_init="zeros")

    def construct(self, x, y, mask):
        err = ((self.dense(x) - y) ** 2).squeeze(-1) * mask
        return err.sum(), mask.sum()


rng = np.random.default_rng(1)
x = rng.standard_normal((8, 3)).astype(np.float32)
y = rng.standard_normal((8, 1)).astype(np.float32)
mask = np.array([1, 1, 1, 0, 1, 0, 0, 0], np.float32)
rows = slice(rank * 8 // size, (rank + 1) * 8 // size)
for accumulation in (1, 2):
    ms.set_seed(3)
    net = PerTokenLoss()
    step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1),
                                    gradient_accumulation_steps=accumulation, calculate_per_token_loss=True,
                                    use_clip_grad=True, max_grad_norm=1e3)
    losses = [float(step(Tensor(x[rows]), Tensor(y[rows]), Tensor(mask[rows]))[0].asnumpy()) for _ in range(3)]
    np.savez(os.path.join(sys.argv[1], f"rank{rank}_acc{accumulation}.npz"), losses=np.array(losses),
             **{p.name: p.asnumpy() for p in net.trainable_params()})
"""


@pytest.mark.slow
def test_per_token_loss_data_parallel_is_the_global_token_mean(tmp_path):
    """``calculate_per_token_loss`` with unequal scored-token counts per rank (3 and 1 of 4 rows) and per
    micro-batch (2, 1, 1, 0): 2 msrun workers (with and without accumulation) take the same SGD steps and
    report the same loss as one process on all 8 rows. (Dividing by each rank's own count made the ranks
    diverge.)"""
    script = tmp_path / "per_token_step.py"
    script.write_text(PER_TOKEN_SCRIPT)
    (tmp_path / "single").mkdir()
    (tmp_path / "dp").mkdir()
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single")], env=_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    result = _launch(f"{script} {tmp_path / 'dp'}", "2", str(free_port()), str(tmp_path / "msrun_log"), "True",
                     "300", cwd=str(tmp_path))
    logs = "\n".join((tmp_path / "msrun_log" / f"worker_{r}.log").read_text(errors="replace")[-3000:] for r in (0, 1))
    assert result.returncode == 0, result.stdout[-2000:] + logs
    reference = np.load(tmp_path / "single" / "rank0_acc1.npz")
    assert not np.allclose(reference["losses"][0], reference["losses"][-1])  # the steps do move the weights
    for accumulation in (1, 2):
        for rank in (0, 1):
            got = np.load(tmp_path / "dp" / f"rank{rank}_acc{accumulation}.npz")
            for name in reference.files:
                np.testing.assert_allclose(got[name], reference[name], rtol=1e-6, atol=1e-7,
                                           err_msg=f"{name} rank {rank} accumulation {accumulation}")
