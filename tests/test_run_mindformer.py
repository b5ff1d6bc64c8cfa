"""tools/run_mindformer.py: CLI, config building, the YAMLs, and finetune / resume / predict end to end.

End-to-end runs are subprocesses (as users run them) on the tiny CPU configs; finetune overrides the
vocabulary to 512 entries (``--model.model_config.vocab_size 512``) so that a step takes
milliseconds and each run is dominated by start-up.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mindformers_ext.runner.cli import parse_args, parse_scalar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "tools", "run_mindformer.py")
FINETUNE_TINY = os.path.join(REPO, "configs", "deepseek1_5", "finetune_tiny.yaml")
PREDICT_TINY = os.path.join(REPO, "configs", "deepseek1_5", "predict_tiny.yaml")
FINETUNE_7B = os.path.join(REPO, "research", "deepseek1_5", "finetune_deepseek_coder1_5_7b.yaml")
PREDICT_7B = os.path.join(REPO, "research", "deepseek1_5", "predict_deepseek_coder1_5_7b.yaml")
LOSS = re.compile(r"Epoch:\[\s*(\d+)/\s*(\d+)\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[([0-9.]+)/")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_flags_aliases_and_typed_overrides():
    args, overrides = parse_args([
        "--config", "x.yaml", "--run_mode", "finetune", "--train_data", "/d", "--use_parallel", "True",
        "--predict_data", "a b", "c", "--predict_length", "7", "--use_past", "false",
        "--runner_config.batch_size", "4", "--optimizer.eps=1e-8", "--lr_schedule.learning_rate", "2.e-5",
        "--model.model_config.eos_token_id", "[100015, 100001]", "--callbacks.0.prefix", "abc",
        "--context.save_graphs", "False", "--processor.tokenizer.unk_token", "None", "--parallel.x", "null"])
    assert args.train_dataset_dir == "/d" and args.use_parallel is True and args.use_past is False
    assert args.predict_data == ["a b", "c"] and args.predict_length == 7
    assert overrides == {"runner_config.batch_size": 4, "optimizer.eps": 1e-8, "lr_schedule.learning_rate": 2e-5,
                         "model.model_config.eos_token_id": [100015, 100001], "callbacks.0.prefix": "abc",
                         "context.save_graphs": False, "processor.tokenizer.unk_token": None, "parallel.x": None}
    assert parse_scalar("08") == 8 and parse_scalar("-3") == -3 and parse_scalar("1E3") == 1000.0
    assert parse_scalar("./out") == "./out" and parse_scalar("a=b") == "a=b"


def test_overrides_can_delete_keys_and_list_entries():
    """``__delete__`` removes a key or a list entry (e.g. an upstream callback MindFormers 1.9 lacks)."""
    from mindformers_ext.runner.config import ConfigError, apply_overrides

    config = {"callbacks": [{"type": "MFLossMonitor"}, {"type": "ObsMonitor"}, {"type": "CheckpointMonitor"}],
              "model": {"model_config": {"use_flash_attention": True, "seq_length": 8}}}
    _, overrides = parse_args(["--config", "x.yaml", "--callbacks.1", "__delete__",
                               "--model.model_config.use_flash_attention", "__delete__"])
    apply_overrides(config, overrides)
    assert [c["type"] for c in config["callbacks"]] == ["MFLossMonitor", "CheckpointMonitor"]
    assert config["model"]["model_config"] == {"seq_length": 8}
    with pytest.raises(ConfigError, match="no such key to delete"):
        apply_overrides(config, {"model.model_config.nope": "__delete__"})


def test_cli_errors_are_clear():
    with pytest.raises(SystemExit, match="override --a.b has no value"):
        parse_args(["--config", "x.yaml", "--a.b"])
    with pytest.raises(SystemExit, match="unexpected argument 'stray'"):
        parse_args(["--config", "x.yaml", "stray"])
    with pytest.raises(SystemExit):  # argparse: bad choice
        parse_args(["--config", "x.yaml", "--run_mode", "fit"])


def test_prompts_stops_and_checkpoint_resolution(tmp_path):
    from mindformers_ext.runner.predict import cut_at_stop, read_prompts, resolve_checkpoint_files

    assert read_prompts(["def f():\\n    return 1", "x"]) == ["def f():\n    return 1", "x"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n\n  \nb\\nc\n")
    assert read_prompts([str(prompts)]) == ["a", "b\nc"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompt in the file"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="--predict_data"):
        read_prompts(None)
    assert cut_at_stop("x = 1\ndef g", ["\ndef", "\nclass"]) == ("x = 1", True)
    assert cut_at_stop("x = 1", ["\ndef"]) == ("x = 1", False)
    rank = tmp_path / "ckpt" / "rank_0"
    rank.mkdir(parents=True)
    (rank / "a-1_10.ckpt").write_bytes(b"")
    os.utime(rank / "a-1_10.ckpt", (1, 1))
    (rank / "a-1_20.ckpt").write_bytes(b"")
    assert resolve_checkpoint_files(str(tmp_path / "ckpt")) == [str(rank / "a-1_20.ckpt")]
    shards = tmp_path / "st"
    shards.mkdir()
    for name in ("m-00002.safetensors", "m-00001.safetensors", "hyper_param.safetensors"):
        (shards / name).write_bytes(b"")
    assert [os.path.basename(f) for f in resolve_checkpoint_files(str(shards))] == ["m-00001.safetensors",
                                                                                     "m-00002.safetensors"]
    with pytest.raises(FileNotFoundError, match="no .ckpt or .safetensors"):
        resolve_checkpoint_files(str(tmp_path))


# ------------------------------------------------------------------------------------------- config
def _config(path, *argv):
    from mindformers_ext.runner.config import adapt_to_device, build_config

    args, overrides = parse_args(["--config", path, *argv])
    config = build_config(args, overrides)
    target = adapt_to_device(config, explicit_target=args.device_target is not None)
    return config, target


def test_config_run_mode_overrides_and_cpu_adaptation(tmp_path):
    from mindformers_ext.runner import register
    register()

    config, target = _config(FINETUNE_7B, "--run_mode", "finetune", "--use_parallel", "True",
                             "--gradient_accumulation_steps", "4", "--runner_config.batch_size", "2",
                             "--optimizer.weight_decay", "0.1", "--output_dir", str(tmp_path))
    assert target == "CPU" and config.context.device_target == "CPU"
    assert config.runner_wrapper.type == "PortableTrainOneStepCell"  # MFTrainOneStepCell needs NPU ops
    assert config.runner_wrapper.scale_sense.type == "DynamicLossScaleUpdateCell"  # kept
    # accumulation moves into the wrapper (MindFormers drops it outside semi-auto parallel)
    assert config.runner_wrapper.gradient_accumulation_steps == 4
    assert config.runner_config.batch_size == 8 and config.runner_config.gradient_accumulation_steps == 1
    assert config.parallel.parallel_mode == 0  # semi-auto parallel does not compile on CPU
    assert config.optimizer.weight_decay == 0.1 and config.optimizer.type == "PortableAdamW"  # fused on CPU
    # the same YAML in predict mode (run_mode is applied before MindFormers' template)
    config, _ = _config(FINETUNE_7B, "--run_mode", "predict", "--use_past", "True")
    assert config.processor.tokenizer.type == "DeepSeekCoderTokenizer"
    assert config.model.model_config.use_past is True
    assert config.model.model_config.compute_dtype == "float32"  # bfloat16 kernels are missing on CPU


def test_config_errors_name_file_and_key(tmp_path):
    from mindformers_ext.runner.config import ConfigError

    with pytest.raises(ConfigError, match=r"finetune_tiny.yaml: override --modle.model_config.x: 'modle' is not a"):
        _config(FINETUNE_TINY, "--modle.model_config.x", "1")
    with pytest.raises(ConfigError, match="load_checkpoint '/nonexistent.ckpt' does not exist"):
        _config(FINETUNE_TINY, "--load_checkpoint", "/nonexistent.ckpt")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_mode: finetune\nrunner_config:\n  batch_size: 1\n  bacth: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*unexpected key: bacth"):
        _config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        _config(str(tmp_path / "missing.yaml"))
    safetensors = tmp_path / "w.safetensors"
    safetensors.write_bytes(b"")
    config, _ = _config(FINETUNE_TINY, "--load_checkpoint", str(safetensors))
    assert config.load_ckpt_format == "safetensors"


def _model_from_yaml(path, device_num):
    """Skeleton of the YAML's model with its parallel_config (no weights allocated)."""
    from mindformers.tools.register import MindFormerConfig
    from mindformers_ext.parallel import build_skeleton, check_parallel
    from research.deepseek1_5 import DeepSeekCoderConfig, DeepSeekCoderForCausalLM

    yaml_cfg = MindFormerConfig(path)
    fields = {k: v for k, v in yaml_cfg.model.model_config.items() if k != "type"}
    parallel = {k: yaml_cfg.parallel_config[k] for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                                           "micro_batch_num", "vocab_emb_dp")}
    config = DeepSeekCoderConfig(**fields, parallel_config=parallel)
    return yaml_cfg, check_parallel(build_skeleton(DeepSeekCoderForCausalLM, config), device_num)


