"""WizardCoder (GPT-BigCode) weight conversion with the seed's flags; a thin wrapper of tools/convert_weight.py.

    python research/wizardcoder/convert_weight.py --torch_path WizardCoder-15B-V1.0 \
        --mindspore_path ckpt/wizardcoder_15b.ckpt
    python research/wizardcoder/convert_weight.py --reversed --mindspore_path ckpt/wizardcoder_15b.ckpt \
        --torch_path hf_out [--config WizardCoder-15B-V1.0/config.json]

``--torch_path``: the HF model directory (config.json + safetensors or ``pytorch_model.bin``), a
.safetensors file or index, or the ``pytorch_model.bin`` itself. HF's ``.bin`` state dicts are read by a
restricted unpickler (no code runs, no torch needed); other pickles need ``--allow_pickle``.
``--mindspore_path`` may be a directory, as in the seed's
``--torch_path ./ckpt --mindspore_path ./ckpt/rank_0``: the checkpoint is written there as
``wizardcoder.ckpt`` (the seed's file name). Unlike the seed it streams tensor by tensor
(never loading the model), splits the fused ``c_attn`` by the config's shapes instead of hard-coded
15B offsets (multi-query or not), keeps the LM head tied to the embedding, and goes back to HF
(``--reversed``; the config defaults to run_wizardcoder.yaml, WizardCoder-15B's shapes).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_CKPT_NAME = "wizardcoder.ckpt"  # the seed's --mindspore_path file name (a directory gets it inside)
try:
    from mindformers_ext.convert.cli import main as convert_main
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from mindformers_ext.convert.cli import main as convert_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch_path", required=True,
                        help="HF model directory or .safetensors (input; the output directory with --reversed)")
    parser.add_argument("--mindspore_path", default=SEED_CKPT_NAME,
                        help=f"MindSpore .ckpt (output; input with --reversed); a directory gets {SEED_CKPT_NAME} "
                             "in it")
    parser.add_argument("--layers", type=int, default=None,
                        help="accepted for the seed's command lines; the layer count comes from the config")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: keep)")
    parser.add_argument("--reversed", action="store_true", help="MindSpore checkpoint -> HF safetensors")
    parser.add_argument("--config", default=None,
                        help="HF config.json or our YAML (forward default: the HF directory's config.json; "
                             "--reversed default: run_wizardcoder.yaml)")
    parser.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                        help="accept arbitrary pickles (.pt / .pth, legacy torch files; read with "
                             "torch.load(weights_only=True)); pytorch_model.bin needs no flag")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    args = parser.parse_args(argv)
    src, dst = args.torch_path, args.mindspore_path
    config = args.config
    if args.reversed and config is None:
        config = os.path.join(HERE, "run_wizardcoder.yaml")
    forwarded = ["--model", "wizardcoder", "--input_path", dst if args.reversed else src,
                 "--output_path", src if args.reversed else dst]
    for flag, value in (("--dtype", args.dtype), ("--config", config)):
        if value:
            forwarded += [flag, value]
    forwarded += (["--reversed"] * args.reversed + ["--allow-pickle"] * args.allow_pickle
                  + ["--no_progress"] * args.no_progress + ["--overwrite"] * args.overwrite)
    return convert_main(forwarded, prog="research/wizardcoder/convert_weight.py", default_name=SEED_CKPT_NAME)


if __name__ == "__main__":
    sys.exit(main())
