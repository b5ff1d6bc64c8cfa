"""The one streaming loop: check every name and shape from metadata, then read, map, cast and write tensor by tensor.

The plan is made before any tensor data is read, so a wrong name, shape or missing tensor fails before a byte
is written, and the output's tensor list (a safetensors header) is known up front. Memory stays near the
largest (stacked / concatenated) tensor: each source tensor is read, copied into its group's buffer when it has
one, and released before the next one is read.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from tqdm import tqdm

import numpy as np

from mindformers_ext.convert.outputs import FileSink, HFDirSink
from mindformers_ext.convert.quantize import quantize_stream, quantized_outputs, quantized_scale_shapes
from mindformers_ext.convert.sources import WeightSource, open_source
from mindformers_ext.convert.tensors import FLOATS, STORAGE, ConversionError, TensorEntry, TensorInfo, normalize_dtype
from mindformers_ext.convert.weight_map import (Layout, WeightMap, check_map_config, get_weight_map, load_config,
                                                hf_shapes, moves, split_name, weight_map_for_model_type)
from mindformers_ext.interrupts import raise_on_signals


@dataclass
class Step:
    """Read ``sources``, join them (stack or concatenate along axis 0), lay the result out, split it into
    ``outputs``."""

    to: str  # "ours" | "hf"
    sources: list[TensorEntry]
    outputs: list[TensorInfo]
    dtype: str  # what the sources are read as
    stack: bool = False  # the HF side is stacked experts: stacked towards ours, unstacked towards HF
    layout: Optional[Layout] = None


@dataclass
class Plan:
    """Steps in source order and the outputs they emit, in emission order."""

    to: str  # "ours" | "hf"
    config: dict
    steps: list[Step]
    skipped: list[tuple[str, str]]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [o for step in self.steps for o in step.outputs]


def plan_for(source: WeightSource, wmap: WeightMap, config: Any, to: str, dtype: Optional[str] = None,
             config_origin: Any = None) -> Plan:
    """Validate ``source`` against the map and config and plan its conversion towards ``to`` (``"ours"`` /
    ``"hf"``); ``config_origin`` (the config file, if any) names the config in error messages."""
    cfg = check_map_config(wmap, config)
    wmap = wmap.for_config(cfg)
    try:
        ours = wmap.shapes(cfg)
        hf = hf_shapes(wmap, cfg, ours)
    except ConversionError:
        raise
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        where = os.fspath(config_origin) if isinstance(config_origin, (str, os.PathLike)) else "the config"
        kind = cfg.get("model_type")
        what = f" (model_type {kind!r})" if kind else ""
        why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConversionError(f"{where}{what} is not a {wmap.name} config: the {wmap.name} model cannot be built "
                              f"from it ({why}); is --model {wmap.name} the right model for {source.path}?") from None
    src_side, (src_shapes, dst_shapes) = ("hf", (hf, ours)) if to == "ours" else ("ours", (ours, hf))
    summary = wmap.summary(cfg)
    ignores = [re.compile(p) for p in wmap.ignore_patterns(src_side, cfg)]
    known = wmap.templates(src_side)
    by_name: dict[str, TensorEntry] = {}
    skipped: list[tuple[str, str]] = []
    for info in source.entries():
        where = info.path or source.path
        if info.dtype == "STR" or any(p.fullmatch(info.name) for p in ignores):
            skipped.append((info.name, "string metadata" if info.dtype == "STR" else "not a model weight"))
        elif split_name(info.name)[0] not in known and info.name not in known:
            raise ConversionError(f"{where}: tensor {info.name!r} is not a {wmap.name} weight: no rule of "
                                  f"the {wmap.name!r} weight map names it (wrong --model, or a checkpoint of "
                                  "another architecture?)")
        elif info.name not in src_shapes:
            raise ConversionError(f"{where}: tensor {info.name!r} is a {wmap.name} weight, but the config "
                                  f"({summary}) has no such tensor (check the layer count, biases, "
                                  "tie_word_embeddings)")
        elif tuple(info.shape) != tuple(src_shapes[info.name]):
            note = wmap.note(info.name)
            raise ConversionError(f"{where}: tensor {info.name!r} has shape {list(info.shape)}, but the config "
                                  f"({summary}) implies {list(src_shapes[info.name])}" + (f" = {note}" if note else ""))
        else:
            by_name[info.name] = info
    missing = [n for n in src_shapes if n not in by_name]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConversionError(f"{source.path}: {len(missing)} tensor(s) that the config ({summary}) requires are "
                              f"missing: {shown}")
    code = normalize_dtype(dtype)
    if code and code not in FLOATS:
        raise ConversionError(f"cannot convert tensors to {code}")
    steps = []
    for move in moves(wmap, cfg, ours):
        src, dst = (move.hf, move.ours) if to == "ours" else (move.ours, move.hf)
        dtypes = {code if code and by_name[n].dtype in FLOATS else by_name[n].dtype for n in src}
        if len(dtypes) != 1:
            raise ConversionError(f"{source.path}: the tensors combined into {dst[0]!r} have different dtypes "
                                  f"{sorted(dtypes)}")
        dt = dtypes.pop()
        steps.append(Step(to, [by_name[n] for n in src], [TensorInfo(n, dt, tuple(dst_shapes[n])) for n in dst], dt,
                          move.stack, move.layout))
    order = {name: i for i, name in enumerate(by_name)}
    steps.sort(key=lambda s: min(order[e.name] for e in s.sources))  # read the source front to back
    return Plan(to, cfg, steps, skipped)


def execute(plan: Plan) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """``(info, array)`` in ``plan.outputs`` order; drop each array before asking for the next."""
    for step in plan.steps:
        whole = _join(step)
        if step.layout is not None:
            lay_out = step.layout.to_ours if step.to == "ours" else step.layout.to_hf
            whole = lay_out(whole, plan.config)
        if len(step.outputs) == 1:
            yield _checked(step.outputs[0], whole)
            del whole
            continue
        unstack = step.stack and step.to == "hf"  # experts towards HF; else parts split along axis 0
        start = 0
        for info in step.outputs:
            rows = 1 if unstack else info.shape[0]
            piece = np.ascontiguousarray(whole[start if unstack else slice(start, start + rows)])
            start += rows
            yield _checked(info, piece)
            del piece
        del whole


def _join(step: Step) -> np.ndarray:
    if len(step.sources) == 1:
        return step.sources[0].read(step.dtype)
    stack = step.stack and step.to == "ours"
    first = tuple(step.sources[0].shape)
    rows = [1 if stack else entry.shape[0] for entry in step.sources]
    whole = np.empty((len(rows),) + first if stack else (sum(rows),) + first[1:], dtype=STORAGE[step.dtype])
    start = 0
    for entry, count in zip(step.sources, rows):  # each source read into its own array, copied, released
        whole[start if stack else slice(start, start + count)] = entry.read(step.dtype)
        start += count
    return whole


def _checked(info: TensorInfo, array: np.ndarray) -> tuple[TensorInfo, np.ndarray]:
    if tuple(array.shape) != tuple(info.shape) or array.dtype != STORAGE[info.dtype]:
        raise ConversionError(f"tensor {info.name!r} came out as {array.dtype}{list(array.shape)}, planned "
                              f"{info.dtype}{list(info.shape)} (a transform of the weight map changed it)")
    return info, array


@dataclass
class ConversionResult:
    """What a conversion wrote: the output files, tensor and byte counts, and the tensors it skipped (why)."""

    files: list[str]
    tensors: int
    bytes: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_hf_config(path: str) -> Optional[str]:
    """The ``config.json`` of the HF checkpoint at ``path`` (a directory, or a file inside one)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidate = os.path.join(folder, "config.json")
    return candidate if os.path.isfile(candidate) else None


