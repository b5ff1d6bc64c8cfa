"""Weight maps by model name (``--model``) and by HF ``model_type``.

Built-in maps live in ``mindformers_ext/convert/maps/<module>.py`` and expose ``WEIGHT_MAP``; they are
imported on first use. A model whose map module does not exist yet gets a clear error.
"""
from __future__ import annotations

import importlib
from typing import Union

from mindformers_ext.convert.errors import ConversionError
from mindformers_ext.convert.weight_map import WeightMap

# --model name -> map module (DeepSeek-Coder v1 / v1.5 are Llama-shaped: same map)
BUILTIN_MAPS = {
    "llama": "mindformers_ext.convert.maps.llama",
    "deepseek": "mindformers_ext.convert.maps.llama",
    "deepseek1_5": "mindformers_ext.convert.maps.llama",
    "deepseek_coder": "mindformers_ext.convert.maps.llama",
    "deepseek2": "mindformers_ext.convert.maps.deepseek2",
    "deepseek_v2": "mindformers_ext.convert.maps.deepseek2",
    "wizardcoder": "mindformers_ext.convert.maps.wizardcoder",
    "gpt_bigcode": "mindformers_ext.convert.maps.wizardcoder",
    # checkpoints written by upstream MindFormers' converters / training (``--upstream``)
    "llama_upstream": "mindformers_ext.convert.maps.llama_upstream",
    "deepseek_upstream": "mindformers_ext.convert.maps.llama_upstream",
    "deepseek1_5_upstream": "mindformers_ext.convert.maps.llama_upstream",
    "deepseek_coder_upstream": "mindformers_ext.convert.maps.llama_upstream",
    "deepseek2_upstream": "mindformers_ext.convert.maps.deepseek2_upstream",
    "deepseek_v2_upstream": "mindformers_ext.convert.maps.deepseek2_upstream",
    "wizardcoder_upstream": "mindformers_ext.convert.maps.wizardcoder_upstream",
    "gpt_bigcode_upstream": "mindformers_ext.convert.maps.wizardcoder_upstream",
}
UPSTREAM_SUFFIX = "_upstream"
# HF config.json model_type -> --model name
MODEL_TYPES = {"llama": "llama", "deepseek_v2": "deepseek2", "gpt_bigcode": "wizardcoder"}

_REGISTERED: dict[str, WeightMap] = {}


def register_weight_map(wmap: WeightMap, *names: str) -> WeightMap:
    """Make ``wmap`` available as ``wmap.name`` and ``names`` (overrides a built-in of that name)."""
    for name in (wmap.name, *names):
        _REGISTERED[name] = wmap
    for model_type in wmap.model_types:
        MODEL_TYPES.setdefault(model_type, wmap.name)
    return wmap


def available_models() -> list[str]:
    """Names ``--model`` accepts."""
    return sorted(set(BUILTIN_MAPS) | set(_REGISTERED))


def get_weight_map(model: Union[str, WeightMap]) -> WeightMap:
    """The weight map for ``model`` (a name such as ``'deepseek'``, or a map, returned as is)."""
    if isinstance(model, WeightMap):
        return model
    if model in _REGISTERED:
        return _REGISTERED[model]
    module_name = BUILTIN_MAPS.get(model)
    if module_name is None:
        raise ConversionError(f"no weight map for model {model!r}; available: {available_models()}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConversionError(f"model {model!r} has no weight map yet (expected module {module_name})") from exc
    wmap = getattr(module, "WEIGHT_MAP")
    _REGISTERED[model] = wmap
    return wmap


def upstream_map_name(model: str) -> str:
    """The name of the map for upstream MindFormers checkpoints of ``--model`` (``'deepseek2'`` ->
    ``'deepseek2_upstream'``)."""
    name = model if model.endswith(UPSTREAM_SUFFIX) else model + UPSTREAM_SUFFIX
    if name not in BUILTIN_MAPS and name not in _REGISTERED:
        known = sorted(n[:-len(UPSTREAM_SUFFIX)] for n in BUILTIN_MAPS if n.endswith(UPSTREAM_SUFFIX))
        raise ConversionError(f"no upstream MindFormers layout for model {model!r}; --upstream knows: {known}")
    return name


def weight_map_for_model_type(model_type: str) -> WeightMap:
    """The weight map for an HF ``config.json`` ``model_type`` (``'llama'``, ``'deepseek_v2'``, ...)."""
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"no weight map for HF model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return get_weight_map(MODEL_TYPES[model_type])
