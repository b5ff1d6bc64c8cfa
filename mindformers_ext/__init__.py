"""mindformers-ext: MindSpore-native DeepSeek-Coder, DeepSeek-V2 and WizardCoder for MindFormers.

The model families live in ``research/``; importing one (``from research.deepseek2 import ...``) or
calling :func:`load_families` (the tools do) registers its classes in MindFormers' registry, so YAML
``type:`` names resolve, together with our portable train wrapper and optimizer. This package never
imports ``research`` at import time, and imports MindSpore / MindFormers only when something needs
them (``load_hf_model``, the models, the runner), so MindFormers-free parts (preprocessing,
tokenizer backends) start quickly.
"""
import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["load_hf_model", "load_families"]

_LAZY = {"load_hf_model": "mindformers_ext.hf_loader", "load_families": "mindformers_ext.families"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
