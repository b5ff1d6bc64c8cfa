"""Preprocessing speed: the two preprocess CLIs on a generated code-instruction data set.

Writes ``--samples`` (default 20,000) Code-Alpaca-style records (instruction, optional input, a
Python answer of realistic length; about 11 MB of JSON for 20k) into a temporary directory, runs
``research/deepseek1_5/deepseek_preprocess_1_5.py`` and ``research/wizardcoder/wizardcoder_preprocess.py``
on it as a user does (a subprocess: start-up and imports included) and prints one JSON line per
script: wall and CPU seconds (user + system, all threads), samples/s, the script's own report, and the
same script's wall / CPU seconds on a one-record file (start-up: imports, tokenizer, MindRecord writer).
The 1-minute load average is printed too: on a shared machine, wall time depends on it, CPU time less.

    python bench/preprocess.py                           # 20k samples, --seq_length 2048
    python bench/preprocess.py --samples 500 --seq_length 512
    git archive HEAD~3 | (mkdir -p /tmp/old && tar -x -C /tmp/old) && python bench/preprocess.py --repo /tmp/old
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "deepseek1_5": os.path.join("research", "deepseek1_5", "deepseek_preprocess_1_5.py"),
    "wizardcoder": os.path.join("research", "wizardcoder", "wizardcoder_preprocess.py"),
}

_TASKS = ["Write a Python function that {}.", "Implement {} in Python.", "Create a program to {}.",
          "Fix the bug in the following code so that it {}.", "Explain and then write code that {}.",
          "Optimise this snippet; it should {}."]
_GOALS = ["returns the n-th Fibonacci number", "sorts a list of dictionaries by a key", "parses a CSV file",
          "counts word frequencies in a text", "checks whether a string is a palindrome",
          "merges two sorted lists", "computes the GCD of two integers", "flattens a nested list",
          "reads a JSON file and prints its keys", "finds the longest common prefix of strings",
          "validates an e-mail address with a regular expression", "implements binary search",
          "removes duplicates while keeping the order", "computes a moving average over a window"]
_WORDS = ["data", "items", "result", "value", "total", "count", "node", "left", "right", "text", "path",
          "index", "buffer", "cache", "matrix", "row", "col", "key", "seen", "queue", "user", "file", "line",
          "word", "score", "price", "name", "size", "limit", "step"]
_LINES = ["{a} = {b} + {n}", "if {a} > {b}:", "    return {a}", "for {a} in range(len({b})):",
          "    {a}.append({b}[{n}])", "while {a} < {b}:", "    {a} += {n}", "{a} = [x * {n} for x in {b}]",
          "# update {a} from {b}", "print(f\"{a} = {{{a}}}\")", "{a} = {{}}  # maps {b} to its count",
          "try:", "    {a} = int({b})", "except ValueError:", "    {a} = None", "return sorted({a}, key=len)",
          "with open({a}, encoding=\"utf-8\") as handle:", "    {b} = handle.read().splitlines()",
          "{a}, {b} = {b}, {a} % {n}", "assert {a} is not None, \"{b} missing\""]


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}" if rng.random() < 0.6 else rng.choice(_WORDS)


def _code(rng: random.Random, lines: int) -> str:
    name = "_".join(rng.choice(_GOALS).split()[:2])
    out = [f"def {name}({_name(rng)}, {_name(rng)}={rng.randint(0, 99)}):",
           f"    \"\"\"{rng.choice(_GOALS).capitalize()}.\"\"\""]
    for _ in range(lines):
        line = rng.choice(_LINES).format(a=_name(rng), b=_name(rng), n=rng.randint(0, 999))
        out.append("    " * rng.randint(1, 3) + line)
    return "\n".join(out)


def make_records(samples: int, seed: int = 0) -> List[Dict[str, str]]:
    """``samples`` instruction / input / output records; Python answers of 2 - 60 lines (a long tail).

    About half the lines of the set are distinct (structural lines such as ``try:`` or a code fence
    repeat, identifiers and constants vary), as in real instruction sets."""
    rng = random.Random(seed)
    records = []
    for _ in range(samples):
        instruction = rng.choice(_TASKS).format(rng.choice(_GOALS))
        given = _code(rng, rng.randint(1, 6)) if rng.random() < 0.3 else ""
        lines = min(60, int(rng.expovariate(1 / 5.5)) + 1)
        answer = f"Here is a solution:\n```python\n{_code(rng, lines)}\n```"
        records.append({"instruction": instruction, "input": given, "output": answer})
    return records


def write_dataset(path: str, samples: int, seed: int = 0) -> int:
    """Write ``make_records(samples, seed)`` as a JSON list to ``path``; return its size in bytes."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(make_records(samples, seed), handle, indent=1)
    return os.path.getsize(path)


def run_script(name: str, data: str, output: str, seq_length: int, repo: str = REPO) -> dict:
    """Run one preprocess CLI of checkout ``repo`` as a subprocess; its wall / CPU time, throughput, report line."""
    cmd = [sys.executable, os.path.join(repo, SCRIPTS[name]), "--input_glob", data, "--output_file", output,
           "--seq_length", str(seq_length), "--no_progress"]
    env = dict(os.environ, LOG_MF_PATH=os.path.join(os.path.dirname(output), "log"), GLOG_v="3")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=os.path.dirname(output), env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{SCRIPTS[name]} failed ({done.returncode}): {done.stderr[-2000:]}")
    report = done.stdout.strip().splitlines()[-1]
    written = int(report.split("written ")[1].split()[0])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "samples_per_s": round(written / wall, 1),
            "written": written, "report": report.split(": ", 1)[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seq_length", type=int, default=2048)
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--repo", default=REPO,
                        help="run the scripts of this checkout (e.g. `git archive` of an older commit: before / after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "code_instruct.json")
        size = write_dataset(data, args.samples)
        tiny = os.path.join(tmp, "one.json")
        write_dataset(tiny, 1)
        for name in args.scripts:
            startup = run_script(name, tiny, os.path.join(tmp, f"{name}_one.mindrecord"), args.seq_length, args.repo)
            result = run_script(name, data, os.path.join(tmp, f"{name}.mindrecord"), args.seq_length, args.repo)
            print(json.dumps({"bench": "preprocess", "script": name, "repo": args.repo, "samples": args.samples,
                              "json_mb": round(size / 1e6, 2), "seq_length": args.seq_length,
                              "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), **result,
                              "startup_wall_s": startup["wall_s"], "startup_cpu_s": startup["cpu_s"]}), flush=True)


if __name__ == "__main__":
    main()
