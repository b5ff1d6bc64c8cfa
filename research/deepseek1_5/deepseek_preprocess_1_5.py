"""Code Alpaca / Evol-Instruct style data -> MindRecord for DeepSeek-Coder fine-tuning.

Example::

    python research/deepseek1_5/deepseek_preprocess_1_5.py --dataset_type qa \
        --input_glob /data/code_alpaca_20k.json --model_file /path/tokenizer.json \
        --seq_length 4096 --output_file /data/code_alpaca.mindrecord

Inputs: JSON list or JSON Lines records with ``instruction``, optional ``input``, ``output``
(detected by content). ``--template instruct`` (default) uses DeepSeek-Coder's instruction prompt
and ends the target with ``<|EOT|>`` (100015 for v1.5); ``--template base`` ends it with
``<｜end▁of▁sentence｜>`` (100001). A non-empty ``input`` is appended to the instruction after a
blank line. ``--model_file`` is a ``tokenizer.json`` (default: the shipped DeepSeek-LLM / v1.5
one; the shipped ``deepseek-coder`` name selects v1's). ``--pad_token_id`` defaults to the
template's end token id; labels are masked by position, so padding with the end id never masks the
real end token.

``--dataset_type wiki`` (upstream's pretraining mode) reads raw WikiText instead: detokenised, headings
dropped, each paragraph BOS + text + the template's end token, the stream (``--repeat`` times) cut into
samples of ``seq_length + 1`` tokens with ``labels`` = ``input_ids`` (see ``mindformers_ext/data/wiki.py``).

Each record holds ``input_ids`` and ``labels`` of ``seq_length + 1`` int32 tokens, aligned; labels
are -100 over the prompt and padding. MindFormers' causal LMs use ``input_ids[:, :-1]`` as input
and ``labels[:, 1:]`` as targets (see ``mindformers_ext/data/sft.py``).
"""
import argparse
import os
import sys
from typing import List, Optional, Union

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=wrong-import-position
from mindformers_ext.data import (PreprocessStats, add_common_arguments, cli_exit, expand_inputs, get_template,
                                  run_cli)
from mindformers_ext.data.wiki import wiki_to_mindrecord
# the tokenizer backend without MindFormers (importing it takes seconds): DeepSeekCoderTokenizer's, exactly
from mindformers_ext.tokenizers.backend import deepseek_backend

TEMPLATES = {"instruct": "deepseek-instruct", "base": "deepseek-base"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_type", default="qa", choices=["qa", "wiki"],
                        help="qa: instruction / input / output records; wiki: raw WikiText (wiki.train.tokens) "
                             "cut into seq_length + 1 token samples for pretraining (see mindformers_ext/data/wiki.py)")
    parser.add_argument("--repeat", type=int, default=None, help="wiki: repeat the token stream N times (default 1)")
    parser.add_argument("--model_file", default=None,
                        help="tokenizer.json, a directory holding one, or a shipped name (deepseek-llm, "
                             "deepseek-coder); default: shipped deepseek-llm (v1.5 / V2)")
    parser.add_argument("--template", default="instruct", choices=sorted(TEMPLATES),
                        help="instruct: target ends with <|EOT|>; base: with <｜end▁of▁sentence｜>")
    return add_common_arguments(parser, default_pad=None)


def main(argv: Optional[List[str]] = None) -> Union[PreprocessStats, int]:
    """Parse ``argv`` (default: sys.argv), preprocess, print the counts, return them (wiki: the sample count)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tokenizer = deepseek_backend(args.model_file)
    template = get_template(TEMPLATES[args.template])
    if args.dataset_type == "qa":
        if args.repeat is not None:
            parser.error("--repeat is for --dataset_type wiki")
        return run_cli(args, tokenizer, template)
    if args.pad_token_id is not None or args.drop_long:
        parser.error("--dataset_type wiki writes full samples only: --pad_token_id / --drop_long do not apply")
    files = expand_inputs(args.input_glob)
    count = wiki_to_mindrecord(files, args.output_file, tokenizer, tokenizer.convert_tokens_to_ids(template.end_token),
                               args.seq_length, args.repeat or 1, args.overwrite, args.file_partition)
    print(f"{args.output_file}: {count} samples of {args.seq_length + 1} tokens from {len(files)} WikiText file(s), "
          f"paragraphs ended with {template.end_token}")
    return count


if __name__ == "__main__":
    sys.exit(cli_exit(main))
