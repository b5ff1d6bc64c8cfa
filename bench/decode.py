"""Greedy decode speed: our MindSpore model vs HF transformers (torch, sdpa) on the same weights.

Prints one JSON line per (model, batch): tokens/s of both and ours / HF. Both run in this process,
one after the other, on the same random prompts; each side is warmed up first (graph compile).
``ours`` is ``generate(..., cache_implementation="static")`` (one static decode graph for the shape,
as HF's static cache) and ``ours_dynamic`` the default one dynamic-shape graph for every shape.
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
    python bench/decode.py --models llama-150m bigcode-150m --qkv_concat     # + our model with fused q/k/v, gate/up
    python bench/decode.py --models llama-150m --batches 1 --prompt_len 1024 --new_tokens 64   # long context

Each line also gives the weight bytes one decode step reads per token (``*_weight_bytes_per_token``:
every stored parameter, int8 and scales counted as stored, divided by the batch, except the input
embedding rows (a gather) and the routed experts, of which each token reads k of E) and the weight
bandwidth each side achieves in the decode steps (``*_weight_gb_per_s``: that x batch x steps/s, the
steps timed without the prefill, whose seconds are ``*_prefill_s``), next to what one thread can read
from memory on this machine (``read_limit_gb_per_s``, a large numpy sum) and the fraction of it
achieved (``*_fraction_of_read_limit``). The KV cache's reads are not counted: at a long
``--prompt_len`` (``--prompt_len 1024 --new_tokens 64``) they add to the weights'. With
``--quant w8a16`` our W8A16 model (:func:`mindformers_ext.quant.quantize_model`) is timed too, and
``w8a16_same_ids_fraction`` is the fraction of its new tokens equal to our float32 model's. With
``--qkv_concat`` our model with q/k/v and gate/up fused (``model_config.qkv_concat``) is timed too
(``ours_qkv_concat_*``, ``ratio_qkv_concat_over_ours``).
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

from bench.models import CONFIGS, build_hf  # noqa: E402  (shared with bench/train.py)


def read_limit_gb_per_s(size_mb: int = 512, repeats: int = 5) -> float:
    """What one thread reads from memory here, in GB/s: the fastest of ``repeats`` passes of two numpy
    reductions (float32 sum, uint64 bitwise or) over ``size_mb`` MB, far larger than the caches."""
    data = np.ones(size_mb * 2**20 // 8, dtype=np.uint64)
    passes = (lambda: data.view(np.float32).sum(), lambda: np.bitwise_or.reduce(data))
    best = float("inf")
    for _ in range(repeats):
        for reduce in passes:
            start = time.perf_counter()
            reduce()
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def time_hf(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    """Seconds for ``new_tokens`` greedy tokens, seconds for one (the prefill), and the new ids."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)

    def generate(count: int) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=count, min_new_tokens=count, **kwargs)
        return time.perf_counter() - start, out[:, prompts.shape[1]:].numpy()

    with torch.inference_mode():
        generate(4)
        prefill, _ = generate(1)
        elapsed, new_ids = generate(new_tokens)
    return elapsed, prefill, new_ids


def weight_bytes_per_token(model, batch: int) -> int:
    """Bytes of stored weights one decode step reads, per token (see the module docstring)."""
    from research.deepseek2.deepseek2 import RoutedExperts

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


def time_ours(model, prompts: np.ndarray, new_tokens: int,
              cache_implementation: str = "static") -> tuple[float, float, np.ndarray]:
    """As :func:`time_hf`, for our model (warmed up on the timed shape: a static graph compiles per shape)."""
    batch = prompts.tolist()

    def generate(count: int) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = model.generate(batch, max_new_tokens=count, eos_token_id=[], cache_implementation=cache_implementation)
        return time.perf_counter() - start, np.array([row[prompts.shape[1]:] for row in out])

    generate(new_tokens)
    prefill, _ = generate(1)
    elapsed, new_ids = generate(new_tokens)
    return elapsed, prefill, new_ids


