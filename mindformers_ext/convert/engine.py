"""The one streaming engine: plan from metadata, then read, rename/transform, cast and write tensor by tensor.

Memory stays near the largest tensor (or the largest stacked/concatenated group): every source tensor
is read into its own array, written or copied into its group's buffer, and released before the next
one is read.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import numpy as np

from mindformers_ext.convert.dtypes import STORAGE, normalize_dtype
from mindformers_ext.convert.errors import ConversionError
from mindformers_ext.convert.outputs import CkptSink, HFDirSink, SafetensorsFileSink
from mindformers_ext.convert.plan import Plan, Step, expected_shapes, make_plan
from mindformers_ext.convert.quantize import quantize_stream, quantized_outputs, quantized_scale_shapes
from mindformers_ext.convert.registry import get_weight_map
from mindformers_ext.convert.sources import WeightSource, open_source
from mindformers_ext.convert.tensors import TensorInfo
from mindformers_ext.convert.weight_map import WeightMap, check_map_config
from mindformers_ext.interrupts import Interrupted, raise_on_signals


def plan_for(source: WeightSource, wmap: WeightMap, config: Any, to: str, dtype: Optional[str] = None,
             config_origin: Any = None) -> Plan:
    """Validate ``source`` against the map and config and plan its conversion towards ``to``.

    ``config_origin`` (the config file, when there is one) names the config in error messages."""
    hf_cfg = check_map_config(wmap, config)
    wmap = wmap.for_config(hf_cfg)
    try:
        hf = expected_shapes(wmap, hf_cfg, "hf")
        ours = expected_shapes(wmap, hf_cfg, "ours")
    except (KeyError, TypeError, IndexError) as exc:
        where = os.fspath(config_origin) if isinstance(config_origin, (str, os.PathLike)) else "the config"
        kind = hf_cfg.get("model_type")
        what = f" (model_type {kind!r})" if kind else ""
        key = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConversionError(f"{where}{what} is not a {wmap.name} config: the {wmap.name} weight map needs "
                              f"{key!r}, which it lacks; is --model {wmap.name} the right model for "
                              f"{source.path}?") from None

    expected = (hf, ours) if to == "ours" else (ours, hf)
    return make_plan(source.entries(), wmap, hf_cfg, to, normalize_dtype(dtype), expected, source.path)


def execute(plan: Plan) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Read and convert the plan's tensors, yielding ``(info, array)`` in ``plan.outputs`` order.

    The caller should drop each array before asking for the next, so at most one is alive.
    """
    buffers: dict[str, np.ndarray] = {}
    cfg = plan.config
    for step in plan.steps:
        if step.kind == "skip":
            continue
        array = step.entry.read(step.read_dtype)
        if step.in_transform is not None:
            array = step.in_transform.to_hf(array, cfg)
        if step.group is not None:
            group = step.group
            buf = buffers.get(group.out.name)
            if buf is None:
                buf = buffers[group.out.name] = np.empty(group.combined, dtype=array.dtype)
            start, length = group.slots[step.entry.name]
            index = [slice(None)] * buf.ndim
            index[group.axis] = start if group.stack else slice(start, start + length)
            buf[tuple(index)] = array
            del array
            if not step.outputs:
                continue
            array = buffers.pop(group.out.name)
            del buf
            if group.transform is not None:
                array = group.transform.to_ours(array, cfg)
            yield _checked(group.out, array)
            del array
        elif step.kind == "rename":
            if step.out_transforms[0] is not None:
                array = step.out_transforms[0].to_ours(array, cfg)
            yield _checked(step.outputs[0], array)
            del array
        else:
            yield from _scatter(step, array, cfg)
            del array


def _scatter(step: Step, array: np.ndarray, cfg: dict) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    start = 0
    for info, length, t in zip(step.outputs, step.pieces, step.out_transforms):
        index = [slice(None)] * array.ndim
        index[step.axis] = start if step.kind == "unstack" else slice(start, start + length)
        piece = np.ascontiguousarray(array[tuple(index)])
        start += length
        if t is not None:
            piece = t.to_ours(piece, cfg)
        yield _checked(info, piece)
        del piece


def _checked(info: TensorInfo, array: np.ndarray) -> tuple[TensorInfo, np.ndarray]:
    if tuple(array.shape) != tuple(info.shape) or array.dtype != STORAGE[info.dtype]:
        raise ConversionError(f"tensor {info.name!r} came out as {array.dtype}{list(array.shape)}, planned "
                              f"{info.dtype}{list(info.shape)} (a transform of the weight map changed it)")
    return info, array


