"""PyTorch ``.bin`` state dicts (``torch.save``'s zip format) read without PyTorch and without running code.

HF's ``pytorch_model.bin`` (and its ``pytorch_model-0000N-of-0000M.bin`` shards) is a zip archive
holding ``<name>/data.pkl`` -- a pickle of a dict of tensors -- and one entry ``<name>/data/<key>`` per
storage. The pickle is read by a restricted unpickler that only resolves the handful of globals a
state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` /
``_rebuild_parameter``, the ``torch.*Storage`` types); any other global (which a malicious pickle
would need to run code) is refused with :class:`UnsafePickleError` naming it. Tensors become lazy
entries: a tensor's storage is read from the archive only when the tensor is converted, so memory
stays near the largest tensor.

Legacy (pre-zip, torch < 1.6) files and pickles holding more than tensors are not read here; the
caller falls back to ``torch.load(weights_only=True)`` where the user allows pickles.
"""
from __future__ import annotations

import collections
import functools
import math
import pickle
import zipfile
from typing import Optional

import numpy as np

from mindformers_ext.convert.tensors import STORAGE, ConversionError, TensorEntry, cast, is_float

__all__ = ["UnsafePickleError", "is_torch_zip", "read_torch_zip_index"]

# torch storage class name -> dtype code
_STORAGE_CODES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


class UnsafePickleError(ConversionError):
    """The pickle needs a global outside the state-dict allowlist (an arbitrary pickle)."""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    """One ``data/<key>`` entry of the archive: dtype code and element count."""

    def __init__(self, zpath: str, member: str, code: str, numel: int) -> None:
        self.zpath, self.member, self.code, self.numel = zpath, member, code, numel


class _LazyTensor:
    """What ``_rebuild_tensor_v2`` returns here: a view description into a storage."""

    def __init__(self, storage: _Storage, offset: int, size, stride) -> None:
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):  # pylint: disable=unused-argument
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("a tensor is rebuilt from something that is not a storage")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):  # pylint: disable=unused-argument
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):  # pylint: disable=W0613
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
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
            pkls = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkls) != 1:
                raise ConversionError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
            prefix = pkls[0][:-len("data.pkl")]
            names = set(archive.namelist())
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() not in (b"little", b""):
                raise ConversionError(f"{path}: big-endian tensors are not supported")
            with archive.open(pkls[0]) as f:
                state = _RestrictedUnpickler(f, path, prefix).load()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConversionError(f"{path}: cannot read the torch archive: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, ConversionError):
            raise
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
        reader = functools.partial(_read_tensor, tensor)
        entries.append(TensorEntry(name, storage.code, tensor.shape, path=path, reader=reader))
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
    if dst is not None and dst != storage.code and is_float(storage.code) and is_float(dst):
        return cast(array, storage.code, dst)
    return array
