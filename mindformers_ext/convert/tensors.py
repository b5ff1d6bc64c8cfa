"""Tensor dtypes, metadata and lazy, bounded-memory reads of tensor payloads from files; the one error type.

Dtypes are named by their safetensors codes (``F32``, ``BF16``, ...). numpy has no bfloat16, so BF16
data is carried as its raw ``uint16`` bit pattern (the one bf16 representation inside the converter;
:func:`mindformers_ext.convert.engine.mindspore_arrays` views it as MindSpore's numpy bfloat16 at the
end); :func:`cast` converts float32 to bfloat16 with round-to-nearest-even exactly as torch does (NaN
becomes the quiet NaN ``0x7FC0``), and bfloat16 to float32 exactly (a 16-bit shift).

A payload is read with ``readinto`` into an array the caller owns, so resident memory grows by the
tensor itself and nothing else (mapped file pages would also count towards the process' RSS). When a
dtype change is asked for, the file is read in small chunks that are converted into the output array,
so the source-dtype copy of a large tensor never exists in memory.
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
# code <-> MindSpore checkpoint ``TensorProto.tensor_type`` (mindspore/train/serialization.py tensor_to_ms_type)
CKPT_TYPES = {
    "F64": "Float64", "F32": "Float32", "F16": "Float16", "BF16": "BFloat16",
    "I64": "Int64", "I32": "Int32", "I16": "Int16", "I8": "Int8",
    "U64": "UInt64", "U32": "UInt32", "U16": "UInt16", "U8": "UInt8", "BOOL": "Bool",
}
FROM_CKPT_TYPES = {v: k for k, v in CKPT_TYPES.items()}
# user-facing names (ours, upstream MindFormers' fp32/fp16/bf16, numpy/torch spellings) -> code
_ALIASES = {
    "float32": "F32", "fp32": "F32", "f32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64", "double": "F64",
}


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


def itemsize(code: str) -> int:
    """Bytes per element of ``code``."""
    return STORAGE[code].itemsize


def is_float(code: str) -> bool:
    """Whether ``code`` is one of the float types :func:`cast` converts between."""
    return code in FLOATS


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
    """Convert an array stored as ``src`` (see :data:`STORAGE`) to ``dst`` storage; floats only.

    Conversions go through float32 (exact for F16/BF16 sources), so F16 -> BF16 rounds once, like torch.
    """
    if src == dst:
        return data
    if not (is_float(src) and is_float(dst)):
        raise ConversionError(f"cannot convert {src} data to {dst}: only float types are converted")
    if src == "BF16":
        values = bf16_to_f32(data)
    elif src == "F64" and dst != "BF16":
        with np.errstate(over="ignore"):
            return data.astype(STORAGE[dst])
    else:
        values = data.astype(np.float32, copy=False)
    if dst == "BF16":
        return f32_to_bf16(values)
    with np.errstate(over="ignore"):  # out of float16 range -> inf, as torch does
        return values.astype(STORAGE[dst], copy=False)


CHUNK_BYTES = 4 << 20  # source bytes converted per step when casting while reading


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype code and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class TensorEntry(TensorInfo):
    """A tensor in a checkpoint file: its metadata, the file, and how to read its data.

    ``reader(dtype)`` returns the tensor as an owned numpy array in storage dtype ``dtype`` (or the
    stored dtype when ``None``); BF16 comes back as raw uint16.
    """

    path: str = ""
    reader: Optional[Callable[[Optional[str]], np.ndarray]] = field(default=None, repr=False, compare=False)

    def read(self, dtype: Optional[str] = None) -> np.ndarray:
        """The tensor's data, converted to ``dtype`` (a float code) when given and different."""
        if self.reader is None:
            raise ConversionError(f"{self.name}: metadata-only entry has no data")
        return self.reader(dtype)


def file_entry(path: str, name: str, dtype: str, shape: tuple[int, ...],
               ranges: Sequence[tuple[int, int]]) -> TensorEntry:
    """An entry whose data is the byte ``ranges`` of ``path`` (safetensors: one; .ckpt: one per slice)."""
    def reader(dst: Optional[str] = None) -> np.ndarray:
        return read_ranges(path, ranges, dtype, shape, dst, where=f"{path}: tensor {name!r}")
    return TensorEntry(name, dtype, shape, path=path, reader=reader)


def read_exact(fileobj, view: memoryview, where: str) -> None:
    """Fill ``view`` from ``fileobj``'s current position (loops: one read() may return less)."""
    got = 0
    total = len(view)
    while got < total:
        n = fileobj.readinto(view[got:])
        if not n:
            raise ConversionError(f"{where}: file ended after {got} of {total} bytes (truncated file?)")
        got += n


def read_ranges(path: str, ranges: Sequence[tuple[int, int]], src: str, shape: tuple[int, ...],
                dst: Optional[str] = None, where: str = "") -> np.ndarray:
    """Read a tensor stored as the byte ``ranges`` ``[(offset, length), ...]`` of ``path`` (concatenated).

    Returns an owned array of ``shape`` in storage dtype ``dst`` (``src`` when ``None`` or non-float).
    """
    where = where or path
    count = math.prod(shape)
    convert = dst is not None and dst != src and is_float(src) and is_float(dst)
    with open(path, "rb", buffering=0) as f:
        stream = _RangeStream(f, ranges, where)
        if not convert:
            out = np.empty(count, dtype=STORAGE[src])
            stream.readinto(_bytes_view(out))
            return out.reshape(shape)
        out = np.empty(count, dtype=STORAGE[dst])
        step = max(1, CHUNK_BYTES // itemsize(src))
        buf = np.empty(min(step, count), dtype=STORAGE[src])
        for start in range(0, count, step):
            part = buf[:min(step, count - start)]
            stream.readinto(_bytes_view(part))
            out[start:start + len(part)] = cast(part, src, dst)
        return out.reshape(shape)


def _bytes_view(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


class _RangeStream:
    """Sequential reads across a list of (offset, length) byte ranges of one open file."""

    def __init__(self, f, ranges: Sequence[tuple[int, int]], where: str):
        self._f = f
        self._ranges = list(ranges)
        self._where = where
        self._idx = 0
        self._left = self._ranges[0][1] if self._ranges else 0
        if self._ranges:
            f.seek(self._ranges[0][0])

    def readinto(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            while self._left == 0:
                self._idx += 1
                if self._idx >= len(self._ranges):
                    raise ConversionError(f"{self._where}: stored data is shorter than the tensor")
                offset, self._left = self._ranges[self._idx]
                self._f.seek(offset)
            n = min(self._left, len(view) - pos)
            read_exact(self._f, view[pos:pos + n], self._where)
            pos += n
            self._left -= n