def test_full_size_yaml_layouts_pass_the_static_parallel_check():
    """Finetune: 8 devices, dp 1 x mp 8 (the seed's layout); predict: 2 devices, dp 1 x mp 2."""
    from mindformers_ext import load_families
    load_families()  # our classes in MindFormers' registry

    finetune, summary = _model_from_yaml(FINETUNE_7B, 8)
    assert "dp=1 mp=8 pp=1" in summary[0]
    predict, summary = _model_from_yaml(PREDICT_7B, 2)
    assert "dp=1 mp=2 pp=1" in summary[0]
    ft, pr = finetune.model.model_config, predict.model.model_config
    # shapes are the 7B v1.5 preset's, the same in both files; no seed bug (rms 1e-8, pad 32014)
    from research.deepseek1_5 import PRESETS

    for key, value in PRESETS["deepseek-coder-7b-v1.5"].items():
        if key not in ("eos_token_id",):
            assert ft[key] == value == pr[key] if key in pr else ft[key] == value, key
    assert ft.rms_norm_eps == pr.rms_norm_eps == 1e-6
    assert ft.seq_length == pr.seq_length == 4096 and ft.pad_token_id == pr.pad_token_id == 100001
    assert ft.eos_token_id == 100001 and list(pr.eos_token_id) == [100015, 100001]
    assert predict.processor.tokenizer.eos_token == "<|EOT|>"


