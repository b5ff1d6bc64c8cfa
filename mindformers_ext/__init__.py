"""mindformers-ext: MindSpore-native DeepSeek-Coder, DeepSeek-V2 and WizardCoder for MindFormers.

The model families live in ``research/``; importing one (``from research.deepseek2 import ...``) or
calling :func:`load_families` (the tools do) registers its classes in MindFormers' registry, so YAML
``type:`` names resolve. This package never imports ``research`` at import time.
"""
import importlib

from mindformers_ext.families import load_families
from mindformers_ext.hf_loader import load_hf_model

__version__ = "0.1.0"
__all__ = ["load_hf_model", "load_families"]

importlib.import_module("mindformers_ext.runner")  # registers the portable train wrapper and optimizer
