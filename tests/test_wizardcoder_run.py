"""run_wizardcoder.py (the seed's CLI, sharing tools/run_mindformer.py's code) end to end on the tiny
CPU configs: finetune on preprocessed Alpaca data lowers the loss; predict through both scripts gives
HF generate's tokens and text on a converted checkpoint.

End-to-end runs are subprocesses, as users run them.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from wizardcoder_util import REPO, make_tiny_bigcode

RUN_WIZARDCODER = os.path.join(REPO, "research", "wizardcoder", "run_wizardcoder.py")
RUN_MINDFORMER = os.path.join(REPO, "tools", "run_mindformer.py")
FINETUNE_TINY = os.path.join(REPO, "configs", "wizardcoder", "finetune_tiny.yaml")
PREDICT_TINY = os.path.join(REPO, "configs", "wizardcoder", "predict_tiny.yaml")
LOSS = re.compile(r"Epoch:\[\s*(\d+)/\s*(\d+)\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[([0-9.]+)/")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LOG_MF_PATH", None)  # each run logs under its output_dir
    env.setdefault("GLOG_v", "3")
    return env


def _run(script, *argv, cwd, timeout=300, **env):
    result = subprocess.run([sys.executable, script, *argv], cwd=cwd, env={**_env(), **env}, capture_output=True,
                            text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_translate_seed_flags():
    from research.wizardcoder.run_wizardcoder import translate

    argv, args = translate(["--config", PREDICT_TINY, "--run_mode", "predict", "--use_parallel", "False",
                            "--load_checkpoint", "w.ckpt", "--train_dataset", "d", "--device_id", "3",
                            "--optimizer_parallel", "True", "--vocab_file", "v.json", "--merge_file", "m.txt",
                            "--use_past", "True", "--model.model_config.top_k", "1"])
    assert argv[:2] == ["--config", PREDICT_TINY]
    pairs = dict(zip(argv[2::2], argv[3::2]))
    assert pairs["--run_mode"] == "predict" and pairs["--load_checkpoint"] == "w.ckpt"
    assert pairs["--train_dataset_dir"] == "d" and pairs["--device_id"] == "3" and pairs["--use_parallel"] == "False"
    assert pairs["--parallel.enable_parallel_optimizer"] == "True"
    assert pairs["--processor.tokenizer.vocab_file"] == "v.json"
    assert pairs["--processor.tokenizer.merge_file"] == "m.txt"
    assert pairs["--use_past"] == "True" and pairs["--model.model_config.top_k"] == "1"  # passed through
    assert args.prompt_template == "alpaca"
    with pytest.raises(SystemExit, match="pet_method 'lora'"):
        translate(["--pet_method", "lora"])


def test_finetune_on_preprocessed_alpaca_lowers_the_loss(tmp_path):
    """wizardcoder_preprocess.py (shipped tokenizer, Alpaca template) -> MindRecord -> run_wizardcoder.py
    --run_mode finetune --train_data: 16 steps on 8 records, the loss falls and checkpoints appear. RUN_MODE=predict
    left in the environment (inference scripts export it; MindFormers' Trainer then skips its batch set-up and
    fails at the first logged step) does not change the run's mode."""
    from research.wizardcoder.wizardcoder_preprocess import main as preprocess

    records = [{"instruction": f"Return the number {i}.", "input": "" if i % 2 else "no arguments",
                "output": f"def f():\n    return {i}"} for i in range(8)]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    data = str(tmp_path / "train.mindrecord")
    stats = preprocess(["--input_glob", str(tmp_path / "alpaca.jsonl"), "--output_file", data, "--seq_length", "128"])
    assert stats.written == 8
    out = _run(RUN_WIZARDCODER, "--config", FINETUNE_TINY, "--run_mode", "finetune", "--train_data", data,
               "--output_dir", str(tmp_path / "out"), "--epochs", "4", cwd=tmp_path, RUN_MODE="predict")
    losses = [float(m.group(5)) for m in LOSS.finditer(out)]
    assert len(losses) == 16, out[-3000:]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses
    assert any(name.endswith(".ckpt") for name in os.listdir(tmp_path / "out" / "checkpoint" / "rank_0"))


