"""Issue 17: load what the config names, and say so when it cannot be loaded.

* model classes, MindFormers' ``pipeline``, the exporter and the API (eval harness) honour
  ``checkpoint_name_or_path`` / ``load_checkpoint``; a missing or non-matching file is an error; random
  weights only with ``--random_weights`` (warned about every run);
* ``--load_checkpoint DIR`` picks the newest file that fits the model, or lists the candidates;
* records longer than ``seq_length + 1`` are refused at start-up; the tiny DeepSeek configs hold
  their own preprocessed records;
* the CPU fallback to data parallel resets every model split; dataset workers are capped to the cores;
* enum-like YAML strings (``extend_method: "None"``, ``pad_token: '[PAD]'``) can be set from the
  command line;
* the seed's WizardCoder conversion (``--torch_path ./ckpt --mindspore_path ./ckpt/rank_0`` on a
  ``pytorch_model.bin``) works without ``--allow-pickle``, which arbitrary pickles still need;
* the bench docstrings list what the benches run by default.

The distributed parts (msrun with ``--load_checkpoint``, the launcher's exit status) are in
``test_msrun_checkpoint.py``.
"""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import mindspore as ms
from mindformers.tools.register import MindFormerConfig

from test_run_mindformer import FINETUNE_TINY, PREDICT_TINY, REPO, RUN, _config, _env, write_tiny_mindrecord

WIZARD_PREDICT_TINY = os.path.join(REPO, "configs", "wizardcoder", "predict_tiny.yaml")
DS2_FINETUNE_TINY = os.path.join(REPO, "configs", "deepseek2", "finetune_tiny.yaml")
RUN_WIZARDCODER_YAML = os.path.join(REPO, "research", "wizardcoder", "run_wizardcoder.yaml")
DS2_236B_YAML = os.path.join(REPO, "research", "deepseek2", "finetune_deepseek2_236B.yaml")
EXPORT = os.path.join(REPO, "research", "wizardcoder", "export_wizardcoder_inc.py")
WIZARD_CONVERT = os.path.join(REPO, "research", "wizardcoder", "convert_weight.py")


def _model_config(path, **changes):
    config = dict(MindFormerConfig(path).model.model_config)
    config.pop("type", None)
    config.update(changes)
    return config


def _wizardcoder(**changes):
    from research.wizardcoder.wizardcoder import WizardCoderLMHeadModel
    from research.wizardcoder.wizardcoder_config import WizardCoderConfig

    return WizardCoderLMHeadModel(WizardCoderConfig(**_model_config(WIZARD_PREDICT_TINY, **changes)))


def _deepseek_coder(**changes):
    from research.deepseek1_5.deepseek1_5 import DeepSeekCoderForCausalLM
    from research.deepseek1_5.deepseek1_5_config import DeepSeekCoderConfig

    return DeepSeekCoderForCausalLM(DeepSeekCoderConfig(**_model_config(PREDICT_TINY, vocab_size=512, **changes)))


def _weights(network):
    return {p.name: p.asnumpy() for p in network.get_parameters()}


def _assert_same(network, reference):
    got = _weights(network)
    assert sorted(got) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.fixture(scope="module")
def wizard_ckpt(tmp_path_factory):
    """A tiny WizardCoder (predict_tiny.yaml's shapes) saved as .ckpt, and its weights."""
    root = tmp_path_factory.mktemp("wizard_ckpt")
    model = _wizardcoder()
    path = str(root / "wizardcoder_tiny.ckpt")
    ms.save_checkpoint(model, path)
    return path, _weights(model)


