"""Tensor dtypes, metadata and bounded-memory reads of tensor payloads; the one error type.

Dtypes are named by their safetensors codes (``F32``, ``BF16``, ...). numpy has no bfloat16, so BF16 data is
carried as its raw ``uint16`` bit pattern everywhere inside the converter (the one bf16 representation;
:func:`mindformers_ext.convert.engine.mindspore_arrays` views it as MindSpore's bfloat16 at the very end).

Payloads are read with ``readinto`` into an array the caller owns, so resident memory grows by the tensor and
nothing else (mapped pages would count towards RSS); a dtype change converts small chunks into the output, so
the source-dtype copy of a large tensor never exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np


class ConversionError(ValueError):
    """A checkpoint, weight map or config cannot be converted; the message names the file / tensor at fault."""


# code -> numpy storage dtype (little-endian, as both file formats store data)
STORAGE = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
FLOATS = ("F64", "F32", "F16", "BF16")
# user-facing names (ours, upstream MindFormers' fp32/fp16/bf16, numpy/torch spellings) -> code
_ALIASES = {"float32": "F32", "fp32": "F32", "f32": "F32", "float": "F32",
            "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
            "bfloat16": "BF16", "bf16": "BF16", "float64": "F64", "fp64": "F64", "double": "F64"}
CHUNK_BYTES = 4 << 20  # source bytes converted per step when casting while reading


def normalize_dtype(name: Optional[str]) -> Optional[str]:
    """``'bfloat16'`` / ``'bf16'`` / ``'BF16'`` / ``'torch.bfloat16'`` -> ``'BF16'``; ``None`` stays ``None``."""
    if name is None:
        return None
    key = str(name).lower().replace("torch.", "").replace("mindspore.", "")
    if key in _ALIASES:
        return _ALIASES[key]
    if str(name).upper() in STORAGE:
        return str(name).upper()
    raise ConversionError(f"dtype {name!r} is not supported; use float32, float16 or bfloat16")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN -> 0x7FC0 (torch's rule)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # For every non-NaN value (infinities included) bits + 0x7FFF + lsb stays below 2**32.
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def cast(data: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert an array stored as ``src`` to ``dst`` storage (floats only), through float32 like torch
    (exact for F16/BF16 sources, so F16 -> BF16 rounds once); out of float16 range becomes inf."""
    if src == dst:
        return data
    if src not in FLOATS or dst not in FLOATS:
        raise ConversionError(f"cannot convert {src} data to {dst}: only float types are converted")
    if src == "F64" and dst != "BF16":
        with np.errstate(over="ignore"):
            return data.astype(STORAGE[dst])
    values = bf16_to_f32(data) if src == "BF16" else data.astype(np.float32, copy=False)
    if dst == "BF16":
        return f32_to_bf16(values)
    with np.errstate(over="ignore"):
        return values.astype(STORAGE[dst], copy=False)


def float_cast(array: np.ndarray, src: str, dst: Optional[str]) -> np.ndarray:
    """``array`` cast to ``dst`` when both are float codes and differ, else ``array`` itself."""
    return cast(array, src, dst) if dst is not None and dst != src and src in FLOATS and dst in FLOATS else array


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype code and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE[self.dtype].itemsize


@dataclass(frozen=True)
class TensorEntry(TensorInfo):
    """A tensor in a checkpoint file; ``reader(dtype)`` returns it as an owned array in storage dtype
    ``dtype`` (a float code; ``None``: as stored)."""

    path: str = ""
    reader: Optional[Callable[[Optional[str]], np.ndarray]] = field(default=None, repr=False, compare=False)

    def read(self, dtype: Optional[str] = None) -> np.ndarray:
        if self.reader is None:
            raise ConversionError(f"{self.name}: metadata-only entry has no data")
        return self.reader(dtype)


def file_entry(path: str, name: str, dtype: str, shape: tuple[int, ...],
               ranges: Sequence[tuple[int, int]]) -> TensorEntry:
    """An entry whose data is the byte ``ranges`` of ``path`` (safetensors: one; .ckpt: one per slice)."""
    def reader(dst: Optional[str] = None) -> np.ndarray:
        return read_ranges(path, ranges, dtype, shape, dst, where=f"{path}: tensor {name!r}")
    return TensorEntry(name, dtype, shape, path=path, reader=reader)


def read_ranges(path: str, ranges: Sequence[tuple[int, int]], src: str, shape: tuple[int, ...],
                dst: Optional[str] = None, where: str = "") -> np.ndarray:
    """The tensor stored as the byte ``ranges`` ``[(offset, length), ...]`` of ``path`` (concatenated), as an
    owned array of ``shape`` in storage dtype ``dst`` (``src`` when ``None`` or not a float conversion)."""
    where, count, left = where or path, math.prod(shape), [list(r) for r in ranges]
    if dst is None or dst == src or src not in FLOATS or dst not in FLOATS:
        dst = src
    out = np.empty(count, dtype=STORAGE[dst])
    step = max(count, 1) if dst == src else max(1, CHUNK_BYTES // STORAGE[src].itemsize)
    buf = out if dst == src else np.empty(min(step, count), dtype=STORAGE[src])
    with open(path, "rb", buffering=0) as f:
        for start in range(0, count, step):
            part = buf[:min(step, count - start)]
            _fill(f, left, memoryview(part.view(np.uint8)), where)
            if dst != src:
                out[start:start + len(part)] = cast(part, src, dst)
    return out.reshape(shape)


def _fill(f, ranges: list[list[int]], view: memoryview, where: str) -> None:
    """Fill ``view`` from the front of ``ranges`` (``[offset, length]`` pairs, consumed as read)."""
    pos = 0
    while pos < len(view):
        if not ranges:
            raise ConversionError(f"{where}: stored data is shorter than the tensor")
        offset, length = ranges[0]
        if length == 0:
            ranges.pop(0)
            continue
        f.seek(offset)
        n = f.readinto(view[pos:pos + min(length, len(view) - pos)])
        if not n:
            raise ConversionError(f"{where}: file ended after {pos} of {len(view)} bytes (truncated file?)")
        pos += n
        ranges[0] = [offset + n, length - n]
