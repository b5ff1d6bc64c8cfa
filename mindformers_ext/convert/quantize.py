"""``convert_weight.py --quant w8a16``: the weights W8A16 quantizes are written as int8 plus their float32
``<name>_scale``, so the checkpoint loads into a W8A16 model without re-quantising.

Which weights are quantized is read off the model itself (a weightless skeleton built from the config, and
:func:`mindformers_ext.quant.scale_shapes`), the rule load-time quantization applies, so both give the same.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from mindformers_ext.convert.tensors import ConversionError, TensorInfo, cast
from mindformers_ext.convert.weight_map import WeightMap, skeleton_model


def quantized_scale_shapes(wmap: WeightMap, hf_cfg: dict, method: str) -> dict:
    """``{our weight name: scale shape}`` of what ``method`` quantizes in the model of ``hf_cfg``."""
    from mindformers_ext.quant import check_method, scale_shapes  # pylint: disable=import-outside-toplevel

    try:
        check_method(method)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    model_type = hf_cfg.get("model_type") or (wmap.model_types[0] if wmap.model_types else None)
    if model_type is None:
        raise ConversionError(f"--quant {method}: the {wmap.name} weight map names no model type to quantize for "
                              "(convert to our layout first, then quantize)")
    try:
        model = skeleton_model(model_type, hf_cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"--quant {method}: cannot build the {model_type} model from the config to find its "
                              f"linear weights: {exc}") from exc
    return scale_shapes(model)


def quantized_outputs(outputs: Iterable[TensorInfo], scales: dict) -> list[TensorInfo]:
    """The plan's outputs with each quantized weight as int8 (``I8``) followed by its ``F32`` scale."""
    result, seen = [], set()
    for info in outputs:
        if info.name not in scales:
            result.append(info)
            continue
        if tuple(scales[info.name]) != tuple(info.shape[:-1]):
            raise ConversionError(f"tensor {info.name!r} {list(info.shape)}: the model expects per-row scales of "
                                  f"shape {list(scales[info.name])} (weight map and model disagree)")
        result += [TensorInfo(info.name, "I8", info.shape), TensorInfo(info.name + "_scale", "F32", scales[info.name])]
        seen.add(info.name)
    missing = sorted(set(scales) - seen)
    if missing:
        raise ConversionError(f"the model quantizes {missing[:4]}, which the conversion does not write "
                              "(weight map and model disagree)")
    return result


def quantize_stream(stream: Iterable[tuple[TensorInfo, np.ndarray]],
                    scales: dict) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """The conversion's ``(info, array)`` pairs with the weights in ``scales`` as int8 values and float32 scales."""
    from mindformers_ext.quant import quantize_per_channel  # pylint: disable=import-outside-toplevel

    for info, array in stream:
        if info.name not in scales:
            yield info, array
            continue
        q, scale = quantize_per_channel(cast(array, info.dtype, "F32"))
        del array
        yield TensorInfo(info.name, "I8", info.shape), q
        del q
        yield TensorInfo(info.name + "_scale", "F32", tuple(scale.shape)), scale
