"""Training speed: our finetune step (MindSpore graph mode, PortableTrainOneStepCell, AdamW as
run_mindformer.py runs it on CPU, global-norm clipping) vs the equivalent torch step (HF
LlamaForCausalLM, torch.optim.AdamW, clip_grad_norm_) on the same weights, batch and sequence length.

``--optimizer AdamW`` measures MindFormers' own (unfused) AdamW instead of PortableAdamW, its
fused equivalent that tools/run_mindformer.py selects on CPU.

Prints one JSON line per model: tokens/s of both (batch x seq_length tokens per step, median of the
timed steps after warm-up; the MindSpore graph compile is reported separately) and ours / torch.
The first and last losses of both sides are printed too: the same weights, data and update rule
give the same losses step by step.

    python bench/train.py                       # every model below:
                                                # tiny, llama-150m (Llama), bigcode-tiny, bigcode-150m (GPT-BigCode),
                                                # ds2-tiny, ds2-moe-150m (DeepSeek-V2: MLA, DeepSeekMoE)
    python bench/train.py --models bigcode-tiny bigcode-150m
    python bench/train.py --models ds2-tiny ds2-moe-150m    # DeepSeek-V2 (MLA, DeepSeekMoE)
    python bench/train.py --models tiny --steps 5 --batch 2 --seq 64
    python bench/train.py --models ds2-moe-150m --experts 8 16 64   # MoE sweep: tokens/s per routed expert count
    python bench/train.py --models ds2-moe-150m --capacity_factor 1.25   # our MoE drops over capacity (torch: none)

With ``--experts`` each DeepSeek-V2 model runs once per E (its top-k and expert size kept) and a
``train_experts_sweep`` line sums it up: tokens/s per E and the step time relative to the first E,
and the same for our prefill (inference) of one ``--prefill_len``-token prompt (default 1024).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_bench_logs"))
os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.models import CONFIGS, build_hf, family  # noqa: E402  (shared with bench/decode.py)
from mindformers_ext.counters import MOE_DROPPED, take  # noqa: E402

OPTIM = dict(learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
MAX_GRAD_NORM = 1.0


def time_torch(model, batches: list[np.ndarray], warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per step of the timed steps, and every step's loss."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=OPTIM["learning_rate"], betas=OPTIM["betas"], eps=OPTIM["eps"])
    times, losses = [], []
    for i, batch in enumerate(batches):
        tokens = torch.tensor(batch[:, :-1], dtype=torch.long)
        targets = torch.tensor(batch[:, 1:], dtype=torch.long)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(elapsed)
    return times, losses


def build_ours(hf_dir: str, seq: int, optimizer_type: str, capacity_factor: Optional[float] = None):
    """Our model with the HF weights, AdamW (MindFormers' registry, decay on matrices only, as the
    Trainer groups it) and the portable train wrapper; ``capacity_factor``: a DeepSeek-V2 model's MoE
    drops assignments over capacity (HF's, on the torch side, never does)."""
    import mindspore as ms
    from mindformers.core.optim import build_optim

    from mindformers_ext import load_hf_model
    from mindformers_ext.runner import PortableTrainOneStepCell  # also registers PortableAdamW

    extra = {} if capacity_factor is None else {"capacity_factor": capacity_factor}
    model = load_hf_model(hf_dir, use_past=False, dtype="float32", seq_length=seq, **extra)
    model.set_train(True)
    params = model.trainable_params()
    groups = [{"params": [p for p in params if len(p.shape) > 1], "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for p in params if len(p.shape) <= 1], "weight_decay": 0.0}]
    optimizer = build_optim({"type": optimizer_type, "learning_rate": OPTIM["learning_rate"],
                             "betas": list(OPTIM["betas"]), "eps": OPTIM["eps"], "weight_decay": OPTIM["weight_decay"]},
                            default_args={"params": groups})
    step = PortableTrainOneStepCell(model, optimizer, use_clip_grad=True, max_grad_norm=MAX_GRAD_NORM,
                                    scale_sense=1.0)
    step.set_train(True)
    ms.set_seed(0)
    return step


def time_ours(step, batches: list[np.ndarray], warmup: int) -> tuple[list[float], float, list[float]]:
    """Seconds per timed step, the first (compiling) step's seconds, and every step's loss."""
    from mindspore import Tensor

    times, compile_s, losses = [], 0.0, []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = step(Tensor(batch.astype(np.int32)))[0]
        losses.append(float(loss.asnumpy()))  # synchronises
        elapsed = time.perf_counter() - start
        if i == 0:
            compile_s = elapsed
        if i >= warmup:
            times.append(elapsed)
    return times, compile_s, losses


def time_prefill(hf_dir: str, length: int, repeats: int = 3) -> float:
    """Seconds of our prefill of one ``length``-token prompt (the best of ``repeats`` after a compile)."""
    from mindformers_ext import load_hf_model

    model = load_hf_model(hf_dir, use_past=True, dtype="float32", seq_length=length + 1)
    prompt = np.random.default_rng(1).integers(3, model.config.vocab_size, size=length).tolist()
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.generate([prompt], max_new_tokens=1, eos_token_id=[])
        best = min(best, time.perf_counter() - start)
    return best


def bench(name: str, batch: int, seq: int, steps: int, warmup: int, threads: int,
          optimizer_type: str = "PortableAdamW", experts: Optional[int] = None, prefill_len: int = 1024,
          capacity_factor: Optional[float] = None) -> dict:
    """One model's line; ``experts`` replaces a DeepSeek-V2 model's routed expert count (same top-k and
    expert size) and adds our prefill seconds of a ``prefill_len``-token prompt; ``capacity_factor``:
    our MoE drops assignments over capacity, and the line says which fraction it dropped."""
    import mindspore as ms
    import torch

    torch.set_num_threads(threads)
    ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=threads)
    vocab = CONFIGS[name]["vocab_size"]
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, vocab, size=(batch, seq + 1)) for _ in range(warmup + steps)]
    with tempfile.TemporaryDirectory() as hf_dir:
        hf = build_hf(name, hf_dir, train=True, overrides=None if experts is None else {"n_routed_experts": experts})
        params = sum(p.numel() for p in hf.parameters())
        torch_times, torch_loss = time_torch(hf, batches, warmup)
        del hf
        ours = build_ours(hf_dir, seq, optimizer_type, capacity_factor)
        take(MOE_DROPPED)
        ms_times, compile_s, ms_loss = time_ours(ours, batches, warmup)
        dropped = take(MOE_DROPPED)
        del ours
        prefill = {} if experts is None else {"mindspore_prefill_s": round(time_prefill(hf_dir, prefill_len), 4),
                                              "prefill_len": prefill_len}
    tokens = batch * seq
    ms_tps = tokens / statistics.median(ms_times)
    torch_tps = tokens / statistics.median(torch_times)
    shape = {} if experts is None else {"experts": experts, "top_k": CONFIGS[name]["num_experts_per_tok"]}
    if capacity_factor is not None:  # the losses then differ from torch's, which drops nothing
        shape.update(capacity_factor=capacity_factor,
                     dropped_fraction=round(float(dropped[0] / dropped[1]), 4) if dropped.size and dropped[1] else 0.0)
    return {"bench": "train", "model": name, **shape, "params_m": round(params / 1e6, 1), "batch": batch,
            "seq_length": seq,
            "timed_steps": steps, "threads": threads, "optimizer": optimizer_type,
            "mindspore_tokens_per_s": round(ms_tps, 1), "torch_tokens_per_s": round(torch_tps, 1),
            "ratio_ours_over_torch": round(ms_tps / torch_tps, 3),
            "mindspore_step_s": round(statistics.median(ms_times), 4),
            "torch_step_s": round(statistics.median(torch_times), 4),
            "mindspore_first_step_s": round(compile_s, 2),
            # same weights, data and update rule: the losses agree step by step
            "first_loss_mindspore": round(ms_loss[0], 5), "first_loss_torch": round(torch_loss[0], 5),
            "last_loss_mindspore": round(ms_loss[-1], 5), "last_loss_torch": round(torch_loss[-1], 5), **prefill}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample fed to the model")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the graph compiles in step 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--optimizer", default="PortableAdamW", choices=("PortableAdamW", "AdamW"),
                        help="our side's optimizer (default: the fused one run_mindformer.py uses on CPU)")
    parser.add_argument("--experts", nargs="+", type=int, default=None, metavar="E",
                        help="MoE sweep: run each DeepSeek-V2 model once per routed expert count E (same top-k and "
                             "expert size) and print tokens/s per E")
    parser.add_argument("--capacity_factor", type=float, default=None,
                        help="DeepSeek-V2 models: our MoE drops assignments over capacity_factor x its fair share "
                             "in training (upstream's moe_config.capacity_factor; torch's HF model drops none)")
    parser.add_argument("--prefill_len", type=int, default=1024,
                        help="with --experts: also time our prefill of one prompt of this many tokens")
    args = parser.parse_args(argv)
    dense = [name for name in args.models if family(name) != "deepseek2"]
    if args.capacity_factor is not None and dense:
        parser.error(f"--capacity_factor applies to DeepSeek-V2 models (ds2-*); {', '.join(dense)} has no "
                     "routed experts")
    if args.experts:
        if dense:
            parser.error(f"--experts sweeps DeepSeek-V2 models (ds2-*); {', '.join(dense)} has no routed experts")
        for name in args.models:
            groups = CONFIGS[name].get("n_group", 1)
            bad = [e for e in args.experts if e % groups or e < CONFIGS[name]["num_experts_per_tok"]]
            if bad:
                parser.error(f"--experts {bad}: {name} routes top-{CONFIGS[name]['num_experts_per_tok']} in "
                             f"{groups} groups, so E must be a multiple of {groups} and at least the top-k")
    import mindspore as ms

    ms.set_device("CPU")
    for name in args.models:
        if not args.experts:
            print(json.dumps(bench(name, args.batch, args.seq, args.steps, args.warmup, args.threads, args.optimizer,
                                   capacity_factor=args.capacity_factor)), flush=True)
            continue
        lines = [bench(name, args.batch, args.seq, args.steps, args.warmup, args.threads, args.optimizer, e,
                       args.prefill_len, args.capacity_factor) for e in args.experts]
        for line in lines:
            print(json.dumps(line), flush=True)
        base = lines[0]
        print(json.dumps({"bench": "train_experts_sweep", "model": name, "top_k": base["top_k"],
                          "experts": args.experts,
                          "mindspore_tokens_per_s": [line["mindspore_tokens_per_s"] for line in lines],
                          "torch_tokens_per_s": [line["torch_tokens_per_s"] for line in lines],
                          f"mindspore_step_time_over_E{base['experts']}":
                              [round(line["mindspore_step_s"] / base["mindspore_step_s"], 3) for line in lines],
                          "mindspore_prefill_s": [line["mindspore_prefill_s"] for line in lines],
                          f"mindspore_prefill_time_over_E{base['experts']}":
                              [round(line["mindspore_prefill_s"] / base["mindspore_prefill_s"], 3) for line in lines]}),
              flush=True)


if __name__ == "__main__":
    main()
