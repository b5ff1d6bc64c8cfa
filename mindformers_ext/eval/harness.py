"""Generate, execute and score: the HumanEval / MBPP harness behind ``tools/eval_code.py``.

Output directory layout:

* ``run_config.json``: task and prompt style of the samples (a rerun must match), generation
  settings;
* ``samples.jsonl``: raw completions, appended as produced (resumable, see ``samples.py``);
* ``results.jsonl``: one line per problem: n, c, its pass@k, each sample's status and error;
* ``summary.json``: pass@k over all problems and status counts.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mindformers_ext.eval.execution import ExecResult, check_sandbox, run_programs
from mindformers_ext.eval.metrics import DEFAULT_KS, mean_pass_at_k, pass_at_k
from mindformers_ext.eval.problems import Problem
from mindformers_ext.eval.prompts import build_prompt, postprocess
from mindformers_ext.eval.samples import SampleStore, sample_key

__all__ = ["GenerateFn", "generator_to_generate_fn", "generate_samples", "evaluate_samples",
           "run_eval", "check_run_config"]

GenerateFn = Callable[[List[str], int], List[List[str]]]
"""``generate_fn(prompts, n)``: ``n`` completions (continuations only) for each prompt."""

SAMPLES_FILE, RESULTS_FILE, SUMMARY_FILE, CONFIG_FILE = (
    "samples.jsonl", "results.jsonl", "summary.json", "run_config.json")


def generator_to_generate_fn(generator: Callable[[List[str]], List[str]]) -> GenerateFn:
    """Adapt a one-completion-per-prompt generator (what ``mindformers_ext.api.build_generator``
    returns) to ``generate_fn(prompts, n)`` by repeating each prompt ``n`` times in one batch."""
    def generate_fn(prompts: List[str], n: int) -> List[List[str]]:
        flat = [p for p in prompts for _ in range(n)]
        outs = list(generator(flat))
        if len(outs) != len(flat):
            raise ValueError(f"generator returned {len(outs)} completions for {len(flat)} prompts")
        return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]
    return generate_fn


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_run_config(output_dir: str, config: Dict[str, Any]) -> None:
    """Record ``config`` in ``output_dir``; refuse to resume samples made for another task or
    prompt style (they would be scored with the wrong post-processing)."""
    path = os.path.join(output_dir, CONFIG_FILE)
    old: Dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        for key in ("task", "prompt_style"):
            if key in old and old[key] != config.get(key):
                raise ValueError(f"{path}: samples in {output_dir} were made with {key}="
                                 f"{old[key]!r}, this run asks for {config.get(key)!r}; use "
                                 f"another --output directory")
    os.makedirs(output_dir, exist_ok=True)
    _write_json_atomic(path, {**old, **config})


def _check_outputs(outs: Any, n_prompts: int, n: int) -> None:
    if not isinstance(outs, (list, tuple)) or len(outs) != n_prompts:
        size = len(outs) if hasattr(outs, "__len__") else "?"
        raise ValueError(f"generate_fn must return one list per prompt ({n_prompts}), "
                         f"got {type(outs).__name__} of length {size}")
    for i, row in enumerate(outs):
        if not isinstance(row, (list, tuple)) or len(row) != n:
            raise ValueError(f"generate_fn output[{i}] must be a list of {n} strings")
        for j, text in enumerate(row):
            if not isinstance(text, str):
                raise ValueError(f"generate_fn output[{i}][{j}] must be str, "
                                 f"got {type(text).__name__}")


def generate_samples(problems: Sequence[Problem], prompts: Sequence[str],
                     generate_fn: GenerateFn, n_samples: int, samples_path: str,
                     batch_size: int = 1, samples_per_call: Optional[int] = None,
                     progress: bool = True) -> SampleStore:
    """Make sure ``samples_path`` holds samples 0..n_samples-1 of every problem, generating only
    the missing ones. ``generate_fn`` gets up to ``batch_size`` prompts and up to
    ``samples_per_call`` samples per prompt per call; each returned completion is stored at once.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if len(prompts) != len(problems):
        raise ValueError(f"{len(prompts)} prompts for {len(problems)} problems")
    per_call = max(1, samples_per_call or n_samples)
    store = SampleStore(samples_path)
    missing: List[Tuple[int, List[int]]] = []
    for i, prob in enumerate(problems):
        todo = [s for s in range(n_samples) if sample_key(prob.task_id, s) not in store]
        if todo:
            missing.append((i, todo))
    total = sum(len(t) for _, t in missing)
    bar = None
    if progress and total:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="generating", unit="sample", dynamic_ncols=True)
    try:
        while missing:
            batch = missing[:max(1, batch_size)]
            m = min(per_call, min(len(todo) for _, todo in batch))
            outs = generate_fn([prompts[i] for i, _ in batch], m)
            _check_outputs(outs, len(batch), m)
            for (i, todo), texts in zip(batch, outs):
                for s, text in zip(todo[:m], texts):
                    store.append(problems[i].task_id, s, text)
                    if bar is not None:
                        bar.update(1)
                del todo[:m]
            missing = [(i, todo) for i, todo in missing if todo]
    finally:
        store.close()
        if bar is not None:
            bar.close()
    return store


