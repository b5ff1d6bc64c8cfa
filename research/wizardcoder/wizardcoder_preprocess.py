"""Alpaca / Evol-Instruct style data -> MindRecord for WizardCoder fine-tuning.

Example::

    python research/wizardcoder/wizardcoder_preprocess.py \
        --input_glob /data/EvolInstruct-Code-80k.json \
        --vocab_file /path/vocab.json --merge_file /path/merges.txt \
        --output_file /data/evol.mindrecord --seq_length 2048

Inputs: JSON list or JSON Lines records with ``instruction``, optional ``input``, ``output``
(detected by content, no code edit to switch). Prompts are Alpaca's ``prompt_input`` (non-empty
``input``) / ``prompt_no_input``, as in WizardCoder's training code; the target is
``{output}<|endoftext|>``. The tokenizer comes from ``--tokenizer_file`` or ``--vocab_file`` +
``--merge_file`` (a ``tokenizer.json`` next to ``vocab.json`` is preferred); default: the shipped
WizardCoder tokenizer. Padding id defaults to ``[PAD]`` = 49152.

Each record holds ``input_ids`` and ``labels`` of ``seq_length + 1`` int32 tokens, aligned; labels
are -100 over the prompt and padding. The model uses ``input_ids[:, :-1]`` as input and
``labels[:, 1:]`` as targets (see ``mindformers_ext/data/sft.py``).
"""
import argparse
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=wrong-import-position
from mindformers_ext.data import PreprocessStats, add_common_arguments, cli_exit, get_template, run_cli
# the tokenizer backend without MindFormers (importing it takes seconds): WizardCoderTokenizer's, exactly
from mindformers_ext.tokenizers.backend import byte_level_backend

PAD_TOKEN_ID = 49152


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_file", default=None, help="vocab.json (default: shipped WizardCoder tokenizer)")
    parser.add_argument("--merge_file", "--merges_file", dest="merge_file", default=None, help="merges.txt")
    parser.add_argument("--tokenizer_file", default=None, help="tokenizer.json (wins over vocab/merge files)")
    parser.add_argument("--mindrecord_schema", default="wizardcoder", help="schema description stored in the file")
    return add_common_arguments(parser, default_pad=PAD_TOKEN_ID)


def main(argv: Optional[List[str]] = None) -> PreprocessStats:
    """Parse ``argv`` (default: sys.argv), preprocess, print the counts, return them."""
    args = build_parser().parse_args(argv)
    tokenizer = byte_level_backend(tokenizer_file=args.tokenizer_file, vocab_file=args.vocab_file,
                                   merges_file=args.merge_file)
    return run_cli(args, tokenizer, get_template("alpaca"))


if __name__ == "__main__":
    sys.exit(cli_exit(main))
