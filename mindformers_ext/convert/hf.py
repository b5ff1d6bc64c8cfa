"""Reading an HF checkpoint straight into our names, for building a MindSpore model (``load_hf_model``)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional, Union

import numpy as np

from mindformers_ext.convert.configs import load_config
from mindformers_ext.convert.dtypes import normalize_dtype
from mindformers_ext.convert.engine import execute, find_hf_config, plan_for
from mindformers_ext.convert.errors import ConversionError
from mindformers_ext.convert.registry import get_weight_map, weight_map_for_model_type
from mindformers_ext.convert.sources import open_source
from mindformers_ext.convert.weight_map import WeightMap


def iter_hf_weights(hf_dir: str, model: Union[str, WeightMap, None] = None, config: Any = None,
                    dtype: Optional[str] = "float32", allow_pickle: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(our_name, array)`` for every weight of the HF checkpoint at ``hf_dir``, one at a time.

    ``model``: a map name (``'deepseek'``, ``'llama'``, ...) or ``None`` for the ``model_type`` in
    ``config.json``. ``config``: an HF config dict / path, our config object or YAML; defaults to
    ``hf_dir/config.json``. ``dtype``: float tensors are converted to it (float32 by default, so BF16
    sources arrive as float32); ``None`` keeps the stored dtype. bfloat16 arrays use MindSpore's numpy
    bfloat16 type (``mindspore.common.np_dtype.bfloat16``), so ``mindspore.Tensor(array)`` is bfloat16.

    The whole checkpoint is validated (names, shapes against the config, nothing missing) before the
    first tensor is yielded, with the same errors as the converter.
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
    code = normalize_dtype(dtype)
    plan = plan_for(open_source(hf_dir, allow_pickle=allow_pickle), wmap, load_config(config, wmap), "ours", code)
    return mindspore_arrays(plan)


def mindspore_arrays(plan) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of an executed conversion plan, bfloat16 viewed as MindSpore's numpy bfloat16."""
    bf16 = None
    for info, array in execute(plan):
        if info.dtype == "BF16":
            if bf16 is None:
                from mindspore.common import np_dtype  # pylint: disable=import-outside-toplevel
                bf16 = np_dtype.bfloat16
            array = array.view(bf16)
        yield info.name, array
        del array
