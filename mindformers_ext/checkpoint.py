"""Which checkpoint to load, checked against the model before anything is loaded.

Every entry point that builds a model (the model classes' ``checkpoint_name_or_path``,
``run_mindformer.py`` train / finetune / eval / predict, :class:`mindformers_ext.runner.predict.
TextGenerator` and so the API and the eval harness, the MindIR exporter) loads weights through
:func:`load_checkpoint_into`:

* a file must hold a weight of the right shape for every parameter of the model, and no weight the
  model does not have (optimizer moments of its parameters and step counters are allowed); otherwise
  :class:`CheckpointError` names the file and the first missing / mis-shaped / unexpected names;
* a directory is searched (``rank_<rank>/`` first, as MindFormers lays out distributed checkpoints,
  else ``rank_0/``, else the directory itself) for candidates, newest first: each ``.ckpt`` or
  ``.safetensors`` file, a ``model.safetensors.index.json`` with its shards, and last all
  ``.safetensors`` files together (a sharded checkpoint without index). The first candidate that
  matches the model is loaded; when none does, the error lists every candidate and why it was
  rejected (so a shared ``output/checkpoint`` folder never silently loads another model's file).

With ``--strict_load False`` (:func:`set_strict_load`), weights the model does not have are allowed:
they are left unloaded and a warning lists them. Missing and mis-shaped weights stay errors.

Only the file headers are read to decide (``.ckpt`` protobuf headers and safetensors JSON headers),
so choosing among large checkpoints costs no tensor reads.

Running without weights is an explicit choice: :func:`require_weights` raises unless the caller
passed ``random_weights`` (``--random_weights``), and then warns on every run.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

__all__ = ["CheckpointError", "MatchReport", "checkpoint_index", "model_parameters", "compare",
           "candidate_groups", "select_checkpoint", "load_checkpoint_into", "current_rank", "weights_source",
           "require_weights", "RANDOM_WEIGHTS_WARNING", "OPTIMIZER_PREFIXES", "set_strict_load", "strict_load",
           "fusions", "unfused_parameters", "fuse_weights"]

# Names under which optimizers / wrappers store per-parameter state: ``<prefix><parameter name>``.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moments.", "moment1.", "moment2.", "exp_avg.", "exp_avg_sq.",
                      "accu_grads.", "accumulated_grads.")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# the fused projections of qkv_concat models (FusedLinear cells), as checkpoints name them
FUSED_PROJECTIONS = ("w_qkv", "w_gate_hidden", "c_attn")
_SKIPPED_FILES = ("hyper_param.safetensors",)
_STRICT = {"load": True}
RANDOM_WEIGHTS_WARNING = ("WARNING: {who}: no checkpoint given (--random_weights): the model has randomly "
                          "initialised weights and its output is meaningless")


def set_strict_load(strict: bool) -> None:
    """Whether this process refuses checkpoints with weights the model lacks (the default) or loads them
    with a warning (``run_mindformer.py --strict_load False``)."""
    _STRICT["load"] = bool(strict)


def strict_load() -> bool:
    """The setting of :func:`set_strict_load` (True unless ``--strict_load False``)."""
    return _STRICT["load"]


class CheckpointError(ValueError):
    """A checkpoint that does not exist or does not fit the model; the message names the file (or
    directory and its candidates), the config field it came from, and what was expected."""


@dataclass
class MatchReport:
    """How a checkpoint's weights compare with a model's parameters."""

    missing: list = field(default_factory=list)        # model parameters without a weight
    wrong_shape: list = field(default_factory=list)    # (name, checkpoint shape, model shape)
    unexpected: list = field(default_factory=list)     # weights that are no parameter of the model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong_shape or self.unexpected)

    @property
    def fits(self) -> bool:
        """Every parameter has a weight of its shape (there may be weights the model lacks)."""
        return not (self.missing or self.wrong_shape)

    def describe(self, total: int, limit: int = 4) -> str:
        """One line: what is wrong, with the first few names of each kind."""
        parts = []
        if self.missing:
            parts.append(f"no weight for {len(self.missing)} of the model's {total} parameters "
                         f"(e.g. {self.missing[:limit]})")
        if self.wrong_shape:
            shown = ", ".join(f"{n} {tuple(c)} (model {tuple(m)})" for n, c, m in self.wrong_shape[:limit])
            parts.append(f"{len(self.wrong_shape)} weights of another shape: {shown}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} weights the model does not have (e.g. {self.unexpected[:limit]})")
        return "; ".join(parts)


def checkpoint_index(path: str) -> dict:
    """``{name: shape}`` of the tensors in a ``.ckpt`` or ``.safetensors`` file, from its header only."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.convert.tensors import ConversionError

    try:
        if path.endswith(".safetensors"):
            from mindformers_ext.convert.safetensors_io import read_safetensors_header

            entries = read_safetensors_header(path)[0]
        elif path.endswith(".ckpt"):
            from mindformers_ext.convert.ckpt_io import read_ckpt_index

            entries = read_ckpt_index(path)
        else:
            raise CheckpointError(f"{path}: not a checkpoint file (expected .ckpt or .safetensors)")
    except ConversionError as exc:
        raise CheckpointError(str(exc)) from exc
    return {e.name: tuple(e.shape) for e in entries if e.dtype != "STR"}