# ---------------------------------------------------------------------------------- end to end runs
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("LOG_MF_PATH", None)  # each run logs under its output_dir
    env.setdefault("GLOG_v", "3")
    return env


def _run(*argv, cwd, timeout=300):
    result = subprocess.run([sys.executable, RUN, *argv], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def write_tiny_mindrecord(path, samples, seq_length, seed=0, vocab=50):
    """Learnable samples of seq_length + 1 tokens: runs of consecutive ids (10 .. 10 + vocab, wrapping),
    from random starts; the first three labels (a "prompt") are masked."""
    from mindspore.mindrecord import FileWriter

    rng = np.random.default_rng(seed)
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}},
                      "tiny")
    rows = []
    for _ in range(samples):
        start = rng.integers(0, vocab)
        ids = ((start + np.arange(seq_length + 1)) % vocab + 10).astype(np.int32)
        labels = ids.copy()
        labels[:3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    writer.write_raw_data(rows)
    writer.commit()
    return str(path)


def _losses(output):
    return [(int(m.group(1)), int(m.group(3)), float(m.group(5))) for m in LOSS.finditer(output)]


def _latest_ckpt(out_dir, rank=0):
    import mindspore as ms

    files = glob.glob(os.path.join(out_dir, "checkpoint", f"rank_{rank}", "*.ckpt"))
    assert files, f"no checkpoint under {out_dir}"
    loaded = [(int(ms.load_checkpoint(f, choice_func=lambda n: n == "step_num")["step_num"].asnumpy()), f)
              for f in files]
    return ms.load_checkpoint(max(loaded)[1])


FINETUNE_ARGS = ("--config", FINETUNE_TINY, "--run_mode", "finetune", "--model.model_config.vocab_size", "512",
                 "--callbacks.1.save_checkpoint_steps", "10")


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return root, write_tiny_mindrecord(root / "train.mindrecord", samples=40, seq_length=32)


def test_finetune_learns_and_resume_continues_exactly(finetune_data):
    """20 steps: loss falls, checkpoints written. Resuming them for a second epoch (steps 21-40)
    ends with the same weights and Adam moments as one uninterrupted 40-step run, which holds only
    if the step counter, optimizer state and data position were all restored."""
    root, data = finetune_data
    first = root / "first"
    out = _run(*FINETUNE_ARGS, "--train_data", data, "--output_dir", str(first), "--epochs", "1", cwd=root)
    assert "using PortableTrainOneStepCell" not in out  # the tiny YAML selects it itself
    losses = _losses(out)
    assert [s for _, s, _ in losses] == list(range(1, 21))
    values = [v for _, _, v in losses]
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 1.0, values
    saved = _latest_ckpt(str(first))
    assert int(saved["step_num"].asnumpy()) == 20 and int(saved["global_step"].asnumpy()[0]) == 20
    assert any(name.startswith("adam_m.") for name in saved)

    # run_mode eval on the checkpoint: the loss is the trained one, not the initial one
    evaluated = root / "eval"
    _run(*FINETUNE_ARGS[:3], "eval", *FINETUNE_ARGS[4:], "--eval_dataset_dir", data, "--load_checkpoint",
         str(first / "checkpoint"), "--output_dir", str(evaluated), cwd=root)
    result = json.loads((evaluated / "eval_results.json").read_text())
    assert result["batches"] == 40 and result["loss"] < values[0] - 1.0
    assert result["PPL"] == pytest.approx(np.exp(result["loss"]))

    resumed = _run(*FINETUNE_ARGS, "--train_data", data, "--output_dir", str(first), "--epochs", "2",
                   "--resume_training", "True", "--load_checkpoint", str(first / "checkpoint"), cwd=root)
    steps = _losses(resumed)
    assert steps and all(epoch == 2 for epoch, _, _ in steps) and len(steps) == 20, steps[:3]
    assert steps[0][2] < values[0] - 1.0  # starts from the trained weights, not from scratch
    after = _latest_ckpt(str(first))
    assert int(after["step_num"].asnumpy()) == 40 and int(after["global_step"].asnumpy()[0]) == 40

    straight = root / "straight"
    _run(*FINETUNE_ARGS, "--train_data", data, "--output_dir", str(straight), "--epochs", "2", cwd=root)
    reference = _latest_ckpt(str(straight))
    for name, value in reference.items():
        if name.startswith(("model.", "lm_head", "adam_m.", "adam_v.")):
            np.testing.assert_allclose(after[name].asnumpy(), value.asnumpy(), rtol=2e-4, atol=2e-6, err_msg=name)


def _hf_tiny_deepseek(path):
    """A tiny random HF Llama with predict_tiny.yaml's shapes, its LM head scaled up so that greedy
    choices are not near-ties (MindSpore and torch round differently)."""
    import torch
    import transformers
    from conftest import make_tiny_llama
    from mindformers.tools.register import MindFormerConfig

    mc = MindFormerConfig(PREDICT_TINY).model.model_config
    make_tiny_llama(str(path), seed=3, vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                    intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
                    num_attention_heads=mc.num_heads, num_key_value_heads=mc.n_kv_heads,
                    max_position_embeddings=mc.max_position_embedding, rope_theta=mc.theta,
                    rms_norm_eps=mc.rms_norm_eps, bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_id[1],
                    pad_token_id=mc.pad_token_id)
    model = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(str(path), safe_serialization=True)
    return model, list(mc.eos_token_id), mc.pad_token_id


def test_predict_matches_hf_generate(tmp_path):
    """A checkpoint converted from a tiny HF model: run_mindformer predict (KV cache, a batch of two
    prompts of different lengths; and without cache) gives HF generate's tokens and text."""
    import torch
    import transformers
    from mindformers_ext.tokenizers import tokenizer_path

    hf_dir = tmp_path / "hf"
    model, eos, pad = _hf_tiny_deepseek(hf_dir)
    ckpt = tmp_path / "tiny.ckpt"
    conv = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weight.py"), "--model", "deepseek",
                           "--input_path", str(hf_dir), "--output_path", str(ckpt), "--no_progress"],
                          env={**_env(), "LOG_MF_PATH": str(tmp_path / "log")}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def quick_sort(arr):\\n    if len(arr) <= 1:\n\nprint('hi')\n", encoding="utf-8")
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json"))
    for use_past, batch, length in (("True", "2", "12"), ("False", "1", "9")):
        out_dir = tmp_path / f"out_{use_past}"
        out = _run("--config", PREDICT_TINY, "--load_checkpoint", str(ckpt), "--predict_data", str(prompts),
                   "--predict_length", length, "--use_past", use_past, "--predict_batch_size", batch,
                   "--output_dir", str(out_dir), cwd=tmp_path)
        assert "text_generation_text" in out
        rows = [json.loads(line) for line in (out_dir / "predict_results.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["def quick_sort(arr):\n    if len(arr) <= 1:", "print('hi')"]
        for row in rows:
            assert row["prompt_ids"][0] == 100000  # BOS
            with torch.no_grad():
                hf = model.generate(torch.tensor([row["prompt_ids"]]), max_new_tokens=int(length), do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad)
            hf_new = hf[0, len(row["prompt_ids"]):].tolist()
            assert row["ids"] == hf_new, (use_past, row["prompt"])
            assert len(row["ids"]) == int(length) or row["ids"][-1] in eos  # --predict_length took effect
            assert row["text"] == hf_tok.decode(hf_new, skip_special_tokens=True)


def test_api_build_generator_subprocess(tmp_path):
    """mindformers_ext.api.build_generator: prompts in, new text out (random weights on request, seeded)."""
    code = ("import json, sys\n"
            "from mindformers_ext.api import build_generator\n"
            f"g = build_generator({PREDICT_TINY!r}, None, random_weights=True, max_new_tokens=4, use_past=True,\n"
            "                    do_sample=False,\n"
            "                    top_k=0, top_p=0.95, temperature=1.0, seed=None, stop_strings=['\\ndef'])\n"
            "a = g(['def f(x):', 'import os'])\n"
            "b = g.generator.generate(['def f(x):'], use_past=False)\n"
            "print('RESULT', json.dumps([a, b[0].text, len(b[0].ids)]))\n")
    env = _env()
    env["LOG_MF_PATH"] = str(tmp_path / "log")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
    texts, text_no_cache, count = json.loads(line[len("RESULT "):])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert text_no_cache == texts[0] and count == 4  # cache on / off agree
    assert "randomly initialised weights" in result.stderr  # warned on every run


def test_register_path_imports_and_registers(tmp_path, monkeypatch):
    """--register_path: modules in the directory are imported, so their registered classes resolve."""
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mindformers_ext.runner.main import register_path

    pkg = tmp_path / "extra"
    pkg.mkdir()
    (pkg / "my_tiny_coder.py").write_text(
        "from mindformers.tools.register import MindFormerModuleType, MindFormerRegister\n"
        "from research.deepseek1_5 import DeepSeekCoderForCausalLM\n\n\n"
        "@MindFormerRegister.register(MindFormerModuleType.MODELS)\n"
        "class MyTinyCoderForTest(DeepSeekCoderForCausalLM):\n"
        "    pass\n")
    (pkg / "broken.txt").write_text("not python")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("REGISTER_PATH", raising=False)
    assert register_path(str(pkg)) == ["my_tiny_coder"]
    assert os.environ["REGISTER_PATH"] == str(pkg)
    assert MindFormerRegister.is_exist(MindFormerModuleType.MODELS, "MyTinyCoderForTest")
    (pkg / "bad_module.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SystemExit, match=r"bad_module.py failed: RuntimeError: boom"):
        register_path(str(pkg))
    monkeypatch.delitem(sys.modules, "my_tiny_coder")


def test_freeze_gc_heap_collects_garbage_cycles_before_freezing_the_live_objects():
    """``freeze_gc_heap`` (called before graphs compile) must not make garbage permanent: a reference
    cycle already unreachable is freed, while objects still alive move to the frozen generation."""
    import gc
    import weakref

    from mindformers_ext.runner.context import freeze_gc_heap

    class Node:
        other = None

    alive = [Node() for _ in range(100)]
    gc.disable()  # only freeze_gc_heap's own collection may free the cycle
    try:
        first, second = Node(), Node()
        first.other, second.other = second, first
        garbage = weakref.ref(first)
        del first, second
        frozen = gc.get_freeze_count()
        freeze_gc_heap()
    finally:
        gc.enable()
    assert garbage() is None, "an unreachable reference cycle was frozen instead of collected"
    assert gc.get_freeze_count() >= frozen + len(alive)
