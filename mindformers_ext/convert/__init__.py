"""Streaming weight conversion between HF checkpoints and MindSpore checkpoints with our names.

* :func:`convert` - HF checkpoint <-> MindSpore ``.ckpt`` (or our-named safetensors), tensor by tensor;
* :func:`iter_hf_weights` - ``(our_name, numpy array)`` pairs straight from an HF checkpoint;
* :func:`get_weight_map` / :func:`register_weight_map` / :class:`WeightMap` - weight maps as data
  (``maps/<family>.py``: a template-name dict and functions for the few non-renames);
* :func:`convert_upstream` / :func:`load_upstream_into` / :func:`detect_upstream` - checkpoints written by
  upstream MindFormers (v1.3.2 - v1.5.0), migrated once or mapped while loading;
* :class:`ConversionError` - raised for any bad input, naming the file / tensor at fault.
"""
from mindformers_ext.convert.ckpt_io import CkptWriter, read_ckpt_index
from mindformers_ext.convert.engine import ConversionResult, convert, execute, iter_hf_weights, plan_for
from mindformers_ext.convert.safetensors_io import SafetensorsWriter, read_safetensors_header
from mindformers_ext.convert.sources import WeightSource, open_source
from mindformers_ext.convert.tensors import (ConversionError, TensorEntry, TensorInfo, bf16_to_f32, cast, f32_to_bf16,
                                             normalize_dtype)
from mindformers_ext.convert.upstream import convert_upstream, detect_upstream, load_upstream_into
from mindformers_ext.convert.weight_map import (Layout, Move, WeightMap, available_models, get_weight_map, moves,
                                                register_weight_map, weight_map_for_model_type)

__all__ = [
    "convert", "iter_hf_weights", "ConversionResult", "ConversionError", "execute", "plan_for",
    "get_weight_map", "register_weight_map", "available_models", "weight_map_for_model_type",
    "WeightMap", "Layout", "Move", "moves",
    "open_source", "WeightSource", "TensorEntry", "TensorInfo", "read_safetensors_header", "SafetensorsWriter",
    "read_ckpt_index", "CkptWriter", "cast", "f32_to_bf16", "bf16_to_f32", "normalize_dtype",
    "convert_upstream", "detect_upstream", "load_upstream_into",
]
