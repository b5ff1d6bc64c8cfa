"""Output writers that never leave a half-written result: temp file/dir in the same folder, then rename.

Temporary outputs are named ``<output>.tmp-<pid>-<random>``. A process killed outright (kill -9, power loss)
cannot remove its own; the next conversion to the same output removes every such temp whose process is gone
(and ones of the older ``<output>.tmp-<random>`` form), never one a live process owns.
"""
from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np

from mindformers_ext.convert.ckpt_io import CkptWriter
from mindformers_ext.convert.safetensors_io import INDEX_NAME, SafetensorsWriter, check_array, parse_size, plan_shards
from mindformers_ext.convert.tensors import ConversionError, TensorInfo
from mindformers_ext.interrupts import pid_alive

_TEMP_RE = re.compile(r"\.tmp-(?:(?P<pid>\d+)-)?[0-9A-Za-z_]{6,16}")


def stale_temps(path: str) -> list[str]:
    """Temporary outputs of ``path`` left by conversions that died (their process no longer runs)."""
    found = []
    for candidate in glob.glob(glob.escape(path) + ".tmp-*"):
        match = _TEMP_RE.fullmatch(candidate[len(path):])
        if match and (match.group("pid") is None or not pid_alive(int(match.group("pid")))):
            found.append(candidate)
    return sorted(found)


def remove_stale_temps(path: str) -> None:
    for stale in stale_temps(path):
        try:
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.remove(stale)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConversionError(f"{stale}: cannot remove this stale temporary output of an interrupted "
                                  f"conversion: {exc}") from exc


class FileSink:
    """One output file: a MindSpore ``.ckpt`` or a ``.safetensors`` with our names (MindSpore loads both),
    written as ``<path>.tmp-<pid>-<random>`` and renamed into place (:meth:`commit`) or removed (:meth:`abort`)."""

    def __init__(self, path: str, metadata: Optional[dict] = None):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.metadata = metadata
        self._f = None
        self._writer = None

    def begin(self, outputs: Sequence[TensorInfo]) -> None:
        remove_stale_temps(self.path)
        if self.path.endswith(".safetensors"):
            self._writer = SafetensorsWriter(self.tmp, outputs, self.metadata)
        else:
            self._f = open(self.tmp, "xb")  # pylint: disable=consider-using-with
            self._writer = CkptWriter(self._f)

    def write(self, info: TensorInfo, array: np.ndarray) -> None:
        check_array(info, array, self.tmp)
        self._writer.write(info.name, array, info.dtype)

    def commit(self) -> list[str]:
        if self._f is not None:
            self._f.close()
        else:
            self._writer.close()  # checks that every planned tensor was written
        os.replace(self.tmp, self.path)
        return [self.path]

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
        elif self._writer is not None:
            self._writer.abort()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class HFDirSink:
    """An HF model directory: ``model.safetensors`` or shards + index, and ``config.json``, built in
    ``<dir>.tmp-<pid>-XXXX`` beside the target. A new (or empty) target appears by one rename; into an existing
    one (say, holding tokenizer files) the files are moved one by one, and weight files of an earlier
    conversion that the new set does not overwrite are removed."""

    def __init__(self, path: str, config: Optional[dict] = None, max_shard_size="5GB"):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConversionError(f"{path}: exists and is not a directory (the HF output is a directory)")
        self.config = config
        self.max_bytes = parse_size(max_shard_size)
        self.tmp = ""
        self._writers: dict[str, SafetensorsWriter] = {}
        self._shard_of: dict[str, str] = {}

    def begin(self, outputs: Sequence[TensorInfo]) -> None:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(self.path)
        self.tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(self.path)}.tmp-{os.getpid()}-", dir=parent)
        shards = plan_shards(outputs, self.max_bytes)
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            self._writers[name] = SafetensorsWriter(os.path.join(self.tmp, name), shard, {"format": "pt"})
            self._shard_of.update((info.name, name) for info in shard)
        files = {"config.json": self.config} if self.config is not None else {}
        if len(shards) > 1:
            files[INDEX_NAME] = {"metadata": {"total_size": sum(o.nbytes for o in outputs)},
                                 "weight_map": self._shard_of}
        for name, content in files.items():
            with open(os.path.join(self.tmp, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, sort_keys=name == "config.json")
                f.write("\n")

    def write(self, info: TensorInfo, array: np.ndarray) -> None:
        self._writers[self._shard_of[info.name]].write(info.name, array, info.dtype)

    def commit(self) -> list[str]:
        for writer in self._writers.values():
            writer.close()
        new = sorted(os.listdir(self.tmp))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o777 & ~mask)
        if not os.path.exists(self.path) or not os.listdir(self.path):
            os.replace(self.tmp, self.path)
        else:
            stale = [f for f in glob.glob(os.path.join(self.path, "model*.safetensors")) +
                     [os.path.join(self.path, INDEX_NAME)] if os.path.exists(f) and os.path.basename(f) not in new]
            for name in new:
                os.replace(os.path.join(self.tmp, name), os.path.join(self.path, name))
            for f in stale:
                os.remove(f)
            os.rmdir(self.tmp)
        return [os.path.join(self.path, n) for n in new]

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
        if self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