def evaluate_samples(problems: Sequence[Problem], records: Sequence[Dict[str, Any]], task: str,
                     prompt_style: str, n_samples: Optional[int] = None,
                     prompts: Optional[Sequence[str]] = None, timeout: float = 10.0,
                     memory_limit_mb: Optional[float] = 1024, workers: int = 2,
                     ks: Sequence[int] = DEFAULT_KS, progress: bool = True,
                     sandbox: bool = True,
                     ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Execute the stored completions of ``problems`` (samples with index < ``n_samples`` when
    given) and score them, each in a bubblewrap sandbox (``sandbox=False``: no isolation, see
    ``execution.py``). Returns (per-problem results, summary)."""
    by_key = {str(p.task_id): (i, p) for i, p in enumerate(problems)}
    jobs, per_problem = [], {str(p.task_id): [] for p in problems}
    for rec in records:
        tid, idx = sample_key(rec["task_id"], rec["sample_idx"])
        if tid not in by_key or (n_samples is not None and idx >= n_samples):
            continue
        i, prob = by_key[tid]
        solution = postprocess(prob, task, prompt_style, rec["completion"],
                               prompt=prompts[i] if prompts is not None else None)
        jobs.append(((tid, idx), prob.program(solution)))
        per_problem[tid].append(idx)
    results: Dict[Any, ExecResult] = run_programs(jobs, workers=workers, timeout=timeout,
                                                  memory_limit_mb=memory_limit_mb,
                                                  progress=progress, sandbox=sandbox)
    rows, counts, statuses = [], [], Counter()
    for prob in problems:
        tid = str(prob.task_id)
        idxs = sorted(per_problem[tid])
        samples = [{"sample_idx": s, "status": results[(tid, s)].status,
                    "error": results[(tid, s)].error} for s in idxs]
        n, c = len(samples), sum(1 for s in samples if s["status"] == "pass")
        statuses.update(s["status"] for s in samples)
        row: Dict[str, Any] = {"task_id": prob.task_id, "n": n, "c": c}
        row.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks if 1 <= k <= n})
        row["samples"] = samples
        rows.append(row)
        if n:
            counts.append((n, c))
    summary: Dict[str, Any] = {
        "task": task, "prompt_style": prompt_style, "n_problems": len(problems),
        "n_problems_with_samples": len(counts), "n_samples": sum(n for n, _ in counts),
        "statuses": dict(statuses),
    }
    if len(counts) < len(problems):
        summary["warning"] = (f"{len(problems) - len(counts)} problems have no samples; pass@k "
                              f"is over the {len(counts)} that have")
    summary.update(mean_pass_at_k(counts, ks))
    return rows, summary


def run_eval(task: str, problems: Sequence[Problem], output_dir: str,
             generate_fn: Optional[GenerateFn], n_samples: int = 1,
             prompt_style: Optional[str] = None, fewshot: Optional[Sequence[Dict[str, Any]]] = None,
             timeout: float = 10.0, memory_limit_mb: Optional[float] = 1024, workers: int = 2,
             batch_size: int = 1, samples_per_call: Optional[int] = None,
             ks: Sequence[int] = DEFAULT_KS, progress: bool = True,
             run_config: Optional[Dict[str, Any]] = None, sandbox: bool = True) -> Dict[str, Any]:
    """Generate the missing samples (skipped when ``generate_fn`` is None: evaluate what is
    stored), execute, write results.jsonl and summary.json into ``output_dir``; return the
    summary. With ``sandbox`` (the default) the sandbox is checked before anything is generated:
    :class:`~mindformers_ext.eval.execution.SandboxUnavailable` if it cannot work here."""
    from mindformers_ext.eval.prompts import DEFAULT_STYLE
    if sandbox:
        check_sandbox()
    style = prompt_style or DEFAULT_STYLE[task]
    prompts = [build_prompt(p, task, style, fewshot) for p in problems]
    check_run_config(output_dir, {"task": task, "prompt_style": style, "n_samples": n_samples,
                                  **(run_config or {})})
    samples_path = os.path.join(output_dir, SAMPLES_FILE)
    if generate_fn is not None:
        store = generate_samples(problems, prompts, generate_fn, n_samples, samples_path,
                                 batch_size=batch_size, samples_per_call=samples_per_call,
                                 progress=progress)
    else:
        store = SampleStore(samples_path)
    rows, summary = evaluate_samples(problems, store.records, task, style, n_samples=n_samples,
                                     prompts=prompts, timeout=timeout,
                                     memory_limit_mb=memory_limit_mb, workers=workers, ks=ks,
                                     progress=progress, sandbox=sandbox)
    tmp = os.path.join(output_dir, RESULTS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, os.path.join(output_dir, RESULTS_FILE))
    _write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), summary)
    return summary
