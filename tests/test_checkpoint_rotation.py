"""Issue 14, parts 3 and 6: checkpoint files across resumes, resume fallback, ``--strict_load False``.

* :class:`StepCheckpointMonitor` (what ``type: CheckpointMonitor`` builds in ``run_mindformer.py``
  train / finetune) names files by the global step they hold, saves at the same global steps whether
  or not the run was resumed, applies ``keep_checkpoint_max`` to the files of earlier runs too and
  writes the right ``last_step`` to meta.json; it is driven here in process with a one-parameter
  network whose weight is the step number, so every file's content says which step wrote it;
* resume picks the most recently written checkpoint that reads as a whole, and names the ones it skipped;
* ``--strict_load False`` loads a checkpoint with weights the model lacks, with a warning listing them.

The end-to-end kill -9 / resume run is ``test_fault_injection.py``.
"""
import json
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.train.callback import RunContext
from mindspore.train.callback._callback import InternalCallbackParam
from mindformers.tools.register import MindFormerConfig

from mindformers_ext.checkpoint import CheckpointError
from mindformers_ext.runner.train import StepCheckpointMonitor, _resume_from_newest_good, choose_resume_checkpoint

STEPS_PER_EPOCH = 20


class _StepNet(nn.Cell):
    """One weight, set to the global step before each save."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.zeros(3, np.float32)), name="w")

    def construct(self, x):
        return x * self.w


class _Optimizer:
    def __init__(self):
        self.global_step = Parameter(Tensor(np.array([0], np.int32)), name="global_step")


def _train(out, last, resumed=0, every=5, keep=3, prefix="tiny"):
    """Steps ``resumed + 1 .. last`` through the monitor, as MindFormers' trainer drives it after resuming
    from step ``resumed``: ``cur_step_num`` counts from 1 again and the resumed step comes in append_info."""
    monitor = StepCheckpointMonitor(prefix=prefix, directory=str(out), save_checkpoint_steps=every,
                                    keep_checkpoint_max=keep,
                                    append_info=[{"epoch_num": 0, "step_num": resumed, "loss_scale": 1}])
    net, optimizer = _StepNet(), _Optimizer()
    cb = InternalCallbackParam()
    cb.train_network = cb.network = net
    cb.optimizer, cb.batch_num, cb.epoch_num = optimizer, STEPS_PER_EPOCH, 3
    cb.net_outputs = (Tensor(1.0), False, Tensor(1.0))
    for cur in range(1, last - resumed + 1):
        step = resumed + cur
        cb.cur_step_num, cb.cur_epoch_num = cur, (step - 1) // STEPS_PER_EPOCH + 1
        optimizer.global_step.set_data(Tensor(np.array([step], np.int32)))
        net.w.set_data(Tensor(np.full(3, step, np.float32)))
        monitor.step_end(RunContext(cb))


def _held(path):
    """(step_num, global_step, w) stored in a checkpoint file."""
    saved = ms.load_checkpoint(str(path))
    return int(saved["step_num"].asnumpy()), int(saved["global_step"].asnumpy()[0]), float(saved["w"].asnumpy()[0])


def _folder(out):
    return out / "checkpoint" / "rank_0"


def _ckpts(out):
    return sorted(n for n in os.listdir(_folder(out)) if n.endswith(".ckpt"))


@pytest.mark.parametrize("resumed", [7, 10])
def test_names_saves_and_meta_hold_across_a_resume(tmp_path, resumed):
    """A run stopped at step ``resumed`` and resumed to 40 writes the files an uninterrupted 40-step run
    writes: one every 5 global steps, named ``tiny_rank_0-<epoch>_<global step>``, holding that step
    (before: names and save points counted from the resumed step, ``-1_40`` held step 90); meta.json
    names the last one and its global step (before: the step within the epoch, counted from the resume)."""
    straight, resumed_out = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 40, keep=20)
    _train(resumed_out, resumed, keep=20)
    _train(resumed_out, 40, resumed=resumed, keep=20)
    expected = sorted(f"tiny_rank_0-{(s - 1) // STEPS_PER_EPOCH + 1}_{s}.ckpt" for s in range(5, 41, 5))
    assert _ckpts(straight) == expected
    assert _ckpts(resumed_out) == expected
    for name in expected:
        step = int(name[:-5].rsplit("_", 1)[1])
        assert _held(_folder(resumed_out) / name) == (step, step, step), name
    meta = json.loads((_folder(resumed_out) / "meta.json").read_text())
    assert meta == {"last_epoch": 2, "last_step": 40, "last_ckpt_file": "tiny_rank_0-2_40.ckpt"}


def test_keep_checkpoint_max_counts_earlier_runs(tmp_path):
    """12 files of earlier runs (``tiny_rank_0_1-E_S`` as MindSpore renamed a resumed run, then
    ``tiny_rank_0-E_S``) and ``keep_checkpoint_max: 3``: after the resumed run's first save, 3 files of the prefix
    are left, the 2 most recently written older ones and the new one (before: all 12 stayed, as a new run
    only counted its own files). Another prefix's files stay; an older file of the name being written is
    replaced, not counted."""
    folder = _folder(tmp_path)
    folder.mkdir(parents=True)
    old = [f"tiny_rank_0_1-1_{s}.ckpt" for s in range(1, 7)] + [f"tiny_rank_0-2_{s}.ckpt" for s in range(21, 27)]
    for written, name in enumerate(old):
        (folder / name).write_bytes(b"old")
        os.utime(folder / name, (1_000_000 + written, 1_000_000 + written))
    (folder / "other_rank_0-1_5.ckpt").write_bytes(b"another prefix")
    (folder / "tiny_rank_0-2_35.ckpt").write_bytes(b"the name of the next save, from an abandoned run")
    os.utime(folder / "tiny_rank_0-2_35.ckpt", (2_000_000, 2_000_000))
    _train(tmp_path, 37, resumed=33)
    assert _ckpts(tmp_path) == sorted(["other_rank_0-1_5.ckpt", "tiny_rank_0-2_25.ckpt", "tiny_rank_0-2_26.ckpt",
                                       "tiny_rank_0-2_35.ckpt"])
    assert _held(folder / "tiny_rank_0-2_35.ckpt") == (35, 35, 35)
    _train(tmp_path, 45, resumed=37)  # saves 40 and 45, removing the least recently written first
    assert _ckpts(tmp_path) == sorted(["other_rank_0-1_5.ckpt", "tiny_rank_0-2_35.ckpt", "tiny_rank_0-2_40.ckpt",
                                       "tiny_rank_0-3_45.ckpt"])


def _save_training_checkpoint(path, step, mtime):
    ms.save_checkpoint([{"name": "w", "data": Tensor(np.full(64, step, np.float32))}], str(path),
                       append_dict={"step_num": step, "epoch_num": 1})
    os.utime(path, (mtime, mtime))


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    """Newest first: a truncated file and a file without ``step_num`` (not written by training) are skipped,
    each named with its reason; the newest good one is chosen (by write time: a file of a lower step
    written later wins, as after a resume from an older checkpoint)."""
    folder = tmp_path / "checkpoint" / "rank_0"
    folder.mkdir(parents=True)
    _save_training_checkpoint(folder / "tiny_rank_0-1_20.ckpt", 20, 100)
    _save_training_checkpoint(folder / "tiny_rank_0-1_10.ckpt", 10, 200)
    _save_training_checkpoint(folder / "tiny_rank_0-1_15.ckpt", 15, 300)
    good = (folder / "tiny_rank_0-1_15.ckpt").read_bytes()
    truncated = folder / "tiny_rank_0-1_25.ckpt"
    truncated.write_bytes(good[:len(good) - 40])
    os.utime(truncated, (400, 400))
    weights_only = folder / "weights.ckpt"
    ms.save_checkpoint([{"name": "w", "data": Tensor(np.zeros(64, np.float32))}], str(weights_only))
    os.utime(weights_only, (500, 500))

    chosen, skipped = choose_resume_checkpoint(str(tmp_path / "checkpoint"), 0)
    assert chosen == str(folder / "tiny_rank_0-1_15.ckpt")
    assert [file for file, _ in skipped] == [str(weights_only), str(truncated)]
    assert "no step_num" in skipped[0][1] and "truncated" in skipped[1][1]
    assert choose_resume_checkpoint(str(folder), 0)[0] == chosen  # the rank folder itself

    for name in ("tiny_rank_0-1_15.ckpt", "tiny_rank_0-1_10.ckpt", "tiny_rank_0-1_20.ckpt"):
        (folder / name).write_bytes(b"\x0a\x05garbage")
    with pytest.raises(CheckpointError) as info:
        choose_resume_checkpoint(str(tmp_path / "checkpoint"), 0)
    message = str(info.value)
    assert "no .ckpt checkpoint" in message and str(folder) in message
    assert all(name in message for name in ("weights.ckpt", "-1_25", "-1_20", "-1_15", "-1_10"))


def test_resume_points_mindformers_at_the_chosen_file(tmp_path, monkeypatch):
    """``resume_training: True`` on a directory: with rank folders the file is passed the MindFormers way
    (``resume_training: <name>``), otherwise as ``load_checkpoint``; a warning names each skipped file."""
    import mindformers_ext.runner.train as train

    warned = []
    monkeypatch.setattr(train.logger, "warning", lambda msg, *args: warned.append(msg % args))
    folder = tmp_path / "checkpoint" / "rank_0"
    folder.mkdir(parents=True)
    _save_training_checkpoint(folder / "tiny_rank_0-1_10.ckpt", 10, 100)
    (folder / "tiny_rank_0-1_20.ckpt").write_bytes(b"")
    config = MindFormerConfig(resume_training=True, load_checkpoint=str(tmp_path / "checkpoint"))
    _resume_from_newest_good(config, 0)
    assert config.resume_training == "tiny_rank_0-1_10.ckpt" and config.load_checkpoint == str(tmp_path / "checkpoint")
    assert len(warned) == 1 and "tiny_rank_0-1_20.ckpt" in warned[0] and "empty file" in warned[0]

    config = MindFormerConfig(resume_training=True, load_checkpoint=str(folder))
    _resume_from_newest_good(config, 0)
    assert config.resume_training is True and config.load_checkpoint == str(folder / "tiny_rank_0-1_10.ckpt")

    named = MindFormerConfig(resume_training="tiny_rank_0-1_20.ckpt", load_checkpoint=str(tmp_path / "checkpoint"))
    _resume_from_newest_good(named, 0)  # the user named the file: taken as given
    assert named.resume_training == "tiny_rank_0-1_20.ckpt"


# ---------------------------------------------------------------------------------------- --strict_load
@pytest.fixture
def strictness():
    from mindformers_ext.checkpoint import set_strict_load

    yield set_strict_load
    set_strict_load(True)


def test_strict_load_false_loads_extra_weights_with_a_warning(tmp_path, monkeypatch, strictness):
    """A checkpoint of a deeper model: an error naming the extra weights that points at ``--strict_load
    False``; with it (argument or process setting) the model's weights load and a warning lists the extra
    ones. Missing weights stay an error either way."""
    from mindformers.tools.logger import logger

    from mindformers_ext.checkpoint import load_checkpoint_into, select_checkpoint
    from test_checkpoint_paths import _deepseek_coder, _weights

    warned = []
    monkeypatch.setattr(logger, "warning", lambda msg, *args: warned.append(msg % args))
    model = _deepseek_coder()
    reference = _weights(model)
    extra = str(tmp_path / "extra.ckpt")
    extras = {f"model.layers.9.attention.{n}.weight": Tensor(np.ones((2, 2), np.float32)) for n in ("wq", "wk")}
    ms.save_checkpoint(model, extra, append_dict=extras)
    expected = {name: value.shape for name, value in reference.items()}
    with pytest.raises(CheckpointError) as info:
        select_checkpoint(extra, expected)
    assert "model.layers.9.attention.wq.weight" in str(info.value) and "--strict_load False" in str(info.value)
    assert not [w for w in warned if extra in w]

    assert select_checkpoint(extra, expected, strict=False) == [extra]
    about = [w for w in warned if extra in w]
    assert len(about) == 1 and all(name in about[0] for name in extras)

    strictness(False)
    target = _deepseek_coder()
    for p in target.get_parameters():
        p.set_data(Tensor(np.zeros(p.shape, np.float32)))
    assert load_checkpoint_into(target, extra) == [extra]
    for name, value in _weights(target).items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)

    missing = str(tmp_path / "missing.ckpt")
    ms.save_checkpoint([{"name": n, "data": Tensor(v)} for n, v in reference.items() if n != "lm_head.weight"],
                       missing)
    with pytest.raises(CheckpointError, match="no weight for 1"):
        select_checkpoint(missing, expected, strict=False)


def test_strict_load_flag(strictness, tmp_path, monkeypatch):
    """``--strict_load False`` takes a bool string like MindFormers' other flags; ``main`` applies it before
    anything loads (here the run stops at the missing YAML right after)."""
    from mindformers_ext.checkpoint import strict_load
    from mindformers_ext.runner.cli import parse_args
    from mindformers_ext.runner.main import main

    monkeypatch.setenv("LOG_MF_PATH", str(tmp_path / "log"))
    assert parse_args(["--config", "x.yaml"])[0].strict_load is True
    assert parse_args(["--config", "x.yaml", "--strict_load", "False"])[0].strict_load is False
    with pytest.raises(SystemExit):
        parse_args(["--config", "x.yaml", "--strict_load", "sometimes"])
    assert main(["--config", "no_such.yaml", "--strict_load", "False"]) == 2
    assert strict_load() is False
    assert main(["--config", "no_such.yaml"]) == 2
    assert strict_load() is True
