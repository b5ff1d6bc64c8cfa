"""All-or-nothing MindRecord output.

MindSpore's ``FileWriter`` writes ``NAME`` and an index ``NAME.db`` (``NAME0``, ``NAME1``, ... and
their ``.db`` with ``shard_num > 1``). The files record their own base names, so they cannot be
written under a temporary name and renamed. Instead they are written, under their final base
names, into a hidden temporary directory next to the output, and moved into place only after
``commit()`` succeeded; on any error (and on SIGTERM / SIGINT / SIGHUP) the directory is removed, so
a failed run leaves no output. The directory is ``.NAME.<pid>-XXXXXXXX.tmp``; one left by a run killed
outright (kill -9) is removed by the next run writing ``NAME``, once its process is gone.
"""
import glob
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, List

from mindformers_ext.interrupts import pid_alive, raise_on_signals

__all__ = ["SFT_SCHEMA", "output_files", "AtomicMindRecordWriter"]

SFT_SCHEMA: Dict[str, dict] = {
    "input_ids": {"type": "int32", "shape": [-1]},
    "labels": {"type": "int32", "shape": [-1]},
}


def output_files(output_file: str, shard_num: int = 1) -> List[str]:
    """Paths that a MindRecord of ``shard_num`` shards named ``output_file`` consists of."""
    shards = [output_file] if shard_num == 1 else [f"{output_file}{i}" for i in range(shard_num)]
    return [p for shard in shards for p in (shard, shard + ".db")]


_TEMP_DIR_RE = re.compile(r"(?:(?P<pid>\d+)-)?[0-9a-z_]{8}\.tmp")


def stale_temp_dirs(output_file: str) -> List[str]:
    """Temporary directories of ``output_file`` left by runs whose process is gone."""
    parent, name = os.path.split(os.path.abspath(output_file))
    prefix = f".{name}."
    found = []
    for path in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*.tmp")):
        match = _TEMP_DIR_RE.fullmatch(os.path.basename(path)[len(prefix):])
        if match and os.path.isdir(path) and (match.group("pid") is None or not pid_alive(int(match.group("pid")))):
            found.append(path)
    return sorted(found)


class AtomicMindRecordWriter:
    """Context manager: ``with AtomicMindRecordWriter(path) as w: w.write(rows)``.

    Args:
        output_file: final MindRecord path.
        schema: MindRecord schema (default: int32 ``input_ids`` and ``labels``).
        shard_num: number of shard files.
        overwrite: replace existing output; without it an existing output is an error.
        desc: schema description stored in the file.
    """

    def __init__(self, output_file: str, schema: Dict[str, dict] = None, shard_num: int = 1,
                 overwrite: bool = False, desc: str = "sft"):
        if shard_num < 1:
            raise ValueError(f"shard_num must be >= 1, got {shard_num}")
        self.output_file = os.path.abspath(output_file)
        self.schema = schema or SFT_SCHEMA
        self.shard_num = shard_num
        self.overwrite = overwrite
        self.desc = desc
        self.count = 0
        self._tmpdir = None
        self._writer = None
        self._created_dirs: List[str] = []
        self._signals = None

    def check_output(self):
        """Raise if the output exists and ``overwrite`` is off (call early, before slow work)."""
        if os.path.isdir(self.output_file):
            raise IsADirectoryError(f"output_file {self.output_file} is a directory")
        existing = [p for p in output_files(self.output_file, self.shard_num) if os.path.exists(p)]
        if existing and not self.overwrite:
            raise FileExistsError(f"output {existing[0]} already exists; pass --overwrite to replace it")

    def __enter__(self) -> "AtomicMindRecordWriter":
        from mindspore.mindrecord import FileWriter  # imported here: mindspore takes a second to import

        self.check_output()
        parent, name = os.path.split(self.output_file)
        self._created_dirs = []  # removed again on failure (when still empty)
        missing = parent
        while not os.path.exists(missing):
            self._created_dirs.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        for stale in stale_temp_dirs(self.output_file):
            shutil.rmtree(stale, ignore_errors=True)
        self._signals = raise_on_signals()
        self._signals.__enter__()  # pylint: disable=unnecessary-dunder-call
        try:
            self._tmpdir = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}-", suffix=".tmp", dir=parent)
            self._writer = FileWriter(os.path.join(self._tmpdir, name), shard_num=self.shard_num)
            self._writer.add_schema(self.schema, self.desc)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, rows: List[dict]):
        """Append rows (dicts of numpy arrays following the schema)."""
        if rows:
            self._writer.write_raw_data(rows)
            self.count += len(rows)

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None
        try:
            if not failed:
                if self.count == 0:
                    raise ValueError(f"no samples to write to {self.output_file}")
                self._writer.commit()
                self._move_into_place()
        except BaseException:
            failed = True
            raise
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
            if self._signals is not None:
                self._signals.__exit__(None, None, None)
                self._signals = None
            if failed:
                for path in self._created_dirs:  # innermost first; only while empty
                    try:
                        os.rmdir(path)
                    except OSError:
                        break
        return False

    def _move_into_place(self):
        parent, name = os.path.split(self.output_file)
        produced = output_files(os.path.join(self._tmpdir, name), self.shard_num)
        missing = [p for p in produced if not os.path.isfile(p)]
        if missing:
            raise RuntimeError(f"MindRecord writer did not produce {missing}")
        self.check_output()  # something may have appeared meanwhile
        # FileWriter.commit leaves its files 0600; give them a new file's usual mode (0666 less the umask)
        mode = 0o666 & ~_umask()
        # Index files first: the data file appearing last marks a complete output.
        for path in sorted(produced, key=lambda p: not p.endswith(".db")):
            os.chmod(path, mode)
            os.replace(path, os.path.join(parent, os.path.basename(path)))


def _umask() -> int:
    """The process umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
