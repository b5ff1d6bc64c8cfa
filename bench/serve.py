"""Serving throughput and latency: N streaming requests with Poisson arrivals vs the same requests one at
a time, on the same server (tools/serve.py's app in this process, 127.0.0.1, the official openai client).

Prints JSON lines:
  {"mode": "one_at_a_time", ...}   each request alone on an idle server: tokens/s, TTFT and inter-token
                                   latency p50 / p99
  {"mode": "concurrent", ...}      the same requests arriving at --rate per second (Poisson)
  {"mode": "summary", ...}         throughput ratio; concurrent p99 TTFT / idle p50 TTFT; ids identical
  {"mode": "memory", ...}          resident memory at the start, half way and the end of --memory_requests
                                   short requests, and free KV blocks after (a leak shows as growth in both
                                   halves or missing blocks)

    python bench/serve.py                               # demo model, 16 requests x 64 tokens, rate 8/s
    python bench/serve.py --requests 32 --rate 4 --max_tokens 128 --memory_requests 0
    python bench/serve.py --config research/deepseek1_5/predict_deepseek_coder1_5_7b.yaml --load_checkpoint ds7b.ckpt
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import tempfile
import threading
import time

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_bench_logs"))
os.environ.setdefault("GLOG_v", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

PROMPTS = ["def __init__(self", "import os\nimport sys\n\ndef main():", "class Stack:\n    def push(self, item):",
           "# read a file\ndef read(path):", "for i in range(10):", "def fib(n):", "x = [", "try:\n    import json",
           "def add(a, b):\n    return", "while True:", "if __name__ == '__main__':", "def test_sum():",
           "from collections import", "with open(path) as f:", "class Error(Exception):", "def parse(text):"]


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _percentiles(values, *qs):
    arr = np.asarray(values, dtype=np.float64)
    return [round(float(np.quantile(arr, q)), 4) if arr.size else None for q in qs]


def _stream(client, model, prompt, max_tokens, start_at=None):
    """(text, ttft, inter-token gaps, tokens, end time) of one streaming request sent at ``start_at``."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    sent = time.monotonic()
    stamps, text = [], []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                       extra_body={"ignore_eos": True}, temperature=0)
    for chunk in stream:
        stamps.append(time.monotonic())
        text.append(chunk.choices[0].text)
    gaps = list(np.diff(stamps)) if len(stamps) > 1 else []
    return "".join(text), stamps[0] - sent, gaps, max_tokens, stamps[-1]


def _report(mode, results, elapsed, **extra):
    tokens = sum(r[3] for r in results)
    ttft = [r[1] for r in results]
    gaps = [g for r in results for g in r[2]]
    line = {"bench": "serve", "mode": mode, "requests": len(results), "tokens": tokens,
            "seconds": round(elapsed, 3), "tokens_per_second": round(tokens / elapsed, 2),
            "ttft_p50": _percentiles(ttft, 0.5)[0], "ttft_p99": _percentiles(ttft, 0.99)[0],
            "itl_p50": _percentiles(gaps, 0.5)[0], "itl_p99": _percentiles(gaps, 0.99)[0], **extra}
    print(json.dumps(line), flush=True)
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "deepseek1_5", "predict_demo.yaml"))
    p.add_argument("--load_checkpoint", default=None)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests per second")
    p.add_argument("--max_num_seqs", type=int, default=16)
    p.add_argument("--memory_requests", type=int, default=1000, help="short requests for the leak check (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import uvicorn  # pylint: disable=import-outside-toplevel
    from openai import OpenAI  # pylint: disable=import-outside-toplevel

    from mindformers_ext.serving.loading import load_config_model, serve_app  # pylint: disable=import-outside-toplevel

    os.chdir(REPO)
    model, tokenizer, name, family = load_config_model(args.config, args.load_checkpoint)
    app = serve_app(model, tokenizer, name, family, max_num_seqs=args.max_num_seqs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    _stream(client, name, prompts[0], 4)  # warm the HTTP path

    start = time.monotonic()
    alone = [_stream(client, name, prompt, args.max_tokens) for prompt in prompts]
    one = _report("one_at_a_time", alone, time.monotonic() - start)

    rng = np.random.default_rng(args.seed)
    start = time.monotonic() + 0.05
    arrivals = start + np.cumsum(rng.exponential(1.0 / args.rate, size=len(prompts))) - 1.0 / args.rate
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_stream, client, name, prompt, args.max_tokens, t) for prompt, t in zip(prompts, arrivals)]
        together = [f.result() for f in futures]
    conc = _report("concurrent", together, max(r[4] for r in together) - start, rate=args.rate,
                   max_num_seqs=args.max_num_seqs)
    print(json.dumps({"bench": "serve", "mode": "summary",
                      "throughput_ratio": round(conc["tokens_per_second"] / one["tokens_per_second"], 2),
                      "ttft_p99_loaded_over_p50_idle": round(conc["ttft_p99"] / one["ttft_p50"], 2),
                      "same_text_as_alone": [a[0] for a in alone] == [b[0] for b in together],
                      "lost": args.requests - len(together)}), flush=True)

    if args.memory_requests:
        engine = app.state.served.engine
        rss = [round(_rss_mb(), 1)]
        half = args.memory_requests // 2
        for count in (half, args.memory_requests - half):  # RSS after each half: a leak keeps growing
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: client.completions.create(
                    model=name, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=4).choices[0].text, range(count)))
            while engine.stats()["running"] or engine.stats()["waiting"]:
                time.sleep(0.05)
            rss.append(round(_rss_mb(), 1))
        stats = engine.stats()
        print(json.dumps({"bench": "serve", "mode": "memory", "requests": args.memory_requests,
                          "rss_mb_start_half_end": rss, "free_blocks": stats["free_blocks"],
                          "num_blocks": stats["num_blocks"]}), flush=True)
    server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
