"""Train, finetune, evaluate or predict with a MindFormers YAML; mindformers-ext models registered.

    python tools/run_mindformer.py --config configs/deepseek1_5/predict_tiny.yaml \
        --run_mode predict --predict_data "def fib(n):" --predict_length 32 --use_past True
    python tools/run_mindformer.py --config configs/deepseek1_5/finetune_tiny.yaml \
        --run_mode finetune --train_dataset_dir data.mindrecord --runner_config.epochs 2

Flags are MindFormers' run_mindformer.py ones (see --help); --predict_length and --use_past take
effect; any other --dotted.key value overrides that key of the YAML. On a machine without Ascend
the run goes to CPU with the portable train wrapper. Distributed: tools/msrun_launcher.sh.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("mindformers_ext") is None:  # not installed: run from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    # the CLI first (no MindSpore / MindFormers import): bad flags and --help answer at once, and
    # MindFormers' log goes to the run's output_dir
    from mindformers_ext.runner.cli import default_log_path, parse_args

    default_log_path(parse_args()[0])
    from mindformers_ext.runner.main import main  # noqa: E402

    sys.exit(main())
