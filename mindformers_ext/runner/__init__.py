"""Running MindFormers jobs with mindformers-ext models: CLI, config, portable train step, predict.

:func:`register` puts :class:`PortableTrainOneStepCell` (WRAPPER registry) and :class:`PortableAdamW`
(OPTIMIZER registry) into MindFormers' registry; reading either name from this package does too. The
package itself imports nothing heavy, so ``mindformers_ext.runner.cli`` parses flags (and answers
``--help``) before MindSpore and MindFormers load.
"""
import importlib

__all__ = ["PortableAdamW", "PortableTrainOneStepCell", "register"]

_LAZY = {"PortableAdamW": "mindformers_ext.runner.optim", "PortableTrainOneStepCell": "mindformers_ext.runner.wrapper"}


def register() -> None:
    """Register our train wrapper and optimizer with MindFormers (the finetune YAMLs name them)."""
    for module in _LAZY.values():
        importlib.import_module(module)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