# ------------------------------------------------------------------------------ 1. model classes, pipeline
def test_model_classes_load_checkpoint_name_or_path(wizard_ckpt, tmp_path):
    """The seed's ``WizardCoderLMHeadModel(WizardCoderConfig(..., checkpoint_name_or_path=...))`` and
    DeepSeekCoderForCausalLM load the named file (before: random weights, no error)."""
    from mindformers_ext.checkpoint import CheckpointError

    path, reference = wizard_ckpt
    _assert_same(_wizardcoder(checkpoint_name_or_path=path), reference)
    coder = _deepseek_coder()
    coder_path = str(tmp_path / "coder.ckpt")
    ms.save_checkpoint(coder, coder_path)
    _assert_same(_deepseek_coder(checkpoint_name_or_path=coder_path), _weights(coder))
    # a directory: the file in it that fits (here the WizardCoder one is newer but does not fit)
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(coder_path, folder / "coder.ckpt")
    os.utime(folder / "coder.ckpt", (1, 1))
    shutil.copy(path, folder / "wizard.ckpt")
    _assert_same(_deepseek_coder(checkpoint_name_or_path=str(folder)), _weights(coder))
    with pytest.raises(CheckpointError, match=r"model_config.checkpoint_name_or_path '.*nowhere.ckpt' does not exist"):
        _wizardcoder(checkpoint_name_or_path=str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(CheckpointError) as info:  # another model's file: names the file and what differs
        _wizardcoder(checkpoint_name_or_path=path, num_layers=3)
    message = str(info.value)
    assert path in message and "no weight for 14 of the model's 46 parameters" in message
    assert "model.layers.2.attention_norm.weight" in message


@pytest.mark.slow  # full runs in subprocesses (about 20 s)
def test_pipeline_with_a_named_checkpoint_is_reproducible(wizard_ckpt):
    """The seed's pipeline snippet: two models built from the same checkpoint_name_or_path generate the
    same text as the model that wrote it (before: each build had its own random weights)."""
    from mindformers import pipeline
    from research.wizardcoder.wizardcoder_tokenizer import WizardCoderTokenizer

    path, _ = wizard_ckpt
    tokenizer = WizardCoderTokenizer()
    outputs = []
    for _ in range(2):
        model = _wizardcoder(checkpoint_name_or_path=path)
        model.set_train(False)
        task = pipeline(task="text_generation", model=model, tokenizer=tokenizer)
        outputs.append(task("def quick_sort(arr):", max_new_tokens=6, do_sample=False, use_past=True))
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["text_generation_text"][0].startswith("def quick_sort(arr):")


# ------------------------------------------------------------------------------ 1. entry points: flag, errors
def _subprocess(*argv, cwd, timeout=300):
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.slow  # three predict subprocesses (about 30 s)
def test_predict_needs_a_checkpoint_or_random_weights(tmp_path):
    """run_mindformer.py predict with no checkpoint anywhere: exit 2 naming the ways out; with
    --random_weights it runs and warns (before: random gibberish, exit 0, one log line)."""
    code, out, err = _subprocess(RUN, "--config", PREDICT_TINY, "--predict_data", "def f():", "--predict_length", "2",
                                 "--output_dir", str(tmp_path / "a"), cwd=tmp_path)
    assert code == 2, out[-2000:] + err[-2000:]
    assert "no checkpoint to load" in err and "--load_checkpoint" in err and "--random_weights" in err
    assert "predict_tiny.yaml" in err
    code, out, err = _subprocess(RUN, "--config", PREDICT_TINY, "--predict_data", "def f():", "--predict_length", "2",
                                 "--output_dir", str(tmp_path / "b"), "--random_weights", cwd=tmp_path)
    assert code == 0, out[-2000:] + err[-2000:]
    assert "randomly initialised weights" in err and "text_generation_text" in out


def test_exporter_loads_the_yaml_checkpoint_and_refuses_random_weights(wizard_ckpt, tmp_path, capsys):
    """export_wizardcoder_inc.py: a YAML with checkpoint_name_or_path exports those weights (before: random
    weights, exit 0); no checkpoint is an error unless --random_weights, which warns."""
    from mindformers_ext.checkpoint import CheckpointError
    from research.wizardcoder.export_wizardcoder_inc import build_model, main

    path, reference = wizard_ckpt
    raw = yaml.safe_load(open(WIZARD_PREDICT_TINY, encoding="utf-8"))
    raw["model"]["model_config"]["checkpoint_name_or_path"] = path
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _assert_same(build_model(str(named)), reference)
    with pytest.raises(CheckpointError, match="--random_weights"):
        build_model(WIZARD_PREDICT_TINY)
    assert main(["--config", WIZARD_PREDICT_TINY, "--output_dir", str(tmp_path / "none")]) == 2
    assert "no checkpoint to load" in capsys.readouterr().err and not os.path.exists(tmp_path / "none")
    build_model(WIZARD_PREDICT_TINY, random_weights=True)
    assert "randomly initialised weights" in capsys.readouterr().err


def test_api_generator_honours_checkpoint_name_or_path(wizard_ckpt, tmp_path):
    """mindformers_ext.api (what the eval harness calls): the YAML's checkpoint_name_or_path is loaded, a
    wrong one is an error, no checkpoint is an error without random_weights."""
    from mindformers_ext.api import build_text_generator
    from mindformers_ext.checkpoint import CheckpointError

    path, reference = wizard_ckpt
    generator = build_text_generator(WIZARD_PREDICT_TINY, overrides={"model.model_config.checkpoint_name_or_path": path},
                                     max_new_tokens=2)
    _assert_same(generator.network, reference)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_text_generator(PREDICT_TINY, overrides={"model.model_config.checkpoint_name_or_path": path})
    with pytest.raises(CheckpointError, match="random_weights"):
        build_text_generator(WIZARD_PREDICT_TINY)


def test_finetune_config_adopts_checkpoint_name_or_path(tmp_path):
    """MindFormers' Trainer.train() drops model_config.checkpoint_name_or_path; run_mindformer moves it to
    load_checkpoint (which every run mode loads); --load_checkpoint wins over it."""
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    config, _ = _config(FINETUNE_TINY, "--model.model_config.checkpoint_name_or_path", str(a))
    assert config.load_checkpoint == str(a) and not config.model.model_config.checkpoint_name_or_path
    config, _ = _config(FINETUNE_TINY, "--model.model_config.checkpoint_name_or_path", str(a),
                        "--load_checkpoint", str(b))
    assert config.load_checkpoint == str(b) and not config.model.model_config.checkpoint_name_or_path
    from mindformers_ext.runner.config import ConfigError

    with pytest.raises(ConfigError, match="model.model_config.checkpoint_name_or_path '.*gone.ckpt' does not exist"):
        _config(FINETUNE_TINY, "--model.model_config.checkpoint_name_or_path", str(tmp_path / "gone.ckpt"))


# ------------------------------------------------------------------------------ 5. --load_checkpoint DIR
def test_directory_picks_the_newest_file_that_fits(tmp_path):
    """A shared output/checkpoint folder (rank_0/) holding checkpoints of two models: each model loads its
    own (before: the newest file whatever model wrote it); none fitting lists every candidate."""
    from mindformers_ext.checkpoint import CheckpointError, load_checkpoint_into

    small, big = _deepseek_coder(), _deepseek_coder(num_layers=3)
    rank0 = tmp_path / "checkpoint" / "rank_0"
    rank0.mkdir(parents=True)
    ms.save_checkpoint(small, str(rank0 / "small-1_4.ckpt"), append_dict={"step_num": 4})
    os.utime(rank0 / "small-1_4.ckpt", (1, 1))
    ms.save_checkpoint(big, str(rank0 / "big-1_8.ckpt"))
    target = _deepseek_coder()
    files = load_checkpoint_into(target, str(tmp_path / "checkpoint"), rank_id=0)
    assert files == [str(rank0 / "small-1_4.ckpt")]
    _assert_same(target, _weights(small))
    # rank 1 of a data-parallel job reads the full copy in rank_0 when there is no rank_1
    assert load_checkpoint_into(_deepseek_coder(num_layers=3), str(tmp_path / "checkpoint"), rank_id=1) == \
        [str(rank0 / "big-1_8.ckpt")]
    # safetensors as MindFormers' CheckpointMonitor writes them (checkpoint_format: safetensors)
    st = tmp_path / "st"
    st.mkdir()
    ms.save_checkpoint(small, str(st / "small-1_4.safetensors"), format="safetensors")
    target = _deepseek_coder()
    assert load_checkpoint_into(target, str(st)) == [str(st / "small-1_4.safetensors")]
    _assert_same(target, _weights(small))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(_deepseek_coder(hidden_size=32), str(tmp_path / "checkpoint"))
    message = str(info.value)
    assert "none of its 2 candidate checkpoints fits" in message
    assert "small-1_4.ckpt: " in message and "big-1_8.ckpt: " in message and "of another shape" in message


def test_file_mismatches_are_named(tmp_path):
    """A file: missing weights, other shapes and weights of another model are each named; optimizer state
    and counters next to the weights are fine; a bfloat16 checkpoint loads into a float32 model."""
    from mindformers_ext.checkpoint import CheckpointError, compare, load_checkpoint_into

    model = _deepseek_coder()
    weights = _weights(model)
    expected = {n: v.shape for n, v in weights.items()}
    index = dict(expected, **{"adam_m.lm_head.weight": expected["lm_head.weight"], "global_step": (1,)})
    assert compare(expected, index).ok
    index["model.layers.9.attention.wq.weight"] = (64, 64)  # a weight of a deeper model
    index["lm_head.weight"] = (1, 64)
    del index["model.norm_out.weight"]
    report = compare(expected, index)
    assert report.missing == ["model.norm_out.weight"]
    assert report.wrong_shape == [("lm_head.weight", (1, 64), (512, 64))]
    assert report.unexpected == ["model.layers.9.attention.wq.weight"]
    path = str(tmp_path / "bf16.ckpt")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v).astype(ms.bfloat16)} for n, v in weights.items()], path)
    target = _deepseek_coder()
    load_checkpoint_into(target, path)
    for p in target.get_parameters():
        assert p.dtype == ms.float32
        np.testing.assert_allclose(p.asnumpy(), weights[p.name], rtol=1e-2, atol=1e-2)
    extra = str(tmp_path / "extra.ckpt")
    ms.save_checkpoint(model, extra, append_dict={"model.layers.9.attention.wq.weight": ms.Tensor(np.ones((2, 2)))})
    with pytest.raises(CheckpointError, match=r"extra.ckpt does not fit .*1 weights the model does not have"):
        load_checkpoint_into(_deepseek_coder(), extra)


