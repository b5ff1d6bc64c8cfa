"""CPU operators MindSpore lacks, in C++ (``cpu_kernels.cc``): compiled once per machine with the system's
C++ compiler into a user cache directory and called as AOT custom operators (static and dynamic shapes).

* :func:`indexed_matmul_op`: ``out[r] = w[idx[r]] @ x[r]`` with the picked matrix read where it lies.
  A MoE decode step multiplies each token by the weights of its k chosen experts. With stock operators
  that is a ``Gather`` of those experts' weights into a new tensor and a batched matmul over the copy:
  at batch 1 the expert weights cross memory three times (read, write, read again), about 9 GB/s of
  useful reads on this project's 2-core CPU against 29 GB/s for a product that reads them in place
  (``GroupedMatmul`` is Ascend's). On float32 weights or W8A16's int8 values with their per-row scales.
* :func:`cache_write_op`: the KV cache's write of a step's new tokens into the cache tensor's own memory
  (:class:`mindformers_ext.cache.CacheWriter`). ``TensorScatterUpdate`` returns a new tensor, so every
  step copied every cache tensor whole: 16 caches of (1, 12, 2048, 64) cost 7.3 ms a step against 0.7 ms.
* :func:`dequantize_op`: the int8 KV cache read back as float32 (values times their per-token scale).
  The broadcasting ``Mul`` took 37.9 ms for one (8, 16, 1088, 64) cache in a dynamic-shape graph (8.8 ms
  static), against 3.3 ms for a plain cast.

Where an operator cannot run (not CPU, no compiler, other dtypes) or ``MINDFORMERS_EXT_CPU_KERNELS=0`` is
set, these functions return None and callers keep the stock operators; :func:`use_cpu_kernels` keeps a
model's next graphs to stock operators (a portable export). Inference only: no gradients.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from typing import Optional

import mindspore as ms
from mindspore import nn, ops

__all__ = ["indexed_matmul_op", "cache_write_op", "dequantize_op", "use_cpu_kernels"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=0")
logger = logging.getLogger(__name__)


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model name and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return ""


def _build() -> Optional[str]:
    """The compiled library's path (built on first use, atomically), or None when it cannot be built."""
    return _build_with(os.environ.get("CXX", "g++"),
                       os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                    "mindformers_ext"))


@functools.lru_cache(maxsize=None)  # once per process: every layer asks
def _build_with(compiler: str, cache: str) -> Optional[str]:
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join((compiler,) + _FLAGS).encode() + _cpu_signature().encode()).hexdigest()
    library = os.path.join(cache, f"cpu_kernels-{key[:16]}.so")
    if os.path.isfile(library):
        return library
    tmp = None
    try:
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        run = subprocess.run([compiler, *_FLAGS, "-o", tmp, _SOURCE], capture_output=True, text=True, timeout=120,
                             check=False)
        if run.returncode:
            raise OSError(run.stderr.strip()[-500:])
        os.replace(tmp, library)
    except (OSError, subprocess.SubprocessError) as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        logger.warning("cannot build %s with %s (%s); MoE decode gathers the chosen experts' weights and the KV "
                       "cache is copied at every write instead (slower on CPU)", _SOURCE, compiler, exc)
        return None
    return library


def _custom(name: str, inputs: tuple, out_dtype) -> Optional[ops.Custom]:
    """The library's operator ``name`` for the dtype rows ``inputs`` (one tuple of input dtypes per
    supported combination, the output's last), or None where it does not run (module docstring)."""
    if os.environ.get("MINDFORMERS_EXT_CPU_KERNELS", "1") == "0" or ms.get_context("device_target") != "CPU":
        return None
    library = _build()
    if library is None:
        return None
    reg = ops.CustomRegOp(name)
    for i in range(len(inputs[0]) - 1):
        reg = reg.input(i, f"input{i}")
    reg = reg.output(0, "out")
    for dtypes in inputs:
        reg = reg.dtype_format(*dtypes)
    # out_shape None: the library's <name>InferShape (Python shape functions fail in dynamic shapes)
    return ops.Custom(f"{library}:{name}", out_shape=None, out_dtype=out_dtype, func_type="aot",
                      reg_info=reg.target("CPU").get_op_info())


def indexed_matmul_op(int8: bool = False) -> Optional[ops.Custom]:
    """The operator ``(x (R, D), w (E, O, D), idx (R,) int32) -> (R, O)``, float32; with ``int8``, W8A16's
    ``(x, w int8, scale (E, O) float32, idx) -> scale * (w @ x)``. None where it does not run."""
    f32, i32 = ops.DataType.F32_Default, ops.DataType.I32_Default
    if int8:
        return _custom("IndexedMatmulInt8", ((f32, ops.DataType.I8_Default, f32, i32, f32),), ms.float32)
    return _custom("IndexedMatmul", ((f32, f32, i32, f32),), ms.float32)


def cache_write_op() -> Optional[ops.Custom]:
    """The operator ``(cache (B, H, T, D), new (B, H, S, D), slot (B,) int32) -> done (1,) int32`` that
    writes ``cache[b, :, slot[b] + j] = new[b, :, j]`` into ``cache``'s memory (float32, float16, bfloat16
    or int8; ``new`` in the cache's dtype). Reads of the cache must depend on ``done``
    (``ops.depend(cache, done)``): the graph does not know the operator changes its input. None where it
    does not run."""
    i32 = ops.DataType.I32_Default
    return _custom("CacheWrite", tuple((dtype, dtype, i32, i32) for dtype in (
        ops.DataType.F32_Default, ops.DataType.F16_Default, ops.DataType.BF16_Default, ops.DataType.I8_Default)),
                   ms.int32)



def dequantize_op() -> Optional[ops.Custom]:
    """The operator ``(values (..., D) int8, scales (..., 1) float32) -> values * scales`` (float32, the
    shape of ``values``). None where it does not run."""
    f32 = ops.DataType.F32_Default
    return _custom("Dequantize", ((ops.DataType.I8_Default, f32, f32),), ms.float32)

def use_cpu_kernels(model: nn.Cell, enabled: bool) -> None:
    """Whether the graphs compiled from now on from ``model`` may run these operators, in every cell that
    can (an attribute ``cpu_kernels_enabled``, True by default); a graph keeps what it was compiled with.
    Off: stock operators only, a graph that runs anywhere (what a MindIR export holds)."""
    for _, cell in model.cells_and_names():
        if hasattr(cell, "cpu_kernels_enabled"):
            cell.cpu_kernels_enabled = enabled
