"""Train, finetune, evaluate or predict WizardCoder with the seed's command line.

    python research/wizardcoder/run_wizardcoder.py --config research/wizardcoder/run_wizardcoder.yaml \
        --run_mode predict --load_checkpoint ckpt/wizardcoder_15b.ckpt --use_parallel False \
        --predict_data "Write a Python function that checks whether a number is prime." --predict_length 256
    bash tools/msrun_launcher.sh "research/wizardcoder/run_wizardcoder.py \
        --config research/wizardcoder/run_wizardcoder.yaml --use_parallel True --run_mode finetune \
        --load_checkpoint ckpt/wizardcoder_15b.ckpt --auto_trans_ckpt True --train_data alpaca_2k.mindrecord" 8

A thin front end of ``tools/run_mindformer.py`` (the same code: ``mindformers_ext.runner``): the seed's
flags (``--config --run_mode --use_parallel --load_checkpoint --train_data (--train_dataset) --eval_dataset
--predict_data --predict_length --resume --optimizer_parallel --device_id --vocab_file --merge_file``) are
translated to run_mindformer's, and every other flag (``--use_past``, ``--output_dir``,
``--predict_batch_size``, ``--a.b.c value`` overrides, ...) is passed through. As in the seed, predict
prompts are wrapped in WizardCoder's Alpaca template (``--prompt_template none`` sends them as given).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if importlib.util.find_spec("mindformers_ext") is None:  # not installed: run from the checkout
    sys.path.insert(0, REPO)
# pylint: disable=wrong-import-position
from mindformers_ext.runner.cli import default_log_path, parse_args, str2bool  # noqa: E402  (no MindSpore import)

DEFAULT_CONFIG = os.path.join(HERE, "run_wizardcoder.yaml")
TEMPLATES = ("alpaca", "none")


def build_parser() -> argparse.ArgumentParser:
    """The seed's flags (others go through to run_mindformer.py)."""
    parser = argparse.ArgumentParser(
        prog="run_wizardcoder.py", allow_abbrev=False,
        description="WizardCoder train / finetune / eval / predict (the seed's flags; any other flag or "
                    "--dotted.key value override goes to tools/run_mindformer.py).")
    add = parser.add_argument
    add("--config", default=DEFAULT_CONFIG, help="YAML (default: run_wizardcoder.yaml beside this script)")
    add("--task", default="text_generation", help="only text_generation")
    add("--run_mode", default=None, choices=("train", "finetune", "eval", "predict"),
        help="default: the YAML's run_mode")
    add("--pet_method", default="", help="parameter-efficient finetuning: not supported (leave empty)")
    add("--use_parallel", type=str2bool, default=None)
    add("--load_checkpoint", default=None, help="checkpoint file or directory")
    add("--resume", "--resume_training", dest="resume", default=None,
        help="resume training (True, or a checkpoint file name)")
    add("--train_data", "--train_dataset", "--train_dataset_dir", dest="train_data", default=None,
        help="training MindRecord file or directory")
    add("--eval_dataset", "--eval_data", "--eval_dataset_dir", dest="eval_dataset", default=None)
    add("--predict_data", nargs="+", default=None,
        help="one or more instructions, or a text file with one per line")
    add("--predict_length", type=int, default=None, help="maximum number of new tokens")
    add("--prompt_template", default="alpaca", choices=TEMPLATES,
        help="wrap predict_data in WizardCoder's Alpaca prompt (default) or send it as given (none)")
    add("--optimizer_parallel", type=str2bool, default=None, help="parallel.enable_parallel_optimizer")
    add("--device_id", type=int, default=None)
    add("--vocab_file", default=None, help="tokenizer vocab.json (predict; default: the shipped tokenizer)")
    add("--merge_file", default=None, help="tokenizer merges.txt (predict)")
    return parser


def _yaml_run_mode(path: str) -> Optional[str]:
    import yaml  # pylint: disable=import-outside-toplevel

    try:
        with open(path, encoding="utf-8") as f:
            return (yaml.safe_load(f) or {}).get("run_mode")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def translate(argv: Optional[Sequence[str]] = None) -> tuple[list[str], argparse.Namespace]:
    """run_mindformer.py arguments for the seed-style ``argv`` (prompts not yet templated)."""
    args, rest = build_parser().parse_known_args(argv)
    if args.task != "text_generation":
        raise SystemExit(f"run_wizardcoder.py: error: --task {args.task!r}: only text_generation is supported")
    if args.pet_method:
        raise SystemExit(f"run_wizardcoder.py: error: --pet_method {args.pet_method!r}: parameter-efficient "
                         "finetuning is not supported; leave it empty for full finetuning")
    out = ["--config", args.config]
    for flag, value in (("--run_mode", args.run_mode), ("--load_checkpoint", args.load_checkpoint),
                        ("--resume_training", args.resume), ("--train_dataset_dir", args.train_data),
                        ("--eval_dataset_dir", args.eval_dataset), ("--predict_length", args.predict_length),
                        ("--device_id", args.device_id), ("--use_parallel", args.use_parallel),
                        ("--parallel.enable_parallel_optimizer", args.optimizer_parallel)):
        if value is not None:
            out += [flag, str(value)]
    run_mode = args.run_mode or _yaml_run_mode(args.config)
    if args.vocab_file or args.merge_file:
        if run_mode != "predict":
            print("run_wizardcoder.py: --vocab_file / --merge_file only matter for predict (training data is "
                  "tokenized by wizardcoder_preprocess.py); ignored", file=sys.stderr)
        else:
            if args.vocab_file:
                out += ["--processor.tokenizer.vocab_file", args.vocab_file]
            if args.merge_file:
                out += ["--processor.tokenizer.merge_file", args.merge_file]
    return out + list(rest), args


def main(argv: Optional[Sequence[str]] = None) -> int:
    forwarded, args = translate(argv)
    # MindFormers' log to the run's output_dir before it loads; also rejects bad pass-through flags early
    default_log_path(parse_args(forwarded)[0])
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.runner.main import main as run_mindformer

    if args.predict_data is not None:
        from mindformers_ext.runner.predict import read_prompts

        try:
            prompts = read_prompts(args.predict_data)
        except (ValueError, OSError) as exc:
            print(f"run_wizardcoder.py: error: {exc}", file=sys.stderr)
            return 2
        if args.prompt_template == "alpaca":
            from mindformers_ext.data.templates import get_template

            template = get_template("alpaca")
            prompts = [template.render_prompt(p) for p in prompts]
        forwarded += ["--predict_data", *prompts]
    return run_mindformer(forwarded)


if __name__ == "__main__":
    sys.exit(main())