# ------------------------------------------------------------------------------ 5. record lengths, tiny data
def test_records_longer_than_seq_length_are_refused(tmp_path):
    """33-token records under seq_length 16: an error naming the file and both lengths (before: trained on
    them silently); 17-token records (seq_length + 1) and shorter ones pass."""
    from mindformers_ext.runner.train import DataError, check_record_lengths

    long_data = write_tiny_mindrecord(tmp_path / "long.mindrecord", samples=4, seq_length=32)
    config, _ = _config(FINETUNE_TINY, "--train_data", long_data, "--model.model_config.seq_length", "16")
    with pytest.raises(DataError) as info:
        check_record_lengths(config)
    message = str(info.value)
    assert long_data in message and "33 tokens" in message and "seq_length is 16" in message and "17" in message
    ok = write_tiny_mindrecord(tmp_path / "ok.mindrecord", samples=4, seq_length=16)
    config, _ = _config(FINETUNE_TINY, "--train_data", ok, "--model.model_config.seq_length", "16")
    check_record_lengths(config)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_tiny_mindrecord(folder / "a.mindrecord", samples=2, seq_length=8)
    write_tiny_mindrecord(folder / "b.mindrecord", samples=2, seq_length=40)
    config, _ = _config(FINETUNE_TINY, "--train_data", str(folder), "--model.model_config.seq_length", "16")
    with pytest.raises(DataError, match="b.mindrecord: record 0 has 41 tokens"):
        check_record_lengths(config)