def model_parameters(network) -> dict:
    """``{parameter name: shape}`` of a network (tied parameters once)."""
    return {p.name: tuple(p.shape) for p in network.get_parameters()}


def fusions(network) -> dict:
    """``{fused parameter name: (its FusedLinear, the names of its parts' tensors in checkpoints)}``, e.g.
    ``...attention.w_qkv.weight`` -> ``(...wq.weight, ...wk.weight, ...wv.weight)``."""
    from mindformers_ext.layers.linear import FusedLinear  # pylint: disable=import-outside-toplevel

    out = {}
    for _, cell in network.cells_and_names():
        if isinstance(cell, FusedLinear):
            for param in cell.get_parameters(expand=False):  # weight, bias, the w8a16 scale
                prefix, leaf = param.name.rsplit(".", 1)
                parent = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
                out[param.name] = (cell, tuple(f"{parent}{part}.{leaf}" for part, _ in cell.parts))
    return out


def unfused_parameters(network) -> dict:
    """``{name: shape}`` of the network's weights as checkpoints keep them apart (each fused projection as
    its parts; the same as :func:`model_parameters` without ``qkv_concat``)."""
    fused = fusions(network)
    shapes = {}
    for name, shape in model_parameters(network).items():
        if name in fused:
            cell, parts = fused[name]
            shapes.update((part, (rows,) + shape[1:]) for part, (_, rows) in zip(parts, cell.parts))
        else:
            shapes[name] = shape
    return shapes


def fuse_weights(network, weights: Iterable, source: str = "the checkpoint") -> Iterator:
    """``weights`` ((name, numpy array) pairs, each projection apart) with the parts of every fused parameter
    of ``network`` joined into it as soon as all have come; other weights pass through."""
    fused = fusions(network)
    owner = {part: name for name, (_, parts) in fused.items() for part in parts}
    pending: dict = {}
    for name, array in weights:
        if name not in owner:
            yield name, array
            continue
        target = owner[name]
        cell, parts = fused[target]
        rows = dict(zip(parts, (r for _, r in cell.parts)))[name]
        if array.shape[0] != rows:
            raise CheckpointError(f"{source}: weight {name!r} has shape {tuple(array.shape)}; {target} expects "
                                  f"{rows} rows from it")
        got = pending.setdefault(target, {})
        got[name] = array
        if len(got) == len(parts):
            del pending[target]
            yield target, cell.fuse([got[p] for p in parts])
    for target, got in pending.items():
        missing = [p for p in fused[target][1] if p not in got]
        raise CheckpointError(f"{source}: no {', '.join(missing)} to join into {target}")


def _is_state(name: str, expected: Mapping) -> bool:
    """Training state stored next to the weights: dot-less counters (``step_num``, ``global_step``,
    ``loss_scale``, ...) and optimizer state of the model's parameters (``adam_m.<param>``)."""
    if "." not in name:
        return True
    return any(name.startswith(p) and name[len(p):] in expected for p in OPTIMIZER_PREFIXES)


def compare(expected: Mapping, index: Mapping) -> MatchReport:
    """Compare ``{name: shape}`` of a model with that of a checkpoint."""
    report = MatchReport()
    for name, shape in expected.items():
        if name not in index:
            report.missing.append(name)
        elif tuple(index[name]) != tuple(shape):
            report.wrong_shape.append((name, tuple(index[name]), tuple(shape)))
    report.unexpected = [n for n in index if n not in expected and not _is_state(n, expected)]
    return report


def _fused_in_place_of_parts(report: MatchReport) -> bool:
    """Whether the checkpoint holds a fused projection where the model expects its parts: a ``FUSED_PROJECTIONS``
    tensor the model lacks beside a missing one of the same cell's parent (``...attention.w_qkv.weight`` and
    ``...attention.wq.weight``); a checkpoint of another family is no qkv_concat one."""
    parents = {name.rsplit(".", 2)[0] for name in report.missing}
    for name in report.unexpected:
        if name.count(".") >= 2:
            parent, cell, _ = name.rsplit(".", 2)
            if cell in FUSED_PROJECTIONS and parent in parents:
                return True
    return False