def convert(source: Union[str, WeightSource], target: str, weight_map: Union[str, WeightMap],
            dtype: Optional[str] = None, progress: bool = True, *, config: Any = None, reverse: bool = False,
            max_shard_size: Union[int, str] = "5GB", allow_pickle: bool = False,
            overwrite: bool = True, quant: Optional[str] = None, qkv_concat: bool = False) -> ConversionResult:
    """Convert a checkpoint between HF and our (MindSpore) names, streaming tensor by tensor.

    Forward: ``source`` is an HF checkpoint (model dir, safetensors file or index, torch pickles), ``target`` a
    ``.ckpt`` (or ``.safetensors`` with our names); ``config`` defaults to the HF directory's ``config.json``.
    Reverse: ``source`` is ours, ``target`` an HF model directory, which gets ``config.json`` from ``config``
    (required). ``dtype`` converts every float tensor (``None`` keeps them); ``quant="w8a16"`` (forward) writes
    the weights W8A16 quantizes as int8 plus a float32 ``<name>_scale`` each. ``qkv_concat`` (forward) writes
    the checkpoint of a ``qkv_concat: True`` model (the map's :attr:`WeightMap.qkv_concat` variant: upstream's
    fused ``w_qkv`` / ``w_gate_hidden``); reversing, such a checkpoint is recognised by its names.

    Nothing is written unless the whole source validates. The output appears atomically (temp + rename); on
    any error or SIGTERM / SIGINT / SIGHUP the temporary output is removed. An output that would replace or
    delete an input file is refused; an existing output is replaced only with ``overwrite``.
    """
    t0 = time.time()
    if quant and reverse:
        raise ConversionError(f"--quant {quant}: quantization is a forward conversion (HF -> MindSpore); "
                              "--reversed writes float HF weights")
    wmap = get_weight_map(weight_map)
    src = source if isinstance(source, WeightSource) else open_source(source, allow_pickle=allow_pickle)
    if qkv_concat and wmap.qkv_concat is None:
        raise ConversionError(f"--qkv_concat: the {wmap.name} weight map has no fused layout (qkv_concat "
                              "checkpoints exist for the Llama family: --model deepseek / llama)")
    if qkv_concat or (reverse and wmap.qkv_concat is not None and _holds_fused(src, wmap)):
        wmap = wmap.qkv_concat
    if config is None:
        if reverse:
            raise ConversionError("converting to HF needs the model config (an HF config.json or our YAML) "
                                  "to write config.json and check shapes: pass --config")
        config = find_hf_config(src.path)
        if config is None:
            raise ConversionError(f"{src.path}: no config.json beside the weights; pass --config (HF config.json "
                                  "or our YAML) so shapes can be checked")
    hf_cfg = load_config(config, wmap)
    plan = plan_for(src, wmap, hf_cfg, "hf" if reverse else "ours", dtype, config)
    check_output(src, plan, target, reverse, overwrite)
    outputs, stream = plan.outputs, execute(plan)
    if quant:
        scales = quantized_scale_shapes(wmap, hf_cfg, quant)
        outputs = quantized_outputs(outputs, scales)
        stream = quantize_stream(stream, scales)
    total = sum(o.nbytes for o in outputs)
    sink = _make_sink(target, reverse, hf_cfg, outputs, max_shard_size)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, disable=not progress,
               desc=os.path.basename(os.path.normpath(target)))
    with raise_on_signals():
        try:
            sink.begin(outputs)
            for info, array in stream:
                sink.write(info, array)
                bar.update(array.nbytes)
                del array
            files = sink.commit()
        except BaseException:
            sink.abort()
            raise
        finally:
            bar.close()
    return ConversionResult(files, len(outputs), total, time.time() - t0, plan.skipped)


