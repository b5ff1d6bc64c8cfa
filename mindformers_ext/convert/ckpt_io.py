"""MindSpore ``.ckpt`` files, streamed: written Value by Value, read by walking the protobuf.

The file is a serialised ``Checkpoint { repeated Value value = 1; }`` (mindspore/train/checkpoint.proto) with
``Value { string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }`` and ``TensorProto
{ repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }``. A repeated field is a run
of tagged, length-prefixed records, so a file can be appended to one Value at a time. MindSpore splits
tensors over 512 MiB into consecutive Values with the same tag and the full dims, which its loader joins;
so do we. ``save_checkpoint(crc_check=True)`` appends ``b"crc_num"`` + 10 bytes, skipped like MindSpore does.
"""
from __future__ import annotations

import mmap
import os
from typing import BinaryIO

import numpy as np

from mindformers_ext.convert.tensors import STORAGE, ConversionError, TensorEntry, TensorInfo, file_entry

SLICE_BYTES = 512 * 1024 * 1024  # mindspore.train.serialization: SLICE_SIZE (KB) * 1024
_CRC_TRAILER = 17  # b"crc_num" + 10-byte big-endian crc
# code <-> TensorProto.tensor_type (mindspore/train/serialization.py tensor_to_ms_type)
CKPT_TYPES = {"F64": "Float64", "F32": "Float32", "F16": "Float16", "BF16": "BFloat16", "I64": "Int64",
              "I32": "Int32", "I16": "Int16", "I8": "Int8", "U64": "UInt64", "U32": "UInt32", "U16": "UInt16",
              "U8": "UInt8", "BOOL": "Bool"}
FROM_CKPT_TYPES = {v: k for k, v in CKPT_TYPES.items()}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


