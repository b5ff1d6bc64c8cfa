"""Tokenizers shipped with mindformers-ext and registered with MindFormers.

Importing ``DeepSeekCoderTokenizer`` or ``ByteLevelBPETokenizer`` from here imports MindFormers (their
base classes) and registers ``DeepSeekCoderTokenizer`` in MindFormers' TOKENIZER registry
(WizardCoder's tokenizer is registered by ``research/wizardcoder/wizardcoder_tokenizer.py``, built on
:class:`ByteLevelBPETokenizer`). The file helpers and :mod:`.backend` (the same tokenizers without
MindFormers, for preprocessing) import no MindFormers.
"""
import importlib
from typing import Any

from .backend import DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_EOT, build_byte_level_bpe
from .paths import SHIPPED_TOKENIZERS, tokenizer_path

__all__ = [
    "SHIPPED_TOKENIZERS", "tokenizer_path",
    "DeepSeekCoderTokenizer", "DEEPSEEK_BOS", "DEEPSEEK_EOS", "DEEPSEEK_EOT",
    "ByteLevelBPETokenizer", "build_byte_level_bpe",
]

_CLASSES = {"DeepSeekCoderTokenizer": ".deepseek", "ByteLevelBPETokenizer": ".byte_level_bpe"}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
