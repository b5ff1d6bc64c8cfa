"""Tensor dtypes as the converter sees them, and exact numpy conversions between the float types.

Dtypes are named by their safetensors codes (``F32``, ``BF16``, ...). numpy has no bfloat16, so BF16
data is carried as its raw ``uint16`` bit pattern; :func:`cast` converts float32 to bfloat16 with
round-to-nearest-even exactly as torch does (NaN becomes the quiet NaN ``0x7FC0``), and bfloat16 to
float32 exactly (a 16-bit shift).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from mindformers_ext.convert.errors import ConversionError

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
