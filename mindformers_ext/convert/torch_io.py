"""Pickled PyTorch checkpoints.

HF's ``.bin`` state dicts (``torch.save``'s zip format: ``<name>/data.pkl``, a pickle of a dict of tensors, and
one ``<name>/data/<key>`` entry per storage) are read without PyTorch and without running code: a restricted
unpickler resolves only the globals a state dict needs and refuses any other (which a malicious pickle would
need to run code) with :class:`UnsafePickleError`. Tensors become lazy entries whose storage is read only when
converted, so memory stays near the largest tensor.

Anything else (``.pt`` / ``.pth``, torch's legacy pre-zip format, pickles holding more than tensors) can run
arbitrary code when unpickled, so it needs ``allow_pickle`` and is then read with
``torch.load(weights_only=True)``, one file loaded at a time (torch is imported lazily: a test dependency).
"""
from __future__ import annotations

import collections
import functools
import math
import pickle
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from mindformers_ext.convert.tensors import STORAGE, ConversionError, TensorEntry, float_cast

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# torch storage class name -> dtype code
_STORAGE_CODES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
_TORCH_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class UnsafePickleError(ConversionError):
    """The pickle needs a global outside the state-dict allowlist (an arbitrary pickle)."""


@dataclass
class _StorageType:
    name: str


@dataclass
class _Storage:
    """One ``data/<key>`` entry of the archive: dtype code and element count."""

    zpath: str
    member: str
    code: str
    numel: int


@dataclass
class _LazyTensor:
    """What ``_rebuild_tensor_v2`` returns here: a view description into a storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("a tensor is rebuilt from something that is not a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(d) for d in stride))


def _rebuild_parameter(data, *_unused):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, zpath: str, prefix: str) -> None:
        super().__init__(file)
        self.zpath, self.prefix = zpath, prefix

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_CODES:
            return _StorageType(name)
        raise UnsafePickleError(f"{self.zpath}: the pickle needs the global {module}.{name}, which a plain state "
                                "dict of tensors does not: it is an arbitrary pickle")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.zpath}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.name not in _STORAGE_CODES:
            raise UnsafePickleError(f"{self.zpath}: storage of unsupported type {storage_type!r:.80}")
        return _Storage(self.zpath, f"{self.prefix}data/{key}", _STORAGE_CODES[storage_type.name], int(numel))


def is_torch_zip(path: str) -> bool:
    """True for a ``torch.save`` zip archive (a ``*/data.pkl`` entry)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("data.pkl") for n in archive.namelist())


def _flatten(obj, prefix: str, out: dict, path: str) -> None:
    if isinstance(obj, _LazyTensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, path)
    else:
        raise ConversionError(f"{path}: entry {prefix!r} is a {type(obj).__name__}, not a tensor: expected a "
                              "state dict of tensors")


