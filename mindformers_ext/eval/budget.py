"""How many new tokens fit: the model's context minus the longest prompt, known before any work.

``tools/eval_code.py`` asks for ``--max_new_tokens`` (512 by default) on every problem; a model
whose context is shorter than the longest prompt plus that would fail in ``generate`` after part
of the run (``prompt (134) + max_new_tokens (512) exceeds the model's max_position_embedding
(256)``). :func:`fit_max_new_tokens` caps the request to what the context leaves for the longest
prompt (with a warning naming both numbers and the flag), or raises :class:`ContextTooShort`
when not even one token fits. :func:`yaml_context` reads the limit and the tokenizer from a
predict YAML without building the model or loading weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["ContextTooShort", "ContextBudget", "context_limit", "fit_max_new_tokens", "yaml_context"]


class ContextTooShort(ValueError):
    """The longest prompt leaves no room in the model's context for even one new token."""


def context_limit(model_config: Any) -> Optional[int]:
    """Positions (prompt + new tokens) a model handles, as ``generate`` checks them
    (``mindformers_ext/generation/decoding.py``): the config's ``context_length()`` (its
    ``max_position_embedding``, extended by dynamic NTK's factor), else ``max_position_embedding`` or
    ``seq_length``; None when the config names none."""
    context_length = getattr(model_config, "context_length", None)
    if callable(context_length):
        return int(context_length())
    limit = getattr(model_config, "max_position_embedding", None) or getattr(model_config, "seq_length", None)
    return int(limit) if limit else None


@dataclass
class ContextBudget:
    """What :func:`fit_max_new_tokens` decided."""

    max_new_tokens: int          # what to generate with
    requested: int               # what was asked for
    limit: Optional[int]         # the model's context (None: no fixed limit)
    longest: int                 # tokens of the longest prompt
    longest_name: str            # which prompt that is (a task id)

    @property
    def capped(self) -> bool:
        return self.max_new_tokens < self.requested


def fit_max_new_tokens(requested: int, prompt_lengths: Sequence[int], limit: Optional[int],
                       names: Optional[Sequence[str]] = None, flag: str = "--max_new_tokens",
                       where: str = "the model", warn: Callable[[str], None] = None) -> ContextBudget:
    """Cap ``requested`` new tokens so that the longest prompt plus them fits ``limit`` positions.

    Args:
        requested: new tokens asked for (``flag``'s value).
        prompt_lengths: tokens of each prompt (special tokens included, as the model sees them).
        limit: the model's context (:func:`context_limit`); None: nothing to cap.
        names: a name per prompt (task ids) for the messages.
        flag: the option that sets ``requested``, named in the messages.
        where: what the limit belongs to (e.g. the YAML's path), named in the messages.
        warn: called with the warning text when the request is capped (default:
            :func:`warnings.warn`).

    Raises:
        ContextTooShort: the longest prompt leaves no room for one new token (nothing is capped to 0).
        ValueError: ``requested`` < 1.
    """
    if requested < 1:
        raise ValueError(f"{flag} must be at least 1, got {requested}")
    lengths = list(prompt_lengths)
    if not lengths:
        return ContextBudget(requested, requested, limit, 0, "")
    i = max(range(len(lengths)), key=lambda k: lengths[k])
    longest, name = int(lengths[i]), str(names[i]) if names is not None else f"prompt {i}"
    budget = ContextBudget(requested, requested, limit, longest, name)
    if limit is None or longest + requested <= limit:
        return budget
    room = limit - longest
    if room < 1:
        raise ContextTooShort(
            f"the longest prompt ({name}) has {longest} tokens and {where} has a context of {limit} "
            f"positions: no room for even one new token; evaluate fewer "
            f"problems (--limit) or use a model / config with a longer context")
    budget.max_new_tokens = room
    message = (f"{flag} {requested} does not fit: the longest prompt ({name}) has {longest} tokens and "
               f"{where} has a context of {limit} positions; generating at most "
               f"{room} new tokens per sample (pass {flag} {room} or less to silence this warning)")
    (warn or (lambda text: warnings.warn(text, stacklevel=3)))(message)
    return budget


@dataclass
class YamlContext:
    """A predict YAML's context limit and its tokenizer's encoder (no model built)."""

    limit: Optional[int]
    encode: Callable[[str], List[int]]
    config_path: str


def yaml_context(config_path: str) -> YamlContext:
    """The context limit of the model a predict YAML describes and an ``encode(text) -> ids`` with
    its tokenizer (special tokens added as :meth:`TextGenerator.encode` adds them), built from the
    YAML alone: the model config class and the tokenizer, no network and no weights."""
    # pylint: disable=import-outside-toplevel
    import argparse

    from mindformers_ext.families import load_families
    load_families()  # the research packages' classes in MindFormers' registry
    from mindformers.models.build_config import build_model_config
    from mindformers.models.build_tokenizer import build_tokenizer

    from mindformers_ext.runner.config import build_config

    args = argparse.Namespace(config=config_path, run_mode="predict")
    config = build_config(args)
    model = config.get("model") or {}
    if model.get("model_config") is None:
        raise ValueError(f"{config_path}: no model.model_config section")
    tokenizer_cfg = (config.get("processor") or {}).get("tokenizer")
    if tokenizer_cfg is None:
        raise ValueError(f"{config_path}: predict needs a processor.tokenizer section")
    model_config = build_model_config(model.model_config)
    tokenizer = build_tokenizer(tokenizer_cfg)

    def encode(text: str) -> List[int]:
        return [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]

    return YamlContext(context_limit(model_config), encode, config_path)