def test_finetune_refuses_long_records_at_start_up(tmp_path):
    data = write_tiny_mindrecord(tmp_path / "long.mindrecord", samples=4, seq_length=32)
    code, out, err = _subprocess(RUN, "--config", FINETUNE_TINY, "--run_mode", "finetune", "--train_data", data,
                                 "--model.model_config.seq_length", "16", "--output_dir", str(tmp_path / "out"),
                                 cwd=tmp_path)
    assert code == 2, out[-2000:] + err[-2000:]
    assert f"run_mindformer.py: error: {data}: record 0 has 33 tokens" in err
    assert not glob.glob(str(tmp_path / "out" / "checkpoint" / "*" / "*.ckpt"))


def _preprocess_alpaca(tmp_path, seq_length):
    from research.deepseek1_5.deepseek_preprocess_1_5 import main as preprocess

    records = [{"instruction": f"Write a function that returns {i}.", "input": "" if i % 2 else "no arguments",
                "output": f"def f():\n    return {i}"} for i in range(4)]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    out = str(tmp_path / f"alpaca_{seq_length}.mindrecord")
    preprocess(["--dataset_type", "qa", "--input_glob", str(source), "--seq_length", str(seq_length),
                "--output_file", out, "--no_progress"])
    return out


@pytest.mark.parametrize("path", [FINETUNE_TINY, DS2_FINETUNE_TINY], ids=["deepseek1_5", "deepseek2"])
def test_tiny_deepseek_configs_hold_their_own_preprocessed_records(path, tmp_path):
    """The seed's preprocessing at the tiny YAML's seq_length writes records (the system prompt alone is
    ~70 tokens: seq_length 32 wrote none) that the YAML accepts."""
    from mindformers_ext.runner.train import check_record_lengths

    seq_length = MindFormerConfig(path).model.model_config.seq_length
    assert f"--seq_length {seq_length}" in open(path, encoding="utf-8").read()  # the comment shows the command
    data = _preprocess_alpaca(tmp_path, seq_length)
    config, _ = _config(path, "--train_data", data)
    check_record_lengths(config)