def read_torch_zip_index(path: str) -> list[TensorEntry]:
    """The tensors of a ``torch.save`` zip archive (metadata only; data read on demand), in file order."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            pkls = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkls) != 1:
                raise ConversionError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
            prefix = pkls[0][:-len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() not in (b"little", b""):
                raise ConversionError(f"{path}: big-endian tensors are not supported")
            with archive.open(pkls[0]) as f:
                state = _RestrictedUnpickler(f, path, prefix).load()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConversionError(f"{path}: cannot read the torch archive: {exc}") from exc
    except ConversionError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ConversionError(f"{path}: corrupt pickle in the torch archive: {exc}") from exc
    tensors: dict = {}
    _flatten(state, "", tensors, path)
    entries = []
    for name, tensor in tensors.items():
        storage = tensor.storage
        if storage.member not in names:
            raise ConversionError(f"{path}: tensor {name!r} refers to missing storage {storage.member}")
        reach = tensor.offset + sum((d - 1) * s for d, s in zip(tensor.shape, tensor.stride) if d > 0)
        if math.prod(tensor.shape) and reach >= storage.numel:
            raise ConversionError(f"{path}: tensor {name!r} reaches element {reach} of a storage of {storage.numel}")
        entries.append(TensorEntry(name, storage.code, tensor.shape, path=path,
                                   reader=functools.partial(_read_tensor, tensor)))
    return entries


def _read_tensor(tensor: _LazyTensor, dst: Optional[str] = None) -> np.ndarray:
    storage = tensor.storage
    dtype = STORAGE[storage.code]
    with zipfile.ZipFile(storage.zpath) as archive:
        raw = archive.read(storage.member)
    if len(raw) < storage.numel * dtype.itemsize:
        raise ConversionError(f"{storage.zpath}: storage {storage.member} holds {len(raw)} bytes, "
                              f"{storage.numel * dtype.itemsize} expected: truncated file")
    flat = np.frombuffer(raw, dtype=dtype, count=storage.numel)
    if math.prod(tensor.shape) == 0:
        array = np.zeros(tensor.shape, dtype)
    else:
        view = np.lib.stride_tricks.as_strided(flat[tensor.offset:], shape=tensor.shape,
                                               strides=tuple(s * dtype.itemsize for s in tensor.stride))
        array = np.array(view, copy=True)
    return float_cast(array, storage.code, dst)


def refuse_pickle(path: str) -> ConversionError:
    """The error for a pickle that the restricted ``.bin`` reader does not cover, met without ``allow_pickle``."""
    return ConversionError(
        f"{path} is a pickled PyTorch checkpoint that is not a torch-zip .bin state dict (a .pt / .pth file, or "
        "torch's legacy format); loading such a pickle can execute arbitrary code. Convert it to safetensors "
        "first, or pass --allow-pickle (allow_pickle=True) if you trust the file (it is then read with "
        "torch.load(weights_only=True)).")


class PickleFiles:
    """Tensors of pickled state-dict files read with ``torch.load(weights_only=True)``, at most one file loaded."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._loaded: Optional[tuple[str, dict]] = None

    def _state_dict(self, path: str) -> dict:
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None  # drop the previous file before loading the next
            torch = _torch()
            try:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pylint: disable=broad-except
                raise ConversionError(f"{path}: torch.load(weights_only=True) failed: {exc}") from exc
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ConversionError(f"{path}: expected a flat state dict of tensors")
            self._loaded = (path, state)
        return self._loaded[1]

    def entries(self) -> list[TensorEntry]:
        out = []
        for path in self.paths:
            for name, tensor in self._state_dict(path).items():
                code = _TORCH_CODES.get(str(tensor.dtype).replace("torch.", ""))
                if code is None:
                    raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
                out.append(TensorEntry(name, code, tuple(tensor.shape), path=path,
                                       reader=functools.partial(self._read, path, name, code)))
        self._loaded = None
        return out

    def _read(self, path: str, name: str, code: str, dst: Optional[str] = None) -> np.ndarray:
        tensor = self._state_dict(path)[name].detach().contiguous()
        array = tensor.view(_torch().int16).numpy().view(np.uint16) if code == "BF16" else tensor.numpy()
        out = float_cast(array, code, dst)
        return array.copy() if out is array else out


def _torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise ConversionError("reading pickled .bin/.pt checkpoints needs PyTorch (pip install torch==2.13.0); "
                              "safetensors checkpoints do not") from exc
    return torch


def pickle_lister(files: list[str], allow_pickle: bool) -> Callable[[], list[TensorEntry]]:
    """Lists the tensors of pickled checkpoint ``files``: torch-zip ``.bin`` state dicts through the restricted
    unpickler; anything else, and a ``.bin`` it refuses, through ``torch.load`` only with ``allow_pickle``."""
    other = [f for f in files if not (f.endswith(".bin") and is_torch_zip(f))]
    if other and not allow_pickle:
        raise refuse_pickle(other[0])
    if other:
        return PickleFiles(files).entries

    def lister() -> list[TensorEntry]:
        out: list[TensorEntry] = []
        for f in files:
            try:
                out.extend(read_torch_zip_index(f))
            except UnsafePickleError as exc:
                if not allow_pickle:
                    raise ConversionError(
                        f"{exc}. Loading it could execute arbitrary code: pass --allow-pickle (allow_pickle=True) "
                        "if you trust the file (it is then read with torch.load(weights_only=True))") from exc
                out.extend(PickleFiles([f]).entries())
        return out
    return lister
