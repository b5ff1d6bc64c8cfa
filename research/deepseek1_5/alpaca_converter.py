"""Upstream MindFormers' first DeepSeek-Coder preprocessing step, with its command line.

MindFormers v1.5.0 documents two steps:

    python alpaca_converter.py --data_path code_alpaca_20k.json --output_path alpaca-data-converted.json
    python deepseek_preprocess_1_5.py --dataset_type qa --input_glob alpaca-data-converted.json ...

Both run here. Upstream's converter baked DeepSeek-Coder's prompt into "conversations" records; here
``deepseek_preprocess_1_5.py`` applies the prompt itself (and keeps a non-empty ``input``, which
upstream dropped), so this step checks the code_alpaca records (``instruction``, optional ``input``,
``output``; JSON list or JSON Lines) and writes them as one JSON list of those three fields. Errors
name the file and record at fault.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=wrong-import-position
from mindformers_ext.data.records import DataFormatError, read_records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="alpaca-data.json", help="code_alpaca JSON list or JSON Lines")
    parser.add_argument("--output_path", default="alpaca-data-conversation.json",
                        help="the checked records, a JSON list (input of deepseek_preprocess_1_5.py)")
    return parser


def convert(data_path: str, output_path: str) -> int:
    """Write ``data_path``'s records to ``output_path`` (a JSON list); returns how many."""
    records = [{"instruction": r.instruction, "input": r.input or "", "output": r.output}
               for r in read_records(data_path)]
    if not records:
        raise DataFormatError(f"{data_path}: no records")
    if os.path.exists(output_path) and os.path.samefile(output_path, data_path):
        raise ValueError(f"{output_path}: the output path is the input path; write it somewhere else")
    tmp = f"{output_path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=2)
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(records)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        count = convert(args.data_path, args.output_path)
    except (OSError, ValueError) as exc:  # DataFormatError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output_path}: {count} records (instruction, input, output); next:\n"
          f"    python research/deepseek1_5/deepseek_preprocess_1_5.py --dataset_type qa --input_glob "
          f"{args.output_path} --seq_length 4096 --output_file alpaca_finetune_4k.mindrecord")
    return 0


if __name__ == "__main__":
    sys.exit(main())