def decode_figures(prefix: str, elapsed: float, prefill: float, tokens: int, new_tokens: int, weight_bytes: int,
                   limit: float) -> dict:
    """tokens/s (prefill included), the prefill's seconds, and the weight bandwidth of the decode steps
    after it: weight bytes per step (per token x batch) x steps/s, in GB/s and as a fraction of ``limit``."""
    steps_per_s = (new_tokens - 1) / max(elapsed - prefill, 1e-9)
    gb_per_s = weight_bytes * (tokens // new_tokens) * steps_per_s / 1e9
    return {f"{prefix}_tokens_per_s": round(tokens / elapsed, 2), f"{prefix}_prefill_s": round(prefill, 4),
            f"{prefix}_weight_gb_per_s": round(gb_per_s, 2),
            f"{prefix}_fraction_of_read_limit": round(gb_per_s / limit, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=128, help="greedy tokens per sequence (at least 2)")
    parser.add_argument("--prompt_len", type=int, default=16,
                        help="random prompt tokens per sequence; long-context run: e.g. 1024 (up to 2048 - new_tokens)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per framework (default 1: see the module docstring)")
    parser.add_argument("--quant", choices=("w8a16",), default=None,
                        help="also time our model with this weight quantization (same weights)")
    parser.add_argument("--qkv_concat", action="store_true",
                        help="also time our model with q/k/v and gate/up fused into one matmul each (same weights)")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (the first new token is the prefill's)")
    if args.prompt_len < 1 or args.prompt_len + args.new_tokens > 2048:
        parser.error(f"--prompt_len {args.prompt_len} + --new_tokens {args.new_tokens} must fit the 2048 positions "
                     "the bench models have")
    limit = read_limit_gb_per_s()

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
            fused = load_hf_model(tmp, use_past=True, seq_length=2048, qkv_concat=True) if args.qkv_concat else None
        rng = np.random.RandomState(0)
        for batch in args.batches:
            prompts = rng.randint(3, CONFIGS[name]["vocab_size"], size=(batch, args.prompt_len))
            ours_s, ours_prefill, ours_ids = time_ours(ours, prompts, args.new_tokens)
            dynamic_s, dynamic_prefill, dynamic_ids = time_ours(ours, prompts, args.new_tokens, "dynamic")
            hf_s, hf_prefill, hf_ids = time_hf(hf, prompts, args.new_tokens)
            tokens = batch * args.new_tokens
            weight_bytes = weight_bytes_per_token(ours, batch)  # HF's model holds the same weights
            line = {
                "bench": "decode", "model": name, "batch": batch, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "threads": args.threads,
                **decode_figures("ours", ours_s, ours_prefill, tokens, args.new_tokens, weight_bytes, limit),
                **decode_figures("hf", hf_s, hf_prefill, tokens, args.new_tokens, weight_bytes, limit),
                **decode_figures("ours_dynamic", dynamic_s, dynamic_prefill, tokens, args.new_tokens, weight_bytes, limit),
                "ratio_ours_over_hf": round(hf_s / ours_s, 3),
                "ratio_ours_dynamic_over_hf": round(hf_s / dynamic_s, 3),
                "same_ids": bool(np.array_equal(ours_ids, hf_ids) and np.array_equal(dynamic_ids, hf_ids)),
                "ours_weight_bytes_per_token": weight_bytes,
                "read_limit_gb_per_s": round(limit, 2),
            }
            if quantized is not None:
                quant_s, quant_prefill, quant_ids = time_ours(quantized, prompts, args.new_tokens)
                quant_bytes = weight_bytes_per_token(quantized, batch)
                line.update({
                    **decode_figures(f"ours_{args.quant}", quant_s, quant_prefill, tokens, args.new_tokens,
                                     quant_bytes, limit),
                    f"ratio_{args.quant}_over_hf": round(hf_s / quant_s, 3),
                    f"ratio_{args.quant}_over_ours_float": round(ours_s / quant_s, 3),
                    f"{args.quant}_same_ids_fraction": round(float(np.mean(quant_ids == ours_ids)), 4),
                    f"ours_{args.quant}_weight_bytes_per_token": quant_bytes,
                })
            if fused is not None:
                fused_s, fused_prefill, fused_ids = time_ours(fused, prompts, args.new_tokens)
                line.update({
                    **decode_figures("ours_qkv_concat", fused_s, fused_prefill, tokens, args.new_tokens, weight_bytes,
                                     limit),
                    "ratio_qkv_concat_over_hf": round(hf_s / fused_s, 3),
                    "ratio_qkv_concat_over_ours": round(ours_s / fused_s, 3),
                    "qkv_concat_same_ids": bool(np.array_equal(fused_ids, hf_ids)),
                })
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