def _holds_fused(source: WeightSource, wmap: WeightMap) -> bool:
    """Whether ``source`` (ours) holds a tensor that only ``wmap``'s ``qkv_concat`` variant names."""
    fused = wmap.qkv_concat.templates("ours") - wmap.templates("ours")
    return any(split_name(entry.name)[0] in fused for entry in source.entries())


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def check_output(source: WeightSource, plan: Plan, target: str, reverse: bool, overwrite: bool) -> None:
    """Refuse an output that would replace or delete an input file, and an existing output unless
    ``overwrite``."""
    target = os.fspath(target)
    inputs = {_real(source.path)} if os.path.isfile(source.path) else set()  # the source (index), each tensor's file
    inputs.update(_real(e.path) for step in plan.steps for e in step.sources if e.path)
    real_target = _real(target)
    if real_target == _real(source.path) or real_target in inputs:
        raise ConversionError(f"{target}: the output is the input ({source.path}); converting would destroy "
                              "it: write to another path")
    if reverse:
        inside = sorted(f for f in inputs if os.path.dirname(f) == real_target)
        if inside:
            raise ConversionError(f"{target}: the output directory holds the input {inside[0]}, which writing "
                                  "the HF checkpoint there could replace or delete: write to another directory")
        if os.path.isdir(target) and not overwrite:
            present = sorted(n for n in os.listdir(target) if n == "config.json" or
                             (n.startswith("model") and n.endswith((".safetensors", ".safetensors.index.json"))))
            if present:
                raise ConversionError(f"{target}: already holds {', '.join(present)}; pass --overwrite to replace "
                                      "them")
    elif os.path.lexists(target) and not overwrite and not os.path.isdir(target):
        raise ConversionError(f"{target}: exists; pass --overwrite to replace it")