@pytest.mark.slow  # full runs in subprocesses (about 20 s)
def test_tiny_deepseek_finetunes_on_its_preprocessed_records(tmp_path):
    data = _preprocess_alpaca(tmp_path, MindFormerConfig(FINETUNE_TINY).model.model_config.seq_length)
    code, out, err = _subprocess(RUN, "--config", FINETUNE_TINY, "--run_mode", "finetune", "--train_data", data,
                                 "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert code == 0, out[-2000:] + err[-3000:]
    assert glob.glob(str(tmp_path / "out" / "checkpoint" / "rank_0" / "*.ckpt"))


# ------------------------------------------------------------------------------ 5. enum-like overrides
def _string_leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _string_leaves(value, path + (str(key),))
    elif isinstance(node, str) and node:
        yield ".".join(path), node


YAMLS = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")) +
               glob.glob(os.path.join(REPO, "research", "*", "*.yaml")))


@pytest.mark.parametrize("path", YAMLS, ids=[os.path.relpath(p, REPO) for p in YAMLS])
def test_every_string_field_can_be_set_from_the_command_line(path):
    """Passing each model_config / processor string field its own YAML value on the command line gives that
    value back (``extend_method None`` stayed None, ``pad_token [PAD]`` became a list)."""
    from mindformers_ext.runner.cli import parse_args
    from mindformers_ext.runner.config import apply_overrides, load_yaml

    raw = load_yaml(path)
    leaves = [(f"model.model_config.{k}", v) for k, v in _string_leaves(raw["model"]["model_config"])]
    leaves += [(f"processor.{k}", v) for k, v in _string_leaves(raw.get("processor") or {})]
    argv = ["--config", path]
    for key, value in leaves:
        argv += [f"--{key}", value]
    _, overrides = parse_args(argv)
    apply_overrides(raw, overrides)
    for key, value in leaves:
        node = raw
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, value, node)


def test_extend_method_none_from_the_command_line_builds_the_model():
    from mindformers_ext import load_families
    load_families()  # our classes in MindFormers' registry
    from mindformers.models.build_config import build_model_config

    for path in (DS2_236B_YAML, PREDICT_TINY):
        config, _ = _config(path, "--run_mode", "predict", "--model.model_config.extend_method", "None")
        assert config.model.model_config.extend_method == "None"
        assert build_model_config(config.model.model_config).extend_method == "None"
    config, _ = _config(PREDICT_TINY, "--model.model_config.checkpoint_name_or_path", "None")  # not enum-like
    assert config.model.model_config.checkpoint_name_or_path in (None, "")


