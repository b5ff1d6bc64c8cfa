"""One serving decode step against the size of the paged KV pool (the demo model, batch 16, 64 attended
tokens): the step writes its new keys / values into the pool in place, so its time should not grow with
the pool. Prints one JSON line per pool size: the step's median time as the engine calls it
(``step_ms_p50``: the compiled graph run directly, :class:`~mindformers_ext.generation.step_cells.Step`) and
through MindSpore's ``Cell.__call__`` (``cell_call_ms_p50``), the two calls alternating.

    python bench/paged_step.py
    python bench/paged_step.py --blocks 64 1024 8192 32768 --steps 30
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
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[64, 1024, 8192])
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--width", type=int, default=64, help="attended tokens per row")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import mindspore as ms
    from mindspore import Tensor, nn

    from mindformers_ext.cache import PagedKVCache
    from mindformers_ext.generation.step_cells import PagedStep
    from mindformers_ext.serving.loading import load_config_model

    ms.set_context(mode=ms.GRAPH_MODE)
    model = load_config_model(os.path.join(REPO, "configs", "deepseek1_5", "predict_demo.yaml"))[0]
    for blocks in args.blocks:
        cache = PagedKVCache(model.cache_spec(), blocks, args.block_size, model._cache_dtype())  # pylint: disable=W0212
        step = PagedStep(model, cache.tensors, decode=True, dynamic=False)
        step.set_train(False)
        mask, (write, table) = cache.decode([], args.rows, args.width)
        inputs = (Tensor(np.zeros((args.rows, 1), np.int32)), Tensor(np.zeros((args.rows, 1), np.int32)), mask, write,
                  table, *cache.tensors)
        step(*inputs).asnumpy()  # compile
        times, cell_times = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            step(*inputs).asnumpy()
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            nn.Cell.__call__(step, *inputs).asnumpy()
            cell_times.append(time.perf_counter() - start)
        pool_mb = sum(int(np.prod(t.shape)) * t.itemsize for t in cache.tensors) / 2**20
        print(json.dumps({"bench": "paged_step", "blocks": blocks, "pool_mib": round(pool_mb, 1), "rows": args.rows,
                          "width": args.width, "step_ms_p50": round(1e3 * float(np.median(times)), 2),
                          "cell_call_ms_p50": round(1e3 * float(np.median(cell_times)), 2)}), flush=True)


if __name__ == "__main__":
    main()
