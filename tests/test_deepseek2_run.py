"""DeepSeek-V2 through tools/run_mindformer.py on the tiny CPU configs: finetune learns, predict = HF text.

Runs are subprocesses, as users run them.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "tools", "run_mindformer.py")
FINETUNE_TINY = os.path.join(REPO, "configs", "deepseek2", "finetune_tiny.yaml")
PREDICT_TINY = os.path.join(REPO, "configs", "deepseek2", "predict_tiny.yaml")
LOSS = re.compile(r"step:\[\s*(\d+)/\s*\d+\], loss:\[([0-9.]+)/")


def _env(tmp_path=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("LOG_MF_PATH", None)  # each run logs under its output_dir
    if tmp_path is not None:
        env["LOG_MF_PATH"] = str(tmp_path / "log")
    env.setdefault("GLOG_v", "3")
    return env


def _run(*argv, cwd, timeout=300):
    result = subprocess.run([sys.executable, RUN, *argv], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _mindrecord(path, samples, seq_length, vocab=50, seed=0):
    """Learnable samples of seq_length + 1 tokens (runs of consecutive ids); the first 3 labels masked."""
    from mindspore.mindrecord import FileWriter

    rng = np.random.default_rng(seed)
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}},
                      "tiny")
    rows = []
    for _ in range(samples):
        ids = ((rng.integers(0, vocab) + np.arange(seq_length + 1)) % vocab + 10).astype(np.int32)
        labels = ids.copy()
        labels[:3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    writer.write_raw_data(rows)
    writer.commit()
    return str(path)


def test_finetune_lowers_the_loss(tmp_path):
    """20 steps of the tiny MoE model (dense + DeepSeekMoE layer, aux loss on): the loss falls and a
    checkpoint with the stacked experts and their Adam moments is written."""
    import mindspore as ms

    data = _mindrecord(tmp_path / "train.mindrecord", samples=40, seq_length=32)
    out = _run("--config", FINETUNE_TINY, "--run_mode", "finetune", "--model.model_config.vocab_size", "512",
               "--train_data", data, "--output_dir", str(tmp_path / "out"), "--epochs", "1",
               "--callbacks.1.save_checkpoint_steps", "20", cwd=tmp_path)
    losses = [float(m.group(2)) for m in LOSS.finditer(out)]
    assert len(losses) == 20, out[-3000:]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    ckpts = sorted((tmp_path / "out" / "checkpoint" / "rank_0").glob("*.ckpt"))
    saved = ms.load_checkpoint(str(ckpts[-1]))
    assert tuple(saved["model.layers.1.feed_forward.ffn.w1"].shape) == (8, 24, 64)
    assert "adam_m.model.layers.1.feed_forward.ffn.w1" in saved


def test_predict_matches_hf_generate(tmp_path):
    """A tiny HF DeepseekV2ForCausalLM with predict_tiny.yaml's shapes, converted with
    tools/convert_weight.py: run_mindformer predict (latent KV cache, two prompts of different
    lengths in one batch) gives HF generate's tokens and text."""
    import torch
    import transformers
    from mindformers.tools.register import MindFormerConfig
    from mindformers_ext.tokenizers import tokenizer_path

    mc = MindFormerConfig(PREDICT_TINY).model.model_config
    hf_cfg = transformers.DeepseekV2Config(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, q_lora_rank=mc.q_lora_rank,
        kv_lora_rank=mc.kv_lora_rank, qk_nope_head_dim=mc.qk_nope_head_dim, qk_rope_head_dim=mc.qk_rope_head_dim,
        v_head_dim=mc.v_head_dim, n_routed_experts=mc.n_routed_experts, n_shared_experts=mc.n_shared_experts,
        num_experts_per_tok=mc.num_experts_per_tok, moe_intermediate_size=mc.moe_intermediate_size,
        first_k_dense_replace=mc.first_k_dense_replace, topk_method=mc.topk_method, n_group=mc.n_group,
        topk_group=mc.topk_group, routed_scaling_factor=mc.routed_scaling_factor,
        max_position_embeddings=mc.max_position_embeddings, rope_theta=mc.theta, rms_norm_eps=mc.rms_norm_eps,
        bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id)
    torch.manual_seed(5)
    model = transformers.DeepseekV2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # decisive greedy choices and routing (no near-ties between rounding orders)
        model.lm_head.weight.mul_(40.0)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "tiny.ckpt"
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    conv = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weight.py"), "--model", "deepseek2",
                           "--input_path", str(hf_dir), "--output_path", str(ckpt), "--no_progress"],
                          env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def quick_sort(arr):\\n    if len(arr) <= 1:\n\nprint('hi')\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    length = 12
    out = _run("--config", PREDICT_TINY, "--load_checkpoint", str(ckpt), "--predict_data", str(prompts),
               "--predict_length", str(length), "--use_past", "True", "--predict_batch_size", "2",
               "--output_dir", str(out_dir), cwd=tmp_path)
    assert "text_generation_text" in out
    rows = [json.loads(line) for line in (out_dir / "predict_results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def quick_sort(arr):\n    if len(arr) <= 1:", "print('hi')"]
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json"))
    for row in rows:
        assert row["prompt_ids"][0] == 100000  # BOS
        with torch.no_grad():
            hf = model.generate(torch.tensor([row["prompt_ids"]]), max_new_tokens=length, do_sample=False,
                                eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id)
        hf_new = hf[0, len(row["prompt_ids"]):].tolist()
        assert row["ids"] == hf_new, row["prompt"]
        assert row["text"] == hf_tok.decode(hf_new, skip_special_tokens=True)


def test_finetune_with_capacity_factor_logs_the_dropped_assignments(tmp_path):
    """capacity_factor 1 (upstream's moe_config key): each step routes batch 2 x 32 tokens x top-2 = 128
    assignments through the MoE layer; those over an expert's capacity are dropped, counted and logged."""
    data = _mindrecord(tmp_path / "train.mindrecord", samples=8, seq_length=32)
    out = _run("--config", FINETUNE_TINY, "--run_mode", "finetune", "--model.model_config.vocab_size", "512",
               "--model.model_config.capacity_factor", "1.0", "--train_data", data,
               "--output_dir", str(tmp_path / "out"), "--epochs", "1", cwd=tmp_path)
    logged = re.findall(r"MoE capacity_factor: dropped (\d+) of (\d+) routed token-expert assignments "
                        r"\(([0-9.]+)%\) in steps (\d+)-(\d+)", out)
    assert [(int(first), int(last)) for *_, first, last in logged] == [(s, s) for s in range(1, 5)], out[-3000:]
    assert all(int(routed) == 128 and 0 < int(dropped) < 128 for dropped, routed, *_ in logged), logged
    assert len([float(m.group(2)) for m in LOSS.finditer(out)]) == 4
