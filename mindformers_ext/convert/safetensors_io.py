"""safetensors files, read and written against the format itself, one tensor at a time.

Format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, then the raw little-endian data (offsets count from the header's
end). The reader validates what the reference implementation does (offsets contiguous from 0, sizes equal to
shape x dtype, data ending at the end of the file), so a truncated or corrupt file fails up front.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from mindformers_ext.convert.tensors import STORAGE, ConversionError, TensorEntry, TensorInfo, file_entry

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the reference implementation's limit
INDEX_NAME = "model.safetensors.index.json"


def read_safetensors_header(path: str) -> tuple[list[TensorEntry], dict[str, str]]:
    """Parse and validate ``path``'s header; return its tensors (in data order) and ``__metadata__``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: {size} bytes is too small to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ConversionError(f"{path}: header length {n} does not fit the file ({size} bytes): "
                                      "not a safetensors file, or a corrupt or truncated one")
            raw = f.read(n)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: the safetensors header is not valid JSON ({exc}): corrupt file") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: the safetensors header is not a JSON object: corrupt file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConversionError(f"{path}: __metadata__ is not a JSON object: corrupt file")
    entries, expect = [], 0
    for (begin, end), name, desc in sorted((_check_entry(path, k, v), k, v) for k, v in header.items()):
        if begin != expect:
            raise ConversionError(f"{path}: tensor {name!r} starts at data offset {begin}, expected {expect} "
                                  "(overlapping or missing data): corrupt file")
        expect = end
        if 8 + n + end > size:
            raise ConversionError(f"{path}: tensor {name!r} needs bytes up to {8 + n + end} but the file "
                                  f"has {size}: the file is truncated")
        entries.append(file_entry(path, name, desc["dtype"], tuple(desc["shape"]), [(8 + n + begin, end - begin)]))
    if 8 + n + expect != size:
        what = "is truncated" if 8 + n + expect > size else "has trailing bytes after the last tensor"
        raise ConversionError(f"{path}: the header describes {8 + n + expect} bytes but the file has "
                              f"{size}: the file {what}")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(path: str, name: str, desc) -> tuple[int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(desc, dict) or not {"dtype", "shape", "data_offsets"} <= desc.keys():
        raise ConversionError(f"{where}: header entry lacks dtype/shape/data_offsets: corrupt file")
    dtype, shape, offsets = desc["dtype"], desc["shape"], desc["data_offsets"]
    if dtype not in STORAGE:
        raise ConversionError(f"{where}: unsupported dtype {dtype!r} (supported: {sorted(STORAGE)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ConversionError(f"{where}: bad shape {shape!r}: corrupt file")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ConversionError(f"{where}: bad data_offsets {offsets!r}: corrupt file")
    need = TensorInfo(name, dtype, tuple(shape)).nbytes
    if offsets[1] - offsets[0] != need:
        raise ConversionError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but "
                              f"shape {shape} of {dtype} needs {need}: corrupt file")
    return offsets[0], offsets[1]


def read_index(index_path: str) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint's index file (tensor name -> shard file name)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{index_path}: cannot read the index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index_path}: no 'weight_map' object of tensor name -> shard file")
    for shard in set(weight_map.values()):
        if os.path.basename(shard) != shard:
            raise ConversionError(f"{index_path}: shard {shard!r} is not a plain file name")
    return weight_map


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """``'5GB'`` -> 5 * 10**9, ``'5GiB'`` -> 5 * 2**30, an int stays (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"size {size!r} is not like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])


def check_array(info: TensorInfo, array: np.ndarray, where: str) -> None:
    """Fail unless ``array`` has ``info``'s shape and storage dtype."""
    if tuple(array.shape) != tuple(info.shape) or array.dtype != STORAGE[info.dtype]:
        raise ConversionError(f"{where}: tensor {info.name!r} is {array.dtype}{list(array.shape)}, "
                              f"planned {info.dtype}{list(info.shape)}")


class SafetensorsWriter:
    """One safetensors file whose header is fixed up front; tensors then arrive in any order. Use as a
    context manager or call :meth:`close`, which checks that every tensor was written."""

    def __init__(self, path: str, infos: Sequence[TensorInfo], metadata: Optional[Mapping[str, str]] = None):
        self.path = path
        self._infos = {i.name: i for i in infos}
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._offsets: dict[str, int] = {}
        pos = 0
        for info in infos:
            if info.name in self._offsets or info.name == "__metadata__":
                raise ConversionError(f"tensor name {info.name!r} is duplicated or reserved")
            self._offsets[info.name] = pos
            header[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                                 "data_offsets": [pos, pos + info.nbytes]}
            pos += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._f = open(path, "xb")  # pylint: disable=consider-using-with
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray, dtype: Optional[str] = None) -> None:  # pylint: disable=W0613
        """Write ``array`` (storage dtype of the planned dtype, which ``dtype`` may repeat) as tensor ``name``."""
        info = self._infos.get(name)
        if info is None:
            raise ConversionError(f"{self.path}: tensor {name!r} is not in the planned header")
        if name in self._written:
            raise ConversionError(f"{self.path}: tensor {name!r} written twice")
        check_array(info, array, self.path)
        self._f.seek(self._data_start + self._offsets[name])
        self._f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._infos if n not in self._written]
        self._f.close()
        if missing:
            raise ConversionError(f"{self.path}: tensors never written: {missing[:5]}")

    def abort(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def plan_shards(infos: Iterable[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Split ``infos`` (in order) into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards
