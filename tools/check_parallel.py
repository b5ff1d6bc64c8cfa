"""Check a YAML's parallel layout statically (Ascend semi-auto-parallel rules, no device needed).

    python tools/check_parallel.py --config research/deepseek1_5/finetune_deepseek_coder1_5_7b.yaml --device_num 8
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="MindFormers YAML with model and parallel_config")
    parser.add_argument("--device_num", type=int, default=None,
                        help="devices of the job (default: data_parallel x model_parallel x pipeline_stage)")
    args = parser.parse_args()
    from mindformers_ext.parallel import ParallelCheckError
    from mindformers_ext.parallel.yaml_check import check_yaml

    try:
        for line in check_yaml(args.config, args.device_num):
            print(line)
    except (ParallelCheckError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