def _hf_tiny_wizardcoder(path):
    """A tiny random HF GPT-BigCode with predict_tiny.yaml's shapes (sharper logits: init std 0.1)."""
    import transformers
    from mindformers.tools.register import MindFormerConfig

    mc = MindFormerConfig(PREDICT_TINY).model.model_config
    make_tiny_bigcode(str(path), seed=3, vocab_size=mc.vocab_size, n_embd=mc.hidden_size, n_layer=mc.num_layers,
                      n_head=mc.num_heads, n_inner=mc.intermediate_size, n_positions=mc.n_position,
                      multi_query=mc.multi_query, activation_function=mc.hidden_act, bos_token_id=mc.bos_token_id,
                      eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id, initializer_range=0.1)
    return transformers.GPTBigCodeForCausalLM.from_pretrained(str(path)).eval(), mc.eos_token_id


def test_predict_through_both_scripts_matches_hf(tmp_path):
    """A checkpoint converted from a tiny HF model: run_wizardcoder.py (Alpaca template, KV cache, a batch
    of two prompts of different lengths) and run_mindformer.py (raw prompt, no cache) give HF generate's
    tokens and text. The checkpoint also converts back to HF with our YAML as the config."""
    import torch
    import transformers
    from mindformers_ext.convert import convert
    from mindformers_ext.data.templates import get_template
    from mindformers_ext.tokenizers import tokenizer_path

    model, eos = _hf_tiny_wizardcoder(tmp_path / "hf")
    ckpt = str(tmp_path / "tiny.ckpt")
    convert(str(tmp_path / "hf"), ckpt, "wizardcoder", progress=False)
    back = str(tmp_path / "hf_back")
    convert(ckpt, back, "wizardcoder", progress=False, reverse=True, config=PREDICT_TINY)
    reloaded = transformers.GPTBigCodeForCausalLM.from_pretrained(back).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name

    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tokenizer_path("wizardcoder"), "tokenizer.json"))
    instructions = ["Write a function that reverses a string.", "Add two numbers."]
    template = get_template("alpaca")
    runs = (
        (RUN_WIZARDCODER, [template.render_prompt(i) for i in instructions], instructions,
         ["--use_past", "True", "--predict_batch_size", "2", "--predict_length", "12"]),
        (RUN_MINDFORMER, ["def quick_sort(arr):\n    if len(arr) <= 1:"],
         ["def quick_sort(arr):\\n    if len(arr) <= 1:"], ["--use_past", "False", "--predict_length", "9"]),
    )
    for script, prompts, given, flags in runs:
        out_dir = tmp_path / os.path.basename(script)
        out = _run(script, "--config", PREDICT_TINY, "--run_mode", "predict", "--load_checkpoint", ckpt,
                   "--predict_data", *given, "--output_dir", str(out_dir), *flags, cwd=tmp_path)
        assert "text_generation_text" in out
        rows = [json.loads(line) for line in (out_dir / "predict_results.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == prompts
        length = int(flags[-1])
        for row in rows:
            assert row["prompt_ids"] == hf_tok.encode(row["prompt"])
            with torch.no_grad():
                hf = model.generate(torch.tensor([row["prompt_ids"]]), max_new_tokens=length, do_sample=False,
                                    eos_token_id=eos, pad_token_id=model.config.pad_token_id)
            hf_new = hf[0, len(row["prompt_ids"]):].tolist()
            assert row["ids"] == hf_new, (script, row["prompt"])
            assert len(row["ids"]) == length or row["ids"][-1] == eos  # --predict_length took effect
            assert row["text"] == hf_tok.decode(hf_new, skip_special_tokens=True)
