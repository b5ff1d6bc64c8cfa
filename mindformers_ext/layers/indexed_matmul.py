"""``indexed_matmul``: ``out[r] = w[idx[r]] @ x[r]`` with the picked matrix read where it lies (CPU).

A MoE decode step multiplies each token by the weights of its k chosen experts. With stock operators
that is a ``Gather`` of those experts' weights into a new tensor and a batched matmul over the copy:
at batch 1 the expert weights cross memory three times (read, write, read again), about 9 GB/s of
useful reads on this project's 2-core CPU against 29 GB/s for a product that reads them in place.
MindSpore has no such operator on CPU (``GroupedMatmul`` is Ascend's), so ``indexed_matmul.cc`` is
compiled once per machine with the system's C++ compiler into a user cache directory and called as
an AOT custom operator (static and dynamic shapes), on float32 weights or W8A16's int8 values with
their per-row scales. Where that is not possible (not CPU, no compiler, other dtypes) or
``MINDFORMERS_EXT_CPU_KERNELS=0`` is set, :func:`indexed_matmul_op` returns None and callers keep the
gather. Inference only: the operator has no gradient.
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
from mindspore import ops

__all__ = ["indexed_matmul_op"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "indexed_matmul.cc")
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


@functools.lru_cache(maxsize=None)  # once per process: every MoE layer asks
def _build_with(compiler: str, cache: str) -> Optional[str]:
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join((compiler,) + _FLAGS).encode() + _cpu_signature().encode()).hexdigest()
    library = os.path.join(cache, f"indexed_matmul-{key[:16]}.so")
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
        logger.warning("indexed_matmul: cannot build %s with %s (%s); MoE decode gathers the chosen experts' "
                       "weights instead (slower on CPU)", _SOURCE, compiler, exc)
        return None
    return library


def indexed_matmul_op(int8: bool = False) -> Optional[ops.Custom]:
    """The operator ``(x (R, D), w (E, O, D), idx (R,) int32) -> (R, O)``, float32; with ``int8``, W8A16's
    ``(x, w int8, scale (E, O) float32, idx) -> scale * (w @ x)``. None where it does not run (see the
    module docstring)."""
    if os.environ.get("MINDFORMERS_EXT_CPU_KERNELS", "1") == "0" or ms.get_context("device_target") != "CPU":
        return None
    library = _build()
    if library is None:
        return None
    name, f32 = ("IndexedMatmulInt8" if int8 else "IndexedMatmul"), ops.DataType.F32_Default
    inputs = (("x", f32), ("w", ops.DataType.I8_Default), ("scale", f32)) if int8 else (("x", f32), ("w", f32))
    inputs += (("idx", ops.DataType.I32_Default),)
    reg = ops.CustomRegOp(name)
    for i, (arg, _) in enumerate(inputs):
        reg = reg.input(i, arg)
    reg_info = reg.output(0, "out").dtype_format(*(dtype for _, dtype in inputs), f32).target("CPU").get_op_info()
    # out_shape None: the library's <name>InferShape (Python shape functions fail in dynamic shapes)
    return ops.Custom(f"{library}:{name}", out_shape=None, out_dtype=ms.float32, func_type="aot", reg_info=reg_info)