def _newest_first(paths: Iterable[str]) -> list:
    return sorted(paths, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def _checkpoint_dir(path: str, rank_id: int) -> str:
    """The directory holding this rank's files: ``rank_<rank>``, else ``rank_0`` (a full checkpoint that
    every data-parallel rank loads), else ``path``."""
    for sub in (f"rank_{rank_id}", "rank_0"):
        if os.path.isdir(os.path.join(path, sub)):
            return os.path.join(path, sub)
    return path


def candidate_groups(path: str, rank_id: int = 0) -> list:
    """The candidates (each a list of files loaded together) that ``path`` stands for, in the order
    they are tried; see the module docstring."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            return [_index_shards(path)]
        return [[path]]
    folder = _checkpoint_dir(path, rank_id)
    names = sorted(os.listdir(folder))
    groups = []
    if SAFETENSORS_INDEX in names:
        groups.append(_index_shards(os.path.join(folder, SAFETENSORS_INDEX)))
    files = [os.path.join(folder, n) for n in names
             if n.endswith((".ckpt", ".safetensors")) and n not in _SKIPPED_FILES
             and os.path.isfile(os.path.join(folder, n))]
    groups += [[f] for f in _newest_first(files)]
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    if len(shards) > 1 and not any(sorted(g) == shards for g in groups):
        groups.append(shards)
    return groups


def _index_shards(index_path: str) -> list:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a safetensors index (needs a weight_map): {exc}") from exc
    folder = os.path.dirname(index_path)
    return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]


def _group_index(group: Sequence[str]) -> dict:
    index: dict = {}
    for file in group:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed by the index but missing")
        index.update(checkpoint_index(file))
    return index


def _label(group: Sequence[str]) -> str:
    if len(group) == 1:
        return group[0]
    return f"{os.path.dirname(group[0])}/{{{', '.join(os.path.basename(g) for g in group)}}}"


def select_checkpoint(path: str, expected: Mapping, rank_id: int = 0, what: str = "load_checkpoint",
                      model: str = "the model", strict: Optional[bool] = None) -> list:
    """The file(s) of ``path`` whose weights fit ``expected`` (``{name: shape}``); see the module docstring.

    ``what`` names the config field or flag the path came from, ``model`` the model, in messages.
    ``strict`` (default: :func:`strict_load`): weights that ``expected`` lacks are an error; when False
    they are allowed, and a warning names the file and lists them.
    """
    from mindformers.tools.logger import logger  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    groups = candidate_groups(path, rank_id)
    if not groups:
        raise CheckpointError(f"{what} {path!r}: no .ckpt or .safetensors file in "
                              f"{_checkpoint_dir(path, rank_id)}")
    strict = strict_load() if strict is None else strict
    reasons = []
    extra_only = False  # a candidate that only fails for weights the model lacks
    fused = False  # a candidate holding fused projections that the model keeps apart
    for group in groups:
        try:
            report = compare(expected, _group_index(group))
        except CheckpointError as exc:
            reasons.append((group, f"unreadable: {exc}"))
            continue
        if report.fits and (report.ok or not strict):
            if report.unexpected:
                logger.warning("%s %s holds %d weights that %s does not have; loading it without them "
                               "(--strict_load False): %s", what, _label(group), len(report.unexpected), model,
                               ", ".join(report.unexpected))
            if os.path.isdir(path) and len(groups) > 1:
                logger.info("%s %s: loading %s, the newest of %d candidates that fits %s", what, path,
                            _label(group), len(groups), model)
            return list(group)
        extra_only = extra_only or report.fits
        fused = fused or _fused_in_place_of_parts(report)
        reasons.append((group, report.describe(len(expected))))
    hint = "; to load it without the weights the model lacks, pass --strict_load False" if extra_only else ""
    if fused:
        hint += ("; it holds fused projections (a qkv_concat model's): set model_config.qkv_concat: True "
                 "(--model.model_config.qkv_concat True)")
    if os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not fit {model}: {reasons[0][1]} (does the YAML's "
                              f"model_config match the checkpoint?){hint}")
    listing = "\n".join(f"  {_label(g)}: {why}" for g, why in reasons)
    raise CheckpointError(f"{what} {path}: none of its {len(reasons)} candidate checkpoints fits {model} "
                          f"({len(expected)} parameters); pass the file to load{hint}:\n{listing}")


def current_rank() -> int:
    """This process' rank in a distributed job (0 otherwise)."""
    try:
        from mindformers.tools.utils import get_real_rank  # pylint: disable=import-outside-toplevel

        return int(get_real_rank() or 0)
    except Exception:  # pylint: disable=broad-except
        return int(os.environ.get("RANK_ID", "0") or 0)


def load_checkpoint_into(network, path: str, rank_id: Optional[int] = None, what: str = "load_checkpoint") -> list:
    """Load the checkpoint that ``path`` (file or directory) stands for into ``network``.

    Every parameter must get a weight of its shape, and the checkpoint may hold no weight the model lacks
    unless ``--strict_load False`` (see :func:`select_checkpoint`); weights of another dtype are cast (a
    bfloat16 checkpoint into a float32 model on CPU). Returns the files read.
    """
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from mindspore import ops
    from mindformers.tools.logger import logger

    rank_id = current_rank() if rank_id is None else rank_id
    params = {p.name: p for p in network.get_parameters()}
    # with qkv_concat: the projections kept apart (as converted), else fused as the model (upstream's)
    views = [unfused_parameters(network), model_parameters(network)]
    first_error = None
    for view in views if views[0] != views[1] else views[1:]:
        try:
            files = select_checkpoint(path, view, rank_id, what, type(network).__name__)
            break
        except CheckpointError as exc:
            first_error = first_error or exc
    else:  # a checkpoint in upstream MindFormers' layout is mapped while loading
        from mindformers_ext.convert.upstream import (  # pylint: disable=import-outside-toplevel
            load_upstream_into, upstream_candidate)

        upstream = upstream_candidate(path, network, rank_id)
        if upstream is None:
            raise first_error
        return load_upstream_into(network, upstream, what)
    owner = {part: name for name, (_, parts) in fusions(network).items() for part in parts}
    loaded: dict = {}
    for file in files:
        fmt = "safetensors" if file.endswith(".safetensors") else "ckpt"
        loaded.update(ms.load_checkpoint(file, format=fmt, choice_func=lambda name: name in view))
    for name, value in list(loaded.items()):
        param = params[owner.get(name, name)]
        if value.dtype != param.dtype:
            if ms.int8 in (value.dtype, param.dtype):  # int8 values mean nothing without their scales
                raise CheckpointError(f"{what} {', '.join(files)}: weight {name!r} is {value.dtype}, the model's "
                                      f"parameter {param.dtype}; a w8a16 checkpoint (convert_weight.py "
                                      "--quant w8a16) loads with run_mindformer.py --quant w8a16")
            loaded[name] = ms.Parameter(ops.cast(value, param.dtype), name=name)
    if owner and any(name in owner for name in loaded):
        parts = {name: loaded.pop(name) for name in list(loaded) if name in owner}
        arrays = ((n, (v if v.dtype == ms.int8 else ops.cast(v, ms.float32)).asnumpy()) for n, v in parts.items())
        loaded.update((n, ms.Parameter(ms.Tensor(a).astype(params[n].dtype), name=n))
                      for n, a in fuse_weights(network, arrays, ", ".join(files)))
    ms.load_param_into_net(network, loaded, strict_load=True)
    logger.info("%s: loaded %d weights from %s", what, len(loaded), ", ".join(files))
    return files


def weights_source(config, explicit: Optional[str] = None) -> Optional[str]:
    """The checkpoint a run loads: ``explicit`` (a ``--load_checkpoint`` argument), else the config's
    ``load_checkpoint``, else ``model.model_config.checkpoint_name_or_path``; None when none is set."""
    model_config = ((config.get("model") or {}).get("model_config") or {}) if config is not None else {}
    for value in (explicit, config.get("load_checkpoint") if config is not None else None,
                  model_config.get("checkpoint_name_or_path")):
        if value:
            return str(value)
    return None


def require_weights(source: Optional[str], random_weights: bool, who: str, config_path: Optional[str] = None) -> None:
    """Refuse to run without weights unless ``random_weights``; then warn (stderr and log) every run."""
    if source:
        return
    if not random_weights:
        where = f" in {config_path}" if config_path else ""
        raise CheckpointError(
            f"{who}: no checkpoint to load: pass --load_checkpoint (or set load_checkpoint / "
            f"model.model_config.checkpoint_name_or_path{where}); to run with randomly initialised weights "
            "on purpose, pass --random_weights")
    message = RANDOM_WEIGHTS_WARNING.format(who=who)
    print(message, file=sys.stderr, flush=True)
    try:
        from mindformers.tools.logger import logger  # pylint: disable=import-outside-toplevel

        logger.warning(message)
    except Exception:  # pylint: disable=broad-except
        pass