# ------------------------------------------------------------------------------ 3. CPU fallback
@pytest.fixture()
def logged(monkeypatch):
    """(level, message) of what mindformers_ext.runner.config logs."""
    import mindformers_ext.runner.config as config_module

    messages = []

    class Recorder:
        @staticmethod
        def info(msg, *args):
            messages.append(("INFO", msg % args if args else msg))

        @staticmethod
        def warning(msg, *args):
            messages.append(("WARNING", msg % args if args else msg))

    monkeypatch.setattr(config_module, "logger", Recorder)
    return messages


@pytest.mark.parametrize("path, splits", [
    (RUN_WIZARDCODER_YAML, ["parallel_config.model_parallel 4 -> 1", "parallel_config.pipeline_stage 2 -> 1",
                            "parallel_config.micro_batch_num 8 -> 1"]),
    (DS2_236B_YAML, ["parallel_config.model_parallel 8 -> 1", "parallel_config.pipeline_stage 2 -> 1",
                     "parallel_config.expert_parallel 4 -> 1"])], ids=["wizardcoder", "deepseek2_236B"])
def test_cpu_data_parallel_fallback_resets_model_splits(path, splits, logged):
    """Semi-auto on CPU falls back to data parallel with pipeline / model / expert parallel at 1 and one
    warning naming each (before: pipeline_stage 2 stayed, "Select CPU operator[AllReduce] fail"); the
    YAMLs' num_parallel_workers 8 is capped to the cores."""
    from mindformers_ext.runner.config import available_cores

    config, target = _config(path, "--run_mode", "finetune", "--use_parallel", "True")
    messages = logged
    assert target == "CPU" and config.parallel.parallel_mode == 0
    pc = config.parallel_config
    assert pc.model_parallel == pc.pipeline_stage == pc.get("expert_parallel", 1) == pc.micro_batch_num == 1
    warnings = [m for level, m in messages if level == "WARNING" and "data parallel" in m]
    assert len(warnings) == 1, warnings
    for split in splits:
        assert split in warnings[0]
    cores = available_cores()
    assert 1 <= config.train_dataset.num_parallel_workers <= cores
    if cores < 8:
        assert any(f"train_dataset.num_parallel_workers 8 exceeds the {cores} CPU cores" in m for _, m in messages)


