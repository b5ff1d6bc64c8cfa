"""Upstream MindFormers' first DeepSeek-Coder preprocessing step, which is not needed here.

MindFormers v1.5.0 documents two steps:

    python alpaca_converter.py --data_path code_alpaca_20k.json --output_path alpaca-data-converted.json
    python deepseek_preprocess_1_5.py --dataset_type qa --input_glob alpaca-data-converted.json ...

Here ``deepseek_preprocess_1_5.py`` reads the code_alpaca records (``instruction``, ``input``,
``output``; JSON or JSONL) itself and applies the DeepSeek-Coder prompt, so this script only says
so and exits with status 2 without writing anything.
"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    data = "code_alpaca_20k.json"
    for i, arg in enumerate(argv):
        if arg == "--data_path" and i + 1 < len(argv):
            data = argv[i + 1]
        elif arg.startswith("--data_path="):
            data = arg.split("=", 1)[1]
    print("alpaca_converter.py: not needed in mindformers-ext: research/deepseek1_5/deepseek_preprocess_1_5.py "
          "reads code_alpaca records (instruction, input, output) directly; run\n"
          f"    python research/deepseek1_5/deepseek_preprocess_1_5.py --dataset_type qa --input_glob {data} "
          "--seq_length 4096 --output_file alpaca_finetune_4k.mindrecord",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
