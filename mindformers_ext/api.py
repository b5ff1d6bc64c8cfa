"""Python entry points for other tools (the code-eval harness, notebooks): a YAML in, a generator out.

    from mindformers_ext.api import build_generator
    generate = build_generator("configs/deepseek1_5/predict_tiny.yaml", "output/checkpoint",
                               max_new_tokens=64)
    completions = generate(["def fib(n):"])   # new text only, one string per prompt

The same code path as ``tools/run_mindformer.py --run_mode predict`` (config building, device
selection, context, registry, checkpoint loading, MindFormers' text-generation pipeline).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

from mindformers_ext.runner.predict import GENERATION_KEYS, TEXT_KEYS, Completion, TextGenerator

__all__ = ["build_generator", "build_text_generator", "Completion", "GENERATION_KEYS", "TEXT_KEYS"]


def build_text_generator(config_path: str, load_checkpoint: Optional[str] = None,
                         overrides: Optional[dict[str, Any]] = None, batch_size: Optional[int] = None,
                         device_target: Optional[str] = None, random_weights: bool = False,
                         **gen_kwargs: Any) -> TextGenerator:
    """A :class:`TextGenerator` (``generate(prompts) -> list[Completion]`` with ids) for a YAML.

    Args:
        config_path: a predict YAML (``model`` + ``processor.tokenizer``); other run modes work too.
        load_checkpoint: weights (file or directory); default: the YAML's ``load_checkpoint``.
        overrides: dotted YAML keys to override, e.g. ``{"model.model_config.seq_length": 4096}``.
        batch_size: prompts per ``generate`` call (default: all the prompts of a call).
        device_target: "CPU" / "Ascend" / "GPU"; default: the YAML's, CPU when no Ascend is present.
        random_weights: run without a checkpoint (random weights, warned about on every run); without
            it, no checkpoint (argument, YAML ``load_checkpoint`` or ``checkpoint_name_or_path``) is an
            error (:class:`mindformers_ext.checkpoint.CheckpointError`).
        **gen_kwargs: generation defaults (``max_new_tokens``, ``do_sample``, ``top_k``, ``top_p``,
            ``temperature``, ``repetition_penalty``, ``eos_token_id``, ``use_past``, ``seed``), and
            ``stop_strings`` (completions are cut before the first one).
    """
    os.environ.setdefault("LOG_MF_PATH", os.path.join(os.path.abspath("./output"), "log"))
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.families import load_families
    load_families()  # the research packages' classes in MindFormers' registry
    from mindformers_ext.runner.config import adapt_to_device, build_config
    from mindformers_ext.runner.context import ensure_context

    args = argparse.Namespace(config=config_path, run_mode="predict", load_checkpoint=load_checkpoint,
                              device_target=device_target, use_past=gen_kwargs.get("use_past"))
    config = build_config(args, overrides)
    adapt_to_device(config, explicit_target=device_target is not None)
    ensure_context(config)
    return TextGenerator(config, batch_size=batch_size, random_weights=random_weights, **gen_kwargs)


def build_generator(config_path: str, load_checkpoint: Optional[str] = None,
                    **gen_kwargs: Any) -> Callable[[list[str]], list[str]]:
    """A function from prompts to completions (new text only), built from a YAML and a checkpoint.

    ``gen_kwargs``: generation defaults as for :func:`build_text_generator` (``max_new_tokens``,
    ``do_sample``, ...), plus ``batch_size``, ``overrides``, ``device_target`` and ``random_weights``.
    """
    generator = build_text_generator(config_path, load_checkpoint, **gen_kwargs)

    def generate(prompts: list[str]) -> list[str]:
        return generator(list(prompts))

    generate.generator = generator  # the underlying TextGenerator (ids, per-call options)
    return generate