def test_cpu_threads_follow_the_process_affinity():
    """A process pinned to one core (taskset, a container's cpuset) runs MindSpore's CPU kernels on one
    thread, not on os.cpu_count() threads fighting for that core."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); import mindspore as ms; "
            "from mindformers_ext.runner.config import _adapt_threads; _adapt_threads('CPU'); "
            "print('threads', ms.get_context('runtime_num_threads'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, check=True).stdout
    assert "threads 1" in out.splitlines()


def test_auto_trans_ckpt_with_nothing_to_transform(tmp_path, logged):
    """--auto_trans_ckpt True with a full checkpoint where every rank holds the whole model: one info
    line, and the full checkpoint is loaded on every rank (no transform)."""
    ckpt = tmp_path / "full.ckpt"
    ckpt.write_bytes(b"x")
    config, _ = _config(FINETUNE_TINY, "--use_parallel", "True", "--load_checkpoint", str(ckpt),
                        "--auto_trans_ckpt", "True")
    messages = logged
    assert config.auto_trans_ckpt is False and config.load_checkpoint == str(ckpt)
    lines = [m for _, m in messages if "auto_trans_ckpt: nothing to transform" in m]
    assert len(lines) == 1 and "data parallel" in lines[0] and str(ckpt) in lines[0]


# ------------------------------------------------------------------------------ 4. the seed's conversion
@pytest.fixture(scope="module")
def seed_ckpt_dir(tmp_path_factory):
    """What the seed's README downloads into ./ckpt: config.json and a pickled pytorch_model.bin (HF's
    torch.save zip format), plus the safetensors of the same model for reference."""
    import transformers

    from wizardcoder_util import make_tiny_bigcode

    root = tmp_path_factory.mktemp("seed_ckpt")
    ref = make_tiny_bigcode(str(root / "safetensors"), seed=5)
    model = transformers.GPTBigCodeForCausalLM.from_pretrained(ref)
    ckpt = root / "ckpt"
    model.save_pretrained(str(ckpt), safe_serialization=False)
    assert os.path.exists(ckpt / "pytorch_model.bin") and not glob.glob(str(ckpt / "*.safetensors"))
    return root, ref, ckpt


def test_seed_wizardcoder_conversion_spelling(seed_ckpt_dir, tmp_path):
    """``convert_weight.py --torch_path ./ckpt --mindspore_path ./ckpt/rank_0`` converts pytorch_model.bin
    (restricted unpickler, no --allow-pickle) into ./ckpt/rank_0/wizardcoder.ckpt (before: refused twice)."""
    from mindformers_ext.convert import convert

    root, ref, seed_ckpt = seed_ckpt_dir
    ckpt = tmp_path / "ckpt"
    shutil.copytree(seed_ckpt, ckpt)
    (ckpt / "rank_0").mkdir()
    code, out, err = _subprocess(WIZARD_CONVERT, "--torch_path", "./ckpt", "--mindspore_path", "./ckpt/rank_0",
                                 cwd=tmp_path)
    assert code == 0, out + err
    written = ckpt / "rank_0" / "wizardcoder.ckpt"
    assert os.listdir(ckpt / "rank_0") == ["wizardcoder.ckpt"]
    expected = str(root / "expected.ckpt")
    convert(ref, expected, "wizardcoder", progress=False)
    got, want = ms.load_checkpoint(str(written)), ms.load_checkpoint(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name].asnumpy(), want[name].asnumpy(), err_msg=name)
    # the .bin itself as --torch_path (the seed script's own spelling) works too
    from research.wizardcoder.convert_weight import main as seed_convert

    assert seed_convert(["--torch_path", str(ckpt / "pytorch_model.bin"), "--mindspore_path",
                         str(tmp_path / "direct.ckpt"), "--no_progress"]) == 0
    direct = ms.load_checkpoint(str(tmp_path / "direct.ckpt"))
    for name in want:
        np.testing.assert_array_equal(direct[name].asnumpy(), want[name].asnumpy(), err_msg=name)


def test_arbitrary_pickles_still_need_allow_pickle(seed_ckpt_dir, tmp_path, capsys):
    """A .bin whose pickle needs more than a state dict (here os.system) is refused without running it,
    naming the global; .pt files need --allow-pickle as before."""
    import torch

    from mindformers_ext.convert import ConversionError, convert
    from mindformers_ext.convert.cli import main as convert_cli

    _, _, seed_ckpt = seed_ckpt_dir
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(seed_ckpt / "config.json", evil)
    state = torch.load(str(seed_ckpt / "pytorch_model.bin"), weights_only=True)
    state["transformer.payload"] = Payload()
    torch.save(state, str(evil / "pytorch_model.bin"))
    with pytest.raises(ConversionError) as info:
        convert(str(evil), str(tmp_path / "evil.ckpt"), "wizardcoder", progress=False)
    assert "posix.system" in str(info.value) and "--allow-pickle" in str(info.value)
    assert not marker.exists() and not os.path.exists(tmp_path / "evil.ckpt")
    pt = tmp_path / "pt"
    pt.mkdir()
    shutil.copy(seed_ckpt / "config.json", pt)
    shutil.copy(seed_ckpt / "pytorch_model.bin", pt / "model.pt")
    assert convert_cli(["--model", "wizardcoder", "--input_path", str(pt / "model.pt"), "--config",
                        str(pt / "config.json"), "--output_path", str(tmp_path / "pt.ckpt"), "--no_progress"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err
    assert convert_cli(["--model", "wizardcoder", "--input_path", str(pt / "model.pt"), "--config",
                        str(pt / "config.json"), "--output_path", str(tmp_path / "pt.ckpt"), "--no_progress",
                        "--allow-pickle"]) == 0


# ------------------------------------------------------------------------------ 5. bench docstrings
@pytest.mark.parametrize("name", ["decode", "train"])
def test_bench_docstrings_list_the_default_models(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    usage = module.__doc__.split(f"python bench/{name}.py ")[1].split("python bench/")[0]
    for model in module.CONFIGS:  # what runs without --models
        assert model in usage, (model, usage)
