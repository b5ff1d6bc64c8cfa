"""Command line of ``run_mindformer.py``: MindFormers' flags plus nested ``--a.b.c value`` overrides.

The flags are the ones MindFormers' own ``run_mindformer.py`` takes (``--train_data`` is accepted as
the seeds spell ``--train_dataset_dir``), plus ``--predict_length`` and ``--use_past``, which the
DeepSeek-Coder seeds pass and upstream silently ignored. Any other ``--dotted.key value`` (or
``--dotted.key=value``) overrides that YAML key; values are typed like YAML scalars.

This module imports neither MindSpore nor MindFormers, so ``tools/run_mindformer.py`` can parse
(and answer ``--help``) and point MindFormers' log at the run's output directory before importing
them.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Optional, Sequence, Union

import yaml

__all__ = ["build_parser", "parse_args", "Overrides", "parse_scalar", "str2bool", "bool_or_str", "default_log_path", "RUN_MODES"]

RUN_MODES = ("train", "finetune", "eval", "predict")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def str2bool(text: str) -> bool:
    """'True' / 'false' / '1' / 'no' ... to a bool; anything else is an argparse error."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {text!r}")


def bool_or_str(text: str) -> Union[bool, str]:
    """A boolean, or a string kept as is (``--resume_training`` also takes a checkpoint file name)."""
    try:
        return str2bool(text)
    except argparse.ArgumentTypeError:
        return text