class _Corrupt(Exception):
    pass


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt(f"bad varint at offset {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """Yield ``(field, wire, value_or_start, length)`` of one message in ``buf[pos:end]``."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
            yield field, wire, value, 0
            continue
        if wire == 2:
            size, pos = _read_varint(buf, pos, end)
            if pos + size > end:
                raise _Corrupt(f"field {field} at offset {pos} claims {size} bytes, only {end - pos} remain")
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _Corrupt(f"field {field} at offset {pos} runs past its message")
        else:
            raise _Corrupt(f"unsupported wire type {wire} (field {field}) at offset {pos}")
        yield field, wire, pos, size
        pos += size


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def read_ckpt_index(path: str) -> list[TensorEntry]:
    """``path``'s tensors in file order, data unread. Consecutive Values with one tag are one tensor in
    slices; ``str`` entries (metadata MindSpore can append) come back with dtype ``"STR"`` and no reader."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ConversionError(f"{path}: empty file, not a MindSpore checkpoint")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            crc = size >= _CRC_TRAILER and mm[size - 17:size - 10] == b"crc_num"
            records = _walk(mm, size - _CRC_TRAILER if crc else size, path)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read: {exc}") from exc
    entries = []
    seen: set[str] = set()
    for tag, ttype, dims, parts in records:
        where = f"{path}: tensor {tag!r}"
        if tag in seen:
            raise ConversionError(f"{where} appears twice (not in consecutive slices): corrupt checkpoint")
        seen.add(tag)
        if ttype == "str":
            entries.append(TensorEntry(tag, "STR", (), path=path))
            continue
        if ttype not in FROM_CKPT_TYPES:
            raise ConversionError(f"{where}: unsupported tensor_type {ttype!r} "
                                  f"(supported: {sorted(FROM_CKPT_TYPES)})")
        dtype, shape = FROM_CKPT_TYPES[ttype], tuple(dims)
        stored = sum(length for _, length in parts)
        if shape == (0,) and stored == STORAGE[dtype].itemsize:  # MindSpore's loader reads dims [0] as a scalar
            shape = ()
        if any(d < 0 for d in shape):
            raise ConversionError(f"{where}: negative dims {list(dims)}: corrupt checkpoint")
        need = TensorInfo(tag, dtype, shape).nbytes
        if stored != need:
            raise ConversionError(f"{where}: {stored} bytes of data but dims {list(dims)} of {ttype} need "
                                  f"{need}: truncated or corrupt checkpoint")
        entries.append(file_entry(path, tag, dtype, shape, parts))
    return entries


def _walk(mm, end: int, path: str) -> list[tuple[str, str, list[int], list[tuple[int, int]]]]:
    """[(tag, tensor_type, dims, [(content offset, length), ...]), ...] with slices merged."""
    records: list = []
    pos = count = 0
    while pos < end:
        start = pos
        try:
            key, pos = _read_varint(mm, pos, end)
            if key != (1 << 3 | 2):
                raise _Corrupt(f"expected a Value record (field 1), found field {key >> 3} wire type {key & 7}")
            length, pos = _read_varint(mm, pos, end)
        except _Corrupt as exc:
            raise ConversionError(f"{path}: entry #{count} at byte {start}: {exc}: not a MindSpore checkpoint, "
                                  "or a corrupt one") from None
        if pos + length > end:
            raise ConversionError(f"{path}: entry #{count} at byte {start} claims {length} bytes but only "
                                  f"{end - pos} remain: the file is truncated")
        try:
            tag, ttype, dims, content = _parse_value(mm, pos, pos + length)
        except _Corrupt as exc:
            raise ConversionError(f"{path}: entry #{count} at byte {start}: {exc}: corrupt checkpoint") from None
        except UnicodeDecodeError:
            raise ConversionError(f"{path}: entry #{count} at byte {start}: tag is not UTF-8: corrupt checkpoint") \
                from None
        if records and records[-1][0] == tag:
            prev = records[-1]
            if prev[1] != ttype or prev[2] != dims:
                raise ConversionError(f"{path}: tensor {tag!r}: slices disagree on dims/type "
                                      f"({prev[2]} {prev[1]} vs {dims} {ttype}): corrupt checkpoint")
            prev[3].append(content)
        else:
            records.append((tag, ttype, dims, [content]))
        pos += length
        count += 1
    return records


def _parse_value(mm, pos: int, end: int):
    tag = tensor = ttype = content = None
    for field, wire, start, length in _fields(mm, pos, end):
        if field == 1 and wire == 2:
            tag = bytes(mm[start:start + length]).decode("utf-8")
        elif field == 2 and wire == 2:
            tensor = (start, start + length)
        elif field == 3 and wire == 2:
            raise _Corrupt(f"tag {tag!r}: MapTensor entries are not supported")
    if tag is None:
        raise _Corrupt("Value without a tag")
    if tensor is None:
        raise _Corrupt(f"tag {tag!r}: Value without a tensor")
    dims: list[int] = []
    for field, wire, start, length in _fields(mm, *tensor):
        if field == 1 and wire == 0:
            dims.append(_signed(start))
        elif field == 1 and wire == 2:  # packed dims
            p = start
            while p < start + length:
                value, p = _read_varint(mm, p, start + length)
                dims.append(_signed(value))
        elif field == 2 and wire == 2:
            ttype = bytes(mm[start:start + length]).decode("utf-8")
        elif field == 3 and wire == 2:
            content = (start, length)
    if ttype is None or content is None:
        raise _Corrupt(f"tag {tag!r}: TensorProto without tensor_type or tensor_content")
    return tag, ttype, dims, content


class CkptWriter:
    """Appends tensors to a MindSpore checkpoint, one Value (or 512 MiB slice) at a time; the bytes match
    what ``mindspore.save_checkpoint`` writes."""

    def __init__(self, fileobj: BinaryIO, slice_bytes: int = SLICE_BYTES):
        self._f = fileobj
        self._slice = slice_bytes
        self._names: set[str] = set()

    def write(self, name: str, array: np.ndarray, dtype: str) -> None:
        """Append ``array`` (storage dtype of code ``dtype``; BF16 as uint16) under ``name``."""
        if dtype not in CKPT_TYPES:
            raise ConversionError(f"tensor {name!r}: dtype {dtype} cannot be stored in a MindSpore checkpoint")
        if name in self._names:
            raise ConversionError(f"tensor {name!r} written twice")
        self._names.add(name)
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        dims = b"".join(_varint(1 << 3) + _varint(int(d)) for d in array.shape)
        ttype, tag = _len_field(2, CKPT_TYPES[dtype].encode()), _len_field(1, name.encode("utf-8"))
        for start in range(0, max(len(data), 1), self._slice):
            chunk = data[start:start + self._slice]
            tensor_head = dims + ttype + _varint(3 << 3 | 2) + _varint(len(chunk))
            value_head = tag + _varint(2 << 3 | 2) + _varint(len(tensor_head) + len(chunk)) + tensor_head
            self._f.write(_varint(1 << 3 | 2) + _varint(len(value_head) + len(chunk)) + value_head)
            self._f.write(chunk)
