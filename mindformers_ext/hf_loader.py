"""``load_hf_model``: an HF checkpoint directory to the matching registered MindSpore model."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
from mindspore import Tensor

from mindformers_ext.families import family_for_hf_model_type
from mindformers_ext.layers.linear import ms_dtype
from mindformers_ext.models.base_config import canonical_dtype


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF checkpoint directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json in the HF checkpoint directory {hf_dir!r}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_from_hf_config(hf_config: dict[str, Any], source: str = "config.json", **overrides: Any):
    """(model, family) for an HF config dict, weights left at their random initialisation."""
    family = family_for_hf_model_type(hf_config.get("model_type"), source)
    kwargs = family.config_from_hf(hf_config, source)
    kwargs.update(overrides)
    return family.model_class(family.config_class(**kwargs)), family


def load_hf_model(hf_dir: str, use_past: bool = True, dtype: str = "float32", quant: Optional[str] = None,
                  **overrides: Any):
    """Build the registered MindSpore model for ``hf_dir`` (config.json + safetensors) with its weights.

    ``dtype`` sets both the parameter and the compute dtype unless ``param_init_type`` /
    ``compute_dtype`` are given too (a YAML's mixed precision, e.g. float32 parameters with bfloat16
    compute). Extra keywords override config fields (for example ``seq_length``,
    ``softmax_compute_type``). Weights stream in one tensor at a time and are stored in
    ``param_init_type``. ``quant="w8a16"`` then stores the linear layers' weights as int8 with
    per-channel scales (:func:`mindformers_ext.quant.quantize_model`).
    """
    from mindformers_ext.checkpoint import fuse_weights
    from mindformers_ext.convert import iter_hf_weights  # the converter's streaming reader

    config_path = os.path.join(hf_dir, "config.json")
    hf_config = read_hf_config(hf_dir)
    overrides.setdefault("compute_dtype", dtype)
    overrides.setdefault("param_init_type", dtype)
    model, family = build_from_hf_config(hf_config, config_path, use_past=use_past, **overrides)
    params = dict(model.parameters_and_names())
    loaded = set()
    target = ms_dtype(canonical_dtype(model.config.param_init_type))
    for name, array in fuse_weights(model, iter_hf_weights(hf_dir, family.weight_map, model.config), hf_dir):
        if name not in params:
            raise KeyError(f"{hf_dir}: weight {name!r} has no parameter in {type(model).__name__}")
        param = params[name]
        if tuple(param.shape) != tuple(array.shape):
            raise ValueError(f"{hf_dir}: weight {name!r} has shape {tuple(array.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        param.set_data(Tensor(np.ascontiguousarray(array)).astype(target))
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise KeyError(f"{hf_dir}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if quant:
        from mindformers_ext.quant import quantize_model  # pylint: disable=import-outside-toplevel

        quantize_model(model, quant)
    model.set_train(False)
    return model
