"""Open a checkpoint (file or directory, any supported format) as one list of tensor entries."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from mindformers_ext.convert.ckpt_io import read_ckpt_index
from mindformers_ext.convert.safetensors_io import INDEX_NAME, read_index, read_safetensors_header
from mindformers_ext.convert.tensors import ConversionError, TensorEntry
from mindformers_ext.convert.torch_io import PICKLE_SUFFIXES, pickle_lister

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"


@dataclass
class WeightSource:
    """Tensors of a checkpoint; ``path`` (file or directory) names it in messages."""

    path: str
    lister: Callable[[], list[TensorEntry]]
    _entries: Optional[list] = field(default=None, init=False, repr=False)

    def entries(self) -> list[TensorEntry]:
        """All tensors, metadata only (data is read on demand), in file order; names are unique. Listed once:
        the converter asks again (recognising a fused checkpoint, then planning)."""
        if self._entries is not None:
            return self._entries
        entries = self.lister()
        seen: dict[str, str] = {}
        for entry in entries:
            if entry.name in seen:
                raise ConversionError(f"{self.path}: tensor {entry.name!r} appears twice "
                                      f"({seen[entry.name]} and {entry.path})")
            seen[entry.name] = entry.path
        self._entries = entries
        return entries


def open_source(path: str, allow_pickle: bool = False) -> WeightSource:
    """Open an HF model directory, a safetensors file or index, a MindSpore ``.ckpt``, or a torch pickle.

    A directory is searched for, in order: ``model.safetensors.index.json``, ``*.safetensors``,
    ``pytorch_model.bin.index.json`` / ``*.bin`` (pickles), a single ``*.ckpt``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _open_dir(path, allow_pickle)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file or directory")
    if path.endswith(".index.json"):
        return _open_index(path, allow_pickle)
    if path.endswith(".ckpt"):
        return WeightSource(path, lambda: read_ckpt_index(path))
    if path.endswith((".safetensors",) + PICKLE_SUFFIXES):
        return _open_files(path, [path], allow_pickle)
    raise ConversionError(f"{path}: unknown checkpoint format (expected .safetensors, an .index.json, "
                          ".ckpt, a torch .bin state dict, or with --allow-pickle .pt/.pth)")


def _open_dir(path: str, allow_pickle: bool) -> WeightSource:
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return _open_index(os.path.join(path, INDEX_NAME), allow_pickle)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files and os.path.isfile(os.path.join(path, PICKLE_INDEX_NAME)):
        return _open_index(os.path.join(path, PICKLE_INDEX_NAME), allow_pickle)
    files = files or sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(PICKLE_SUFFIXES))
    if files:
        return _open_files(path, files, allow_pickle)
    files = sorted(glob.glob(os.path.join(path, "*.ckpt")))
    if len(files) == 1:
        return WeightSource(files[0], lambda: read_ckpt_index(files[0]))
    if files:
        raise ConversionError(f"{path}: several .ckpt files ({[os.path.basename(f) for f in files]}); "
                              "pass the one to convert")
    raise ConversionError(f"{path}: no weights found (looked for {INDEX_NAME}, *.safetensors, "
                          f"{PICKLE_INDEX_NAME}, *.bin/*.pt/*.pth, *.ckpt)")


def _open_files(label: str, files: list[str], allow_pickle: bool) -> WeightSource:
    """``files``: all safetensors, or all pickles."""
    if files and not files[0].endswith(".safetensors"):
        return WeightSource(label, pickle_lister(files, allow_pickle))
    return WeightSource(label, lambda: [e for f in files for e in read_safetensors_header(f)[0]])


def _open_index(index_path: str, allow_pickle: bool) -> WeightSource:
    weight_map = read_index(index_path)
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            raise ConversionError(f"{index_path}: lists shard {shard!r}, which does not exist in {folder}")
    if not (all(s.endswith(".safetensors") for s in shards) or all(s.endswith(PICKLE_SUFFIXES) for s in shards)):
        raise ConversionError(f"{index_path}: shards must all be .safetensors or all pickles, got {shards}")
    lister = _open_files(index_path, [os.path.join(folder, s) for s in shards], allow_pickle).lister

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

    return WeightSource(index_path, checked)