def _make_sink(target: str, reverse: bool, hf_cfg: dict, outputs: list[TensorInfo], max_shard_size):
    target = os.fspath(target)
    if reverse:
        if target.endswith((".safetensors", ".ckpt", ".json")):
            raise ConversionError(f"{target}: the HF output is a directory (it gets model.safetensors or shards, "
                                  "and config.json)")
        out_cfg = dict(hf_cfg)
        floats = {o.dtype for o in outputs if o.dtype in ("F32", "F16", "BF16")}
        if len(floats) == 1:
            out_cfg["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[floats.pop()]
        return HFDirSink(target, out_cfg, max_shard_size)
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise ConversionError(f"{target}: the output directory {parent} does not exist")
    if os.path.isdir(target):
        raise ConversionError(f"{target}: is a directory; give the output file name (e.g. model.ckpt)")
    if target.endswith((".safetensors", ".ckpt")):
        return FileSink(target, {"format": "ms"})
    raise ConversionError(f"{target}: the output must end with .ckpt (mindspore.load_checkpoint requires the "
                          "suffix) or .safetensors")


# ----------------------------------------------------------------------- HF weights straight into a model
def iter_hf_weights(hf_dir: str, model: Union[str, WeightMap, None] = None, config: Any = None,
                    dtype: Optional[str] = "float32", allow_pickle: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """``(our_name, array)`` for every weight of the HF checkpoint at ``hf_dir``, one at a time, validated
    as a whole first (the converter's errors).

    ``model``: a map name, or ``None`` for the config's ``model_type``. ``config`` defaults to
    ``hf_dir/config.json``. Float tensors arrive as ``dtype`` (``None``: as stored); bfloat16 as MindSpore's
    numpy bfloat16, so ``mindspore.Tensor(array)`` is bfloat16.
    """
    if config is None:
        config = find_hf_config(hf_dir)
        if config is None:
            raise ConversionError(f"{hf_dir}: no config.json; pass config=")
    if model is None:
        raw = config
        if isinstance(config, (str, os.PathLike)):
            with open(config, encoding="utf-8") as f:
                raw = json.load(f)
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if not model_type:
            raise ConversionError(f"{hf_dir}: the config has no model_type; pass model=")
        wmap = weight_map_for_model_type(model_type)
    else:
        wmap = get_weight_map(model)
    plan = plan_for(open_source(hf_dir, allow_pickle=allow_pickle), wmap, load_config(config, wmap), "ours", dtype)
    return mindspore_arrays(plan)


def mindspore_arrays(plan: Plan) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of an executed plan, bfloat16 viewed as MindSpore's numpy bfloat16."""
    from mindspore.common import np_dtype  # pylint: disable=import-outside-toplevel

    for info, array in execute(plan):
        yield info.name, array.view(np_dtype.bfloat16) if info.dtype == "BF16" else array
        del array
