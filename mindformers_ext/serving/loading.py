"""A served model from a predict YAML or an HF directory, and the app around it (``tools/serve.py``)."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
from typing import Any, Optional

from mindformers_ext.generation.sampling import SamplingParams
from mindformers_ext.runner.context import freeze_gc_heap
from mindformers_ext.serving.api import ServedModel, build_app
from mindformers_ext.serving.engine import Engine


def load_config_model(config_path: str, load_checkpoint: Optional[str] = None, random_weights: bool = False,
                      name: Optional[str] = None, quant: Optional[str] = None,
                      kv_cache_dtype: Optional[str] = None) -> tuple:
    """(model, tokenizer, name, family) from a predict YAML, loaded as ``run_mindformer.py`` does
    (``quant="w8a16"``: int8 weights; ``kv_cache_dtype="int8"``: overrides the YAML's)."""
    from mindformers_ext.api import build_text_generator  # pylint: disable=import-outside-toplevel

    overrides = {"model.model_config.kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype else None
    generator = build_text_generator(config_path, load_checkpoint, overrides=overrides,
                                     random_weights=random_weights, quant=quant)
    config = generator.network.config
    if name is None:
        trainer = _section(_section(_read_yaml(config_path), "trainer"), "model_name")
        name = trainer or os.path.splitext(os.path.basename(config_path))[0]
    return generator.network, generator.tokenizer, name, config.model_type


def load_hf_dir(hf_dir: str, name: Optional[str] = None, quant: Optional[str] = None,
                kv_cache_dtype: Optional[str] = None) -> tuple:
    """(model, tokenizer, name, family) from an HF checkpoint directory."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.families import family_for_hf_model_type
    from mindformers_ext.hf_loader import load_hf_model, read_hf_config

    family = family_for_hf_model_type(read_hf_config(hf_dir).get("model_type"), os.path.join(hf_dir, "config.json"))
    model = load_hf_model(hf_dir, quant=quant, **({"kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype else {}))
    tokenizer = family.tokenizer_class(tokenizer_file=hf_dir)
    return model, tokenizer, name or os.path.basename(os.path.normpath(hf_dir)), model.config.model_type


def _read_yaml(path: str) -> dict:
    import yaml  # pylint: disable=import-outside-toplevel

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _section(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def sampling_defaults(config: Any) -> SamplingParams:
    """The model's generation defaults (its YAML's do_sample / top_k / top_p / repetition_penalty)."""
    return SamplingParams(bool(getattr(config, "do_sample", False)), float(getattr(config, "temperature", 1.0) or 1.0),
                          int(getattr(config, "top_k", 0) or 0), float(getattr(config, "top_p", 1.0) or 1.0),
                          float(getattr(config, "repetition_penalty", 1.0) or 1.0))


def serve_app(model: Any, tokenizer: Any, name: str, family: str, warmup: bool = True, **engine_kwargs: Any):
    """The FastAPI app serving ``model``; ``warmup`` compiles the prefill and decode graphs first, so
    the first request does not wait for them. The process's objects so far (the imports, the model)
    are frozen out of the garbage collector's reach: the collections before each graph compile and
    while serving skip them (:func:`~mindformers_ext.runner.context.freeze_gc_heap`)."""
    freeze_gc_heap()
    engine = Engine(model, tokenizer, **engine_kwargs)
    if warmup:
        engine.warmup(log=lambda line: print(line, flush=True))
    return build_app(ServedModel(engine, tokenizer, name, family, sampling_defaults(model.config)))


@functools.lru_cache(maxsize=None)
def _source_digest(packages: tuple = ("mindformers_ext", "research")) -> str:
    """sha256 of the Python sources of ``packages`` (relative paths and contents, in sorted order)."""
    digest = hashlib.sha256()
    for package in packages:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder, dirs, files in sorted(os.walk(root)):
                dirs.sort()
                for name in sorted(f for f in files if f.endswith(".py")):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()


def compile_cache_path(root: str, model: Any, **settings: Any) -> str:
    """The directory under ``root`` for MindSpore's compile cache of ``model``'s serving graphs: named by a
    hash of what the graphs are built from (the model configuration, ``settings`` such as the engine's
    shapes and quantization, the mindformers_ext and research sources, the MindSpore and Python versions).

    MindSpore's own cache (``MS_COMPILER_CACHE_ENABLE`` / ``MS_COMPILER_CACHE_PATH``) is keyed on the entry
    script, the files it imports from outside every ``sys.path`` directory and the weights (a different
    checkpoint compiled afresh); not on our model code (an edited model file still hit the cache), nor on
    the constants a configuration bakes into the graphs (the demo with ``rms_norm_eps`` 0.5 instead of
    1e-6 ran the cached graph and gave the old completion). One directory per hash keeps each cached graph
    to the configuration and code that built it.
    """
    import mindspore  # pylint: disable=import-outside-toplevel

    key = json.dumps({"config": model.config.to_dict(), "settings": settings, "sources": _source_digest(),
                      "mindspore": mindspore.__version__, "python": sys.version, "class": type(model).__name__},
                     sort_keys=True, default=repr)
    return os.path.join(os.path.abspath(root), hashlib.sha256(key.encode()).hexdigest()[:16])
