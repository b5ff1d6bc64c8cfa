"""Open a checkpoint (file or directory, any supported format) as one list of tensor entries."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable

from mindformers_ext.convert.ckpt_io import read_ckpt_index
from mindformers_ext.convert.pickle_io import PICKLE_SUFFIXES, PickleFiles, refuse_pickle
from mindformers_ext.convert.safetensors_io import INDEX_NAME, read_index, read_safetensors_header
from mindformers_ext.convert.tensors import ConversionError, TensorEntry
from mindformers_ext.convert.torch_zip import UnsafePickleError, is_torch_zip, read_torch_zip_index

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"


@dataclass
class WeightSource:
    """Tensors of a checkpoint; ``path`` (file or directory) names it in messages."""

    path: str
    format: str  # "safetensors" | "ckpt" | "torch-zip" (restricted unpickler) | "pickle" (torch.load)
    _lister: Callable[[], list[TensorEntry]]

    def entries(self) -> list[TensorEntry]:
        """All tensors, metadata only (data is read on demand), in file order; names are unique."""
        entries = self._lister()
        seen: dict[str, str] = {}
        for entry in entries:
            if entry.name in seen:
                raise ConversionError(f"{self.path}: tensor {entry.name!r} appears twice "
                                      f"({seen[entry.name]} and {entry.path})")
            seen[entry.name] = entry.path
        return entries


def open_source(path: str, allow_pickle: bool = False) -> WeightSource:
    """Open an HF model directory, a safetensors file or index, a MindSpore ``.ckpt``, or (if allowed) a pickle.

    A directory is searched for, in order: ``model.safetensors.index.json``, ``*.safetensors``,
    ``pytorch_model.bin.index.json`` / ``*.bin`` (pickles), a single ``*.ckpt``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _open_dir(path, allow_pickle)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file or directory")
    name = os.path.basename(path)
    if name.endswith(".index.json"):
        return _open_index(path, allow_pickle)
    if name.endswith(".safetensors"):
        return _safetensors(path, [path])
    if name.endswith(".ckpt"):
        return WeightSource(path, "ckpt", lambda: read_ckpt_index(path))
    if name.endswith(PICKLE_SUFFIXES):
        return _pickles(path, [path], allow_pickle)
    raise ConversionError(f"{path}: unknown checkpoint format (expected .safetensors, an .index.json, "
                          ".ckpt, a torch .bin state dict, or with --allow-pickle .pt/.pth)")


def _open_dir(path: str, allow_pickle: bool) -> WeightSource:
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return _open_index(os.path.join(path, INDEX_NAME), allow_pickle)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return _safetensors(path, files)
    if os.path.isfile(os.path.join(path, PICKLE_INDEX_NAME)):
        return _open_index(os.path.join(path, PICKLE_INDEX_NAME), allow_pickle)
    files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(PICKLE_SUFFIXES))
    if files:
        return _pickles(path, files, allow_pickle)
    files = sorted(glob.glob(os.path.join(path, "*.ckpt")))
    if len(files) == 1:
        return WeightSource(files[0], "ckpt", lambda: read_ckpt_index(files[0]))
    if files:
        raise ConversionError(f"{path}: several .ckpt files ({[os.path.basename(f) for f in files]}); "
                              "pass the one to convert")
    raise ConversionError(f"{path}: no weights found (looked for {INDEX_NAME}, *.safetensors, "
                          f"{PICKLE_INDEX_NAME}, *.bin/*.pt/*.pth, *.ckpt)")


def _open_index(index_path: str, allow_pickle: bool) -> WeightSource:
    weight_map = read_index(index_path)
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            raise ConversionError(f"{index_path}: lists shard {shard!r}, which does not exist in {folder}")
    files = [os.path.join(folder, s) for s in shards]
    if all(s.endswith(".safetensors") for s in shards):
        source = _safetensors(index_path, files)
    elif all(s.endswith(PICKLE_SUFFIXES) for s in shards):
        source = _pickles(index_path, files, allow_pickle)
    else:
        raise ConversionError(f"{index_path}: shards must all be .safetensors or all pickles, got {shards}")
    lister = source._lister  # pylint: disable=protected-access

    def checked() -> list[TensorEntry]:
        entries = lister()
        found = {e.name: os.path.basename(e.path) for e in entries}
        for name, shard in weight_map.items():
            if found.get(name) != shard:
                where = f"is in {found[name]}" if name in found else "is in no shard"
                raise ConversionError(f"{index_path}: lists tensor {name!r} in {shard}, but it {where}")
        extra = [n for n in found if n not in weight_map]
        if extra:
            raise ConversionError(f"{index_path}: shard {found[extra[0]]} holds tensor {extra[0]!r}, "
                                  "which the index does not list")
        return entries

    return WeightSource(index_path, source.format, checked)


def _safetensors(label: str, files: list[str]) -> WeightSource:
    def lister() -> list[TensorEntry]:
        out: list[TensorEntry] = []
        for f in files:
            out.extend(read_safetensors_header(f)[0])
        return out
    return WeightSource(label, "safetensors", lister)


def _pickles(label: str, files: list[str], allow_pickle: bool) -> WeightSource:
    """Pickled checkpoints. HF's ``.bin`` state dicts (torch's zip format) are read by a restricted
    unpickler that resolves only what a dict of tensors needs (:mod:`mindformers_ext.convert.torch_zip`),
    with or without ``allow_pickle``; anything else (``.pt`` / ``.pth``, legacy-format files, pickles
    holding other objects) needs ``allow_pickle`` and is then read with ``torch.load(weights_only=True)``."""
    safe = [f for f in files if f.endswith(".bin") and is_torch_zip(f)]
    if len(safe) != len(files):
        if not allow_pickle:
            other = next(f for f in files if f not in safe)
            raise refuse_pickle(other if len(files) > 1 else files[0])
        return WeightSource(label, "pickle", PickleFiles(files).entries)

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

    return WeightSource(label, "torch-zip", lister)
