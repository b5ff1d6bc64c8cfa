"""Convert weights between HF safetensors and MindSpore checkpoints (streaming; see --help).

    python tools/convert_weight.py --model deepseek --input_path HF_DIR --output_path OUT.ckpt [--dtype bfloat16]
    python tools/convert_weight.py --model deepseek --reversed --input_path OUT.ckpt --output_path HF_OUT \
        --config HF_DIR/config.json

Checkpoints written by upstream MindFormers (its v1.3.2 - v1.5.0 converters or training) are migrated
to this project's layout with ``--upstream`` (alias ``--from_upstream``); the loaders also map them on
the fly, this writes the result once:

    python tools/convert_weight.py --model deepseek2|wizardcoder|deepseek --upstream \
        --input_path UP.ckpt --output_path OURS.ckpt [--config THE_MODEL.yaml]
"""
import os
import sys

try:
    from mindformers_ext.convert.cli import main
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mindformers_ext.convert.cli import main

UPSTREAM_FLAGS = ("--upstream", "--from_upstream")
UPSTREAM_HELP = ("\n--upstream / --from_upstream: the input is a checkpoint written by upstream MindFormers "
                 "(v1.3.2 - v1.5.0); it is migrated to this project's layout (see --upstream --help)")

if __name__ == "__main__":
    ARGV = sys.argv[1:]
    if any(flag in ARGV for flag in UPSTREAM_FLAGS):
        from mindformers_ext.convert.cli import upstream_main
        sys.exit(upstream_main(ARGV, prog="tools/convert_weight.py --upstream"))
    if "-h" in ARGV or "--help" in ARGV:
        try:
            main(ARGV)
        except SystemExit:
            print(UPSTREAM_HELP)
            raise
    sys.exit(main())
