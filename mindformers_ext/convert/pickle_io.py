"""Pickled PyTorch checkpoints that the restricted reader (:mod:`mindformers_ext.convert.torch_zip`, HF's
``.bin`` state dicts) does not cover (``.pt`` / ``.pth``, legacy-format files), only when the user allows it.

Unpickling can run arbitrary code, so this path is opt-in (``--allow-pickle``) and even then uses
``torch.load(weights_only=True)``. Files are loaded one at a time (memory-mapped when the file uses
torch's zip format); torch is imported lazily because it is only a test dependency.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from mindformers_ext.convert.tensors import ConversionError, TensorEntry, cast, is_float

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

_TORCH_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def refuse_pickle(path: str) -> ConversionError:
    """The error for a pickle that the restricted ``.bin`` reader does not cover, met without ``allow_pickle``."""
    return ConversionError(
        f"{path} is a pickled PyTorch checkpoint that is not a torch-zip .bin state dict (a .pt / .pth file, or "
        "torch's legacy format); loading such a pickle can execute arbitrary code. Convert it to safetensors "
        "first, or pass --allow-pickle (allow_pickle=True) if you trust the file (it is then read with "
        "torch.load(weights_only=True)).")


def _torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise ConversionError("reading pickled .bin/.pt checkpoints needs PyTorch (pip install torch==2.13.0); "
                              "safetensors checkpoints do not") from exc
    return torch


class PickleFiles:
    """Tensors of pickled state-dict files, keeping at most one file loaded."""

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
                reader = functools.partial(self._read, path, name, code)
                out.append(TensorEntry(name, code, tuple(tensor.shape), path=path, reader=reader))
        self._loaded = None
        return out

    def _read(self, path: str, name: str, code: str, dst: Optional[str] = None) -> np.ndarray:
        torch = _torch()
        tensor = self._state_dict(path)[name].detach().contiguous()
        if code == "BF16":
            array = tensor.view(torch.int16).numpy().view(np.uint16)
        else:
            array = tensor.numpy()
        if dst is not None and dst != code and is_float(code) and is_float(dst):
            return cast(array, code, dst)
        return array.copy()
