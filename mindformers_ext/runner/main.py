"""``run_mindformer.py``: parse, build the config, build the context, run the mode."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "register_path", "predict_options", "run_predict"]


def register_path(path: str) -> list[str]:
    """MindFormers' ``--register_path``: export ``REGISTER_PATH`` (for YAML ``auto_register`` keys), put
    ``path`` on ``sys.path`` and import its top-level modules and packages so that their
    ``@MindFormerRegister.register`` decorators run. Returns the imported module names."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise SystemExit(f"run_mindformer.py: error: --register_path {path!r} is not a directory")
    os.environ["REGISTER_PATH"] = path
    if path not in sys.path:
        sys.path.append(path)
    imported = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".py") and not name.startswith(("_", "test")):
            module = name[:-3]
        elif os.path.isfile(os.path.join(full, "__init__.py")):
            module = name
        else:
            continue
        if module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # pylint: disable=broad-except
            raise SystemExit(f"run_mindformer.py: error: --register_path: importing {full} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        imported.append(module)
    return imported


def predict_options(args: argparse.Namespace) -> dict:
    """Generation keyword arguments from the predict flags (``--predict_length``, ``--use_past``)."""
    options = {}
    if args.predict_length is not None:
        if args.predict_length < 1:
            raise SystemExit("run_mindformer.py: error: --predict_length must be >= 1")
        options["max_new_tokens"] = args.predict_length
    if args.use_past is not None:
        options["use_past"] = args.use_past
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status."""
    from mindformers_ext.runner.cli import default_log_path, parse_args  # pylint: disable=import-outside-toplevel

    args, overrides = parse_args(argv)
    default_log_path(args)
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.families import load_families
    load_families()  # the research packages' classes in MindFormers' registry
    from mindformers_ext.runner import register
    register()  # PortableTrainOneStepCell and PortableAdamW in MindFormers' registry
    from mindformers.tools.logger import logger
    from mindformers_ext.runner.config import ConfigError, adapt_to_device, build_config, check_types
    from mindformers_ext.runner.context import ensure_context, freeze_gc_heap
    from mindformers_ext.checkpoint import set_strict_load

    set_strict_load(args.strict_load)
    if args.register_path:
        register_path(args.register_path)
    try:
        config = build_config(args, overrides)
        check_types(config)
        target = adapt_to_device(config, explicit_target=args.device_target is not None)
    except ConfigError as exc:
        print(f"run_mindformer.py: error: {exc}", file=sys.stderr)
        return 2
    logger.info("run_mode %s on %s with %s", config.run_mode, target, config.config_path)
    if getattr(args, "quant", None) and config.run_mode != "predict":
        print(f"run_mindformer.py: error: --quant {args.quant} applies to --run_mode predict (weight-only int8 "
              f"inference), not {config.run_mode}", file=sys.stderr)
        return 2
    ensure_context(config)
    freeze_gc_heap()  # the imports' objects: every graph compile below starts with a full collection
    from mindformers_ext.checkpoint import CheckpointError
    from mindformers_ext.runner.train import DataError

    try:
        if config.run_mode in ("train", "finetune"):
            from mindformers_ext.runner.train import run_train

            run_train(config)
        elif config.run_mode == "eval":
            from mindformers_ext.runner.train import run_eval

            try:
                run_eval(config)
            except ValueError as exc:
                print(f"run_mindformer.py: error: {exc}", file=sys.stderr)
                return 2
        else:
            return run_predict(config, args)
    except (CheckpointError, DataError) as exc:
        print(f"run_mindformer.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


def print_streamer(tokenizer):
    """A MindFormers text streamer that prints the new text to stdout as it is produced."""
    from mindformers.generation.streamers import TextStreamer  # pylint: disable=import-outside-toplevel

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def fim_requests(generator, prefixes: Sequence[str], suffix: str, family: str) -> tuple[list[str], dict]:
    """FIM prompts for ``prefixes`` and the generation options that stop at the family's end tokens."""
    from mindformers_ext.generation.fim import build_fim_prompt, fim_stop_token_ids  # pylint: disable=C0415

    config_eos = generator.network.config.eos_token_id
    eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    stops = sorted(set(eos) | set(fim_stop_token_ids(generator.tokenizer, family)))
    return [build_fim_prompt(prefix, suffix, family) for prefix in prefixes], {"eos_token_id": stops}


def fim_middle(completion, family: str):
    """``completion`` with its text cut to the generated middle."""
    from mindformers_ext.generation.fim import extract_fim_middle  # pylint: disable=import-outside-toplevel

    completion.text = extract_fim_middle(completion.text, family)
    return completion


def run_predict(config, args: argparse.Namespace) -> int:
    """Generate for ``--predict_data`` (or the YAML's ``input_data``); print MindFormers-style results
    and write ``output_dir/predict_results.jsonl`` (rank 0 of a distributed job)."""
    # pylint: disable=import-outside-toplevel
    from mindformers.tools.utils import get_real_rank
    from mindformers.tools.logger import logger
    from mindformers_ext.runner.predict import TextGenerator, printable, read_prompts, write_jsonl

    try:
        prompts = read_prompts(args.predict_data if args.predict_data is not None else config.get("input_data"))
    except (ValueError, OSError) as exc:
        print(f"run_mindformer.py: error: {exc}", file=sys.stderr)
        return 2
    results = os.path.join(config.get("output_dir") or "./output", "predict_results.jsonl")
    if get_real_rank() == 0 and os.path.lexists(results):
        os.remove(results)  # never leave an older run's results to be read as this run's
        logger.info("removed the previous %s", results)
    generator = TextGenerator(config, batch_size=config.get("predict_batch_size") or 1,
                              random_weights=bool(getattr(args, "random_weights", False)),
                              quant=getattr(args, "quant", None), **predict_options(args))
    call_options = {}
    if args.fim_suffix is not None:
        prompts, call_options = fim_requests(generator, prompts, args.fim_suffix.replace("\\n", "\n"),
                                             args.fim_family)
    if args.streamer:
        def streamed():
            for prompt in prompts:  # one prompt at a time, each printed as it grows
                print(printable(prompt), end="", flush=True)
                yield from generator.complete([prompt], streamer=print_streamer(generator.tokenizer), **call_options)
        completions = streamed()
    else:
        completions = generator.complete(prompts, **call_options)
    failures = []

    def reported(stream):
        for completion in stream:
            if completion.error:
                failures.append(completion.error)
                print(f"run_mindformer.py: error: {completion.error}", file=sys.stderr)
            else:
                if args.fim_suffix is not None:
                    completion = fim_middle(completion, args.fim_family)
                if get_real_rank() == 0:
                    shown = completion.text if args.fim_suffix is not None else completion.prompt + completion.text
                    print({"text_generation_text": [shown]})
            yield completion

    if get_real_rank() == 0:
        path = write_jsonl(reported(completions), results)
        print(f"predictions written to {path}")
    else:
        for _ in reported(completions):
            pass
    if failures:
        print(f"run_mindformer.py: error: {len(failures)} of {len(prompts)} prompts failed (their errors are in "
              "the results file); the others completed", file=sys.stderr)
        return 1
    return 0