@dataclass
class ConversionResult:
    """What a conversion wrote."""

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
            overwrite: bool = True, quant: Optional[str] = None) -> ConversionResult:
    """Convert a checkpoint between HF and our (MindSpore) names, streaming tensor by tensor.

    Forward (``reverse=False``): ``source`` is an HF checkpoint (model dir, safetensors file or index,
    pickles only with ``allow_pickle``); ``target`` a ``.ckpt`` (or a ``.safetensors`` with our names).
    ``config`` defaults to the HF directory's ``config.json``.
    Reverse: ``source`` is our ``.ckpt`` (or safetensors with our names); ``target`` an HF model
    directory, which gets ``config.json`` from ``config`` (required: an HF config.json path / dict, our
    YAML, our config object).
    ``dtype`` (``float32`` / ``float16`` / ``bfloat16``) converts every float tensor; ``None`` keeps them.
    ``quant="w8a16"`` (forward only) writes the weights that W8A16 quantizes as int8 plus a float32
    ``<name>_scale`` each, quantized from their values after ``dtype``
    (:mod:`mindformers_ext.convert.quantize`).

    Nothing is written unless the whole source validates: names, shapes against the config, no missing
    tensor. The output appears atomically (temp file + rename); on any error, and on SIGTERM / SIGINT /
    SIGHUP, the temporary output is removed (stale ones of killed runs go at the next run to the same
    output). An output that would replace or delete one of the input's files is refused; an existing
    output is replaced only with ``overwrite`` (the CLI's ``--overwrite``; the library default keeps
    the old behaviour).
    """
    from mindformers_ext.convert.configs import load_config  # pylint: disable=import-outside-toplevel

    t0 = time.time()
    if quant and reverse:
        raise ConversionError(f"--quant {quant}: quantization is a forward conversion (HF -> MindSpore); "
                              "--reversed writes float HF weights")
    wmap = get_weight_map(weight_map)
    src = source if isinstance(source, WeightSource) else open_source(source, allow_pickle=allow_pickle)
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
    sink = _make_sink(target, reverse, hf_cfg, plan, max_shard_size)
    bar = _progress(total, progress, os.path.basename(os.path.normpath(target)))
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


ConversionInterrupted = Interrupted  # a conversion stopped by SIGTERM / SIGINT / SIGHUP (exit 128 + signal)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def input_files(source: WeightSource, plan: Plan) -> set[str]:
    """Every file the conversion reads (real paths): the source (index) and each tensor's file."""
    files = {_real(source.path)} if os.path.isfile(source.path) else set()
    for step in plan.steps:
        entry = getattr(step, "entry", None)
        if entry is not None and getattr(entry, "path", ""):
            files.add(_real(entry.path))
    return files


def check_output(source: WeightSource, plan: Plan, target: str, reverse: bool, overwrite: bool) -> None:
    """Refuse an output that would replace or delete an input file, and an existing output unless
    ``overwrite``."""
    target = os.fspath(target)
    inputs = input_files(source, plan)
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


def _make_sink(target: str, reverse: bool, hf_cfg: dict, plan: Plan, max_shard_size):
    target = os.fspath(target)
    if reverse:
        if target.endswith((".safetensors", ".ckpt", ".json")):
            raise ConversionError(f"{target}: the HF output is a directory (it gets model.safetensors or shards, "
                                  "and config.json)")
        out_cfg = dict(hf_cfg)
        floats = {o.dtype for o in plan.outputs if o.dtype in ("F32", "F16", "BF16")}
        if len(floats) == 1:
            out_cfg["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[floats.pop()]
        return HFDirSink(target, out_cfg, max_shard_size)
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise ConversionError(f"{target}: the output directory {parent} does not exist")
    if os.path.isdir(target):
        raise ConversionError(f"{target}: is a directory; give the output file name (e.g. model.ckpt)")
    if target.endswith(".safetensors"):
        return SafetensorsFileSink(target, {"format": "ms"})
    if target.endswith(".ckpt"):
        return CkptSink(target)
    raise ConversionError(f"{target}: the output must end with .ckpt (mindspore.load_checkpoint requires the "
                          "suffix) or .safetensors")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True)
