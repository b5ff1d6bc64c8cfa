"""Greedy decode speed: our MindSpore model vs HF transformers (torch, sdpa) on the same weights.

Prints one JSON line per (model, batch): tokens/s of both and ours / HF. Both run in this process,
one after the other, on the same random prompts; each side is warmed up first (graph compile).
Default one thread per framework: with more, MindSpore's and torch's thread pools share the process
and the cores, and torch's timings collapse (HF tiny decode fell from 470 to 12.5 tokens/s), which
would flatter our ratio. Pass --threads 2 to see that configuration.

    python bench/decode.py                 # every model below, batch 1 and 8, 128 new tokens:
                                           # tiny, llama-150m (Llama), bigcode-tiny, bigcode-150m (GPT-BigCode),
                                           # ds2-tiny, ds2-moe-150m (DeepSeek-V2: MLA latent cache, MoE)
    python bench/decode.py --models bigcode-tiny bigcode-150m
    python bench/decode.py --models ds2-tiny ds2-moe-150m    # DeepSeek-V2 (MLA latent cache, MoE)
    python bench/decode.py --models tiny --batches 1 --new_tokens 32
    python bench/decode.py --models llama-150m --batches 1 --quant w8a16   # + our W8A16 model on the same weights

Each line also gives the weight bytes one decode step reads per token (``*_weight_bytes_per_token``:
every stored parameter, int8 and scales counted as stored, divided by the batch, except the input
embedding rows (a gather) and the routed experts, of which each token reads k of E). With
``--quant w8a16`` our W8A16 model (:func:`mindformers_ext.quant.quantize_model`) is timed too, and
``w8a16_same_ids_fraction`` is the fraction of its new tokens equal to our float32 model's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_bench_logs"))
os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
    "llama-150m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16),
}
# GPT-BigCode (WizardCoder / StarCoder architecture): multi-query attention, learned positions, tied LM head
BIGCODE_CONFIGS = {
    "bigcode-tiny": dict(vocab_size=160, n_embd=64, n_layer=2, n_head=4),
    "bigcode-150m": dict(vocab_size=49152, n_embd=1024, n_layer=10, n_head=16),  # 158M parameters
}
CONFIGS.update(BIGCODE_CONFIGS)
# DeepSeek-V2 (MLA + DeepSeekMoE): HF DeepseekV2Config fields. "ds2-tiny" has the tests' "full" structure (low-rank q,
# a dense layer then MoE layers, group-limited routing); "ds2-moe-150m": 153M parameters (16 routed experts of
# which 4 per token + 1 shared, so ~65M active per token)
DS2_CONFIGS = {
    "ds2-tiny": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=24,
                     first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                     routed_scaling_factor=2.5),
    "ds2-moe-150m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                         num_attention_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                         qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
                         num_experts_per_tok=4, moe_intermediate_size=448, first_k_dense_replace=1,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.0),
}
CONFIGS.update(DS2_CONFIGS)


def build_hf_bigcode(name: str, path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTBigCodeConfig(n_positions=2048, multi_query=True, activation_function="gelu",
                                           bos_token_id=0, eos_token_id=0, pad_token_id=0, **BIGCODE_CONFIGS[name])
    transformers.GPTBigCodeForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return transformers.GPTBigCodeForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def build_hf_ds2(name: str, path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                           pad_token_id=0, **DS2_CONFIGS[name])
    model = transformers.DeepseekV2ForCausalLM(config)
    with torch.no_grad():  # HF leaves the router at N(0, 0.02): near-uniform routing; make it decisive
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    return transformers.DeepseekV2ForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def build_hf(name: str, path: str):
    import torch
    import transformers

    if name in BIGCODE_CONFIGS:
        return build_hf_bigcode(name, path)
    if name in DS2_CONFIGS:
        return build_hf_ds2(name, path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, **CONFIGS[name])
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def time_hf(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - start
    return elapsed, out[:, prompts.shape[1]:].numpy()


def weight_bytes_per_token(model, batch: int) -> int:
    """Bytes of stored weights one decode step reads, per token (see the module docstring)."""
    from mindformers_ext.layers.moe import RoutedExperts

    routed = {}  # parameter name -> fraction of it a token reads (k of E experts)
    for _, cell in model.cells_and_names():
        if isinstance(cell, RoutedExperts):
            for param in cell.get_parameters():
                routed[param.name] = cell.top_k / cell.num_experts
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    total = 0.0
    for param in model.get_parameters():
        nbytes = int(np.prod(param.shape)) * np.dtype(param.asnumpy().dtype).itemsize
        if "embedding" in param.name and not (tied and param.name.endswith(("embedding_weight", "embedding_table"))
                                              and "position" not in param.name):
            continue  # an embedding lookup reads one row per token
        total += nbytes * routed[param.name] if param.name in routed else nbytes / batch
    return int(total)


def time_ours(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
    batch = prompts.tolist()
    model.generate(batch, max_new_tokens=4, eos_token_id=[])
    start = time.perf_counter()
    out = model.generate(batch, max_new_tokens=new_tokens, eos_token_id=[])
    elapsed = time.perf_counter() - start
    return elapsed, np.array([row[prompts.shape[1]:] for row in out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per framework (default 1: see the module docstring)")
    parser.add_argument("--quant", choices=("w8a16",), default=None,
                        help="also time our model with this weight quantization (same weights)")
    args = parser.parse_args()

    import mindspore as ms
    import torch

    ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=args.threads)
    ms.set_device("CPU")
    torch.set_num_threads(args.threads)
    from mindformers_ext import load_hf_model

    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            hf = build_hf(name, tmp)
            ours = load_hf_model(tmp, use_past=True, seq_length=2048)
            quantized = load_hf_model(tmp, use_past=True, seq_length=2048, quant=args.quant) if args.quant else None
        rng = np.random.RandomState(0)
        for batch in args.batches:
            prompts = rng.randint(3, CONFIGS[name]["vocab_size"], size=(batch, args.prompt_len))
            ours_s, ours_ids = time_ours(ours, prompts, args.new_tokens)
            hf_s, hf_ids = time_hf(hf, prompts, args.new_tokens)
            tokens = batch * args.new_tokens
            line = {
                "bench": "decode", "model": name, "batch": batch, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "threads": args.threads,
                "ours_tokens_per_s": round(tokens / ours_s, 2), "hf_tokens_per_s": round(tokens / hf_s, 2),
                "ratio_ours_over_hf": round(hf_s / ours_s, 3),
                "same_ids": bool(np.array_equal(ours_ids, hf_ids)),
                "ours_weight_bytes_per_token": weight_bytes_per_token(ours, batch),
            }
            if quantized is not None:
                quant_s, quant_ids = time_ours(quantized, prompts, args.new_tokens)
                line.update({
                    f"ours_{args.quant}_tokens_per_s": round(tokens / quant_s, 2),
                    f"ratio_{args.quant}_over_hf": round(hf_s / quant_s, 3),
                    f"ratio_{args.quant}_over_ours_float": round(ours_s / quant_s, 3),
                    f"{args.quant}_same_ids_fraction": round(float(np.mean(quant_ids == ours_ids)), 4),
                    f"ours_{args.quant}_weight_bytes_per_token": weight_bytes_per_token(quantized, batch),
                })
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