def parse_scalar(text: str) -> Any:
    """A command-line value typed like a YAML scalar: ``8`` int, ``1e-5`` float, ``True`` bool,
    ``null`` None, ``[1, 2]`` list, ``{a: 1}`` dict; anything else stays a string.

    PyYAML reads ``1e-5`` (no dot) as a string; such numbers are converted here too.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if value is None and text.strip().lower() not in ("null", "none", "~", ""):
        return text
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``run_mindformer.py`` argument parser (nested overrides are handled by :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="run_mindformer.py", allow_abbrev=False,
        description="Train, finetune, evaluate or predict with a MindFormers YAML (mindformers-ext models "
                    "included). Other --dotted.key value pairs override YAML keys.")
    add = parser.add_argument
    add("--config", required=True, help="YAML config file")
    add("--run_mode", choices=RUN_MODES, default=None, help="overrides the YAML's run_mode")
    add("--mode", type=int, default=None, help="0: graph mode, 1: pynative")
    add("--device_id", type=int, default=None)
    add("--device_target", default=None, choices=("Ascend", "GPU", "CPU"),
        help="default: the YAML's, or CPU when it names Ascend and no Ascend device is present")
    add("--use_parallel", type=str2bool, default=None, help="distributed run (launch with msrun_launcher.sh)")
    add("--load_checkpoint", default=None,
        help="checkpoint file (.ckpt / .safetensors) or directory (rank_N/ sub-directories) to load")
    add("--strict_load", type=str2bool, default=True,
        help="True (default): a checkpoint holding weights the model does not have is an error; False: load "
             "it anyway, without them, with a warning listing them")
    add("--load_ckpt_format", default=None, choices=("ckpt", "safetensors"),
        help="default: from the load_checkpoint file names")
    add("--src_strategy_path_or_dir", default=None, help="strategy of a distributed load_checkpoint")
    add("--auto_trans_ckpt", type=str2bool, default=None, help="reshard load_checkpoint to this layout")
    add("--transform_process_num", type=int, default=None)
    add("--only_save_strategy", type=str2bool, default=None)
    add("--resume_training", type=bool_or_str, default=None,
        help="resume step, optimizer state and loss scale from load_checkpoint (default: output_dir/checkpoint); "
             "True or a checkpoint file name")
    add("--train_dataset_dir", "--train_data", dest="train_dataset_dir", default=None,
        help="training MindRecord file or directory")
    add("--eval_dataset_dir", "--eval_data", dest="eval_dataset_dir", default=None)
    add("--do_eval", type=str2bool, default=None)
    add("--predict_data", nargs="+", default=None,
        help="one or more prompts, or a text file with one prompt per line")
    add("--predict_batch_size", type=int, default=None)
    add("--predict_length", type=int, default=None, help="maximum number of new tokens per prompt")
    add("--use_past", type=str2bool, default=None, help="decode with the KV cache")
    add("--random_weights", action="store_true",
        help="predict without a checkpoint, with randomly initialised weights (a warning is printed); "
             "without this flag a predict run that names no checkpoint is an error")
    add("--quant", choices=("w8a16",), default=None,  # mindformers_ext.quant.QUANT_METHODS (not imported here)
        help="predict with int8 weights: w8a16 = weight-only int8, per-output-channel scales, for the linear "
             "layers and MoE experts; loads a convert_weight.py --quant w8a16 checkpoint as it is, or quantizes a "
             "float one after loading")
    add("--streamer", action="store_true", help="print the text of each prompt as it is generated")
    add("--fim_suffix", default=None,
        help="fill-in-the-middle: --predict_data holds the prefix(es), this the code after the hole; "
             "only the middle is returned")
    add("--fim_family", default="deepseek_coder",
        help="FIM token format: deepseek_coder (default) or starcoder / wizardcoder")
    add("--seed", type=int, default=None)
    add("--output_dir", default=None)
    add("--epochs", type=int, default=None)
    add("--batch_size", type=int, default=None)
    add("--gradient_accumulation_steps", type=int, default=None)
    add("--sink_mode", type=str2bool, default=None)
    add("--num_samples", type=int, default=None)
    add("--profile", type=str2bool, default=None)
    add("--register_path", default=None,
        help="directory of extra modules to import so their registered classes resolve in the YAML")
    return parser


class Overrides(dict):
    """``{dotted key: typed value}``; ``raw`` keeps each value's command-line text, so that a key the
    YAML holds as a string can stay one (``--processor.tokenizer.pad_token [PAD]``,
    ``--model.model_config.extend_method None``; see :func:`mindformers_ext.runner.config.apply_overrides`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.raw: dict[str, str] = {}


def _split_overrides(rest: Sequence[str]) -> dict[str, Any]:
    """``['--a.b', '1', '--c=x']`` -> ``{'a.b': 1, 'c': 'x'}`` (values typed by :func:`parse_scalar`)."""
    overrides = Overrides()
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) == 2:
            raise SystemExit(f"run_mindformer.py: error: unexpected argument {token!r}; YAML overrides are "
                             "written --dotted.key value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and len(rest[i + 1]) > 2):
                raise SystemExit(f"run_mindformer.py: error: override {token} has no value")
            key, value = token[2:], rest[i + 1]
            i += 2
        if not key or any(not part for part in key.split(".")):
            raise SystemExit(f"run_mindformer.py: error: bad override key {token!r}")
        overrides[key] = parse_scalar(value)
        overrides.raw[key] = value
    return overrides


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(known flags, nested overrides) from ``argv`` (default: ``sys.argv[1:]``)."""
    args, rest = build_parser().parse_known_args(argv)
    return args, _split_overrides(rest)


def default_log_path(args: argparse.Namespace) -> str:
    """Point ``LOG_MF_PATH`` at ``<output_dir>/log`` unless it is set; returns the log path.

    MindFormers writes its log where ``LOG_MF_PATH`` points, else into ./output/log of the working
    directory, from the moment it is imported; ``output_dir`` is ``--output_dir`` or the YAML's.
    """
    if os.environ.get("LOG_MF_PATH"):
        return os.environ["LOG_MF_PATH"]
    output_dir = args.output_dir
    if output_dir is None:
        try:
            with open(args.config, encoding="utf-8") as f:
                output_dir = (yaml.safe_load(f) or {}).get("output_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            output_dir = None
    os.environ["LOG_MF_PATH"] = os.path.join(os.path.abspath(output_dir or "./output"), "log")
    return os.environ["LOG_MF_PATH"]
