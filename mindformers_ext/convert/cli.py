"""``convert_weight.py`` command lines: HF <-> MindSpore checkpoint (:func:`main`), the DeepSeek seeds' flags
(:func:`seed_main`) and the migration of upstream MindFormers checkpoints (:func:`upstream_main`).

Flags follow upstream MindFormers' ``convert_weight.py`` (``--model --input_path --output_path --dtype
--reversed``); upstream's ``fp32/fp16/bf16`` dtype spellings are accepted too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mindformers_ext.convert.engine import ConversionResult, convert
from mindformers_ext.convert.tensors import ConversionError, normalize_dtype
from mindformers_ext.convert.upstream import convert_upstream
from mindformers_ext.convert.weight_map import BUILTIN_MAPS, available_models
from mindformers_ext.interrupts import Interrupted
from mindformers_ext.quant import QUANT_METHODS
from mindformers_ext.runner.cli import str2bool

DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
SEED_CKPT_NAME = "transform.ckpt"  # the DeepSeek seeds' default --mindspore_ckpt_path


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Convert HF safetensors weights to a MindSpore checkpoint (or back with --reversed), "
                               "tensor by tensor.")
    parser.add_argument("--model", required=True, help=f"weight map: {', '.join(available_models())}")
    parser.add_argument("--input_path", required=True,
                        help="forward: HF model dir, .safetensors file or index; reversed: our .ckpt")
    parser.add_argument("--output_path", required=True,
                        help="forward: OUT.ckpt (or OUT.safetensors with our names), or a directory to write "
                             "<model>.ckpt into; reversed: HF output dir")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="convert float tensors (default: keep)")
    parser.add_argument("--reversed", action="store_true", help="MindSpore checkpoint -> HF safetensors")
    parser.add_argument("--config", default=None,
                        help="HF config.json or our YAML (model.model_config); forward default: the HF dir's "
                             "config.json; required with --reversed (becomes the output's config.json)")
    parser.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                        help="accept arbitrary pickles (.pt / .pth, legacy torch files; read with "
                             "torch.load(weights_only=True)); HF's .bin state dicts need no flag (restricted reader)")
    parser.add_argument("--max_shard_size", default="5GB", help="reversed: shard size of the HF output (5GB)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (default: refuse); the input itself is never replaced")
    parser.add_argument("--qkv_concat", type=str2bool, default=False, metavar="BOOL",
                        help="forward: write the checkpoint of a qkv_concat: True model (q/k/v as one w_qkv, "
                             "gate/up as one w_gate_hidden, upstream MindFormers' layout; Llama family); "
                             "reversed: such checkpoints are recognised without the flag")
    parser.add_argument("--quant", choices=QUANT_METHODS, default=None,
                        help="w8a16: store the linear layers' weights (MoE experts included; not the LM head, "
                             "embedding, norms, routers) as int8 with a float32 <name>_scale per output feature; "
                             "load with run_mindformer.py --quant w8a16")
    return parser


def output_file(output_path: str, reverse: bool, default_name: str) -> str:
    """Where a forward conversion writes: ``output_path``, or ``output_path/default_name`` for a directory
    (existing, or ending with a separator: the seeds write ``--mindspore_path ./ckpt/rank_0``)."""
    if reverse:
        return output_path
    if os.path.isdir(output_path) or output_path.endswith(("/", os.sep)):
        os.makedirs(output_path, exist_ok=True)
        return os.path.join(output_path, default_name)
    return output_path


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, default_name: Optional[str] = None) -> int:
    """Run the converter; ``default_name``: the file written inside a directory ``--output_path``
    (default ``<model>.ckpt``)."""
    args = build_parser(prog).parse_args(argv)
    if os.path.exists(args.output_path) and os.path.exists(args.input_path) and \
            os.path.samefile(args.output_path, args.input_path):
        print(f"error: {args.output_path}: the output path is the input path; write the conversion somewhere "
              "else", file=sys.stderr)
        return 1
    try:
        args.output_path = output_file(args.output_path, args.reversed, default_name or f"{args.model}.ckpt")
        result = convert(args.input_path, args.output_path, args.model, dtype=args.dtype,
                         progress=not args.no_progress, config=args.config, reverse=args.reversed,
                         max_shard_size=args.max_shard_size, allow_pickle=args.allow_pickle,
                         overwrite=args.overwrite, quant=args.quant, qkv_concat=args.qkv_concat)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"error: {exc}; the partial output was removed, {args.output_path} is unchanged", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return report(result, "converted")


def report(result: ConversionResult, verb: str) -> int:
    """Print what a conversion wrote (and skipped); exit code 0."""
    if result.skipped:
        print(f"skipped {len(result.skipped)} non-weight entries (e.g. {result.skipped[0][0]!r}: "
              f"{result.skipped[0][1]})", file=sys.stderr)
    print(f"{verb} {result.tensors} tensors ({result.bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s -> "
          + ", ".join(result.files))
    return 0


def seed_main(model: str, prog: str, description: str, argv: Optional[Sequence[str]] = None) -> int:
    """The DeepSeek seeds' ``convert_weight.py --torch_ckpt_path --mindspore_ckpt_path`` CLI, forwarded to
    :func:`main` with ``--model model`` (``--reversed`` swaps which path is read)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--torch_ckpt_path", help="HF model directory (input; output with --reversed)")
    parser.add_argument("--mindspore_ckpt_path", default=SEED_CKPT_NAME,
                        help=f"MindSpore .ckpt (output; input with --reversed); a directory gets {SEED_CKPT_NAME} in it")
    # upstream v1.5.0's spelling of the same script: --model deepseek1_5 --input_path IN --output_path OUT
    parser.add_argument("--input_path", help="what is read (the HF directory; the .ckpt with --reversed)")
    parser.add_argument("--output_path", help="what is written")
    parser.add_argument("--model", help=f"accepted for upstream's command line; must name this script's family "
                                        f"({model})")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: keep)")
    parser.add_argument("--reversed", action="store_true", help="MindSpore checkpoint -> HF safetensors")
    parser.add_argument("--config", default=None, help="HF config.json or our YAML")
    parser.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    parser.add_argument("--qkv_concat", type=str2bool, default=False, metavar="BOOL",
                        help="write the checkpoint of a qkv_concat: True model (fused w_qkv / w_gate_hidden)")
    args = parser.parse_args(argv)
    aliases = {"deepseek": ("deepseek", "deepseek1_5", "deepseek_coder", "llama"), "deepseek2": ("deepseek2",)}
    if args.model and args.model not in aliases.get(model, (model,)):
        parser.error(f"--model {args.model}: this script converts {model} checkpoints; for other models use "
                     f"tools/convert_weight.py --model MODEL")
    if args.input_path or args.output_path:
        if not (args.input_path and args.output_path) or args.torch_ckpt_path:
            parser.error("give --input_path and --output_path together (upstream's form), or --torch_ckpt_path "
                         "and --mindspore_ckpt_path (the seed's), not a mix")
        forwarded = ["--model", model, "--input_path", args.input_path, "--output_path", args.output_path]
    elif args.torch_ckpt_path:
        src, dst = args.torch_ckpt_path, args.mindspore_ckpt_path
        forwarded = ["--model", model, "--input_path", dst if args.reversed else src,
                     "--output_path", src if args.reversed else dst]
    else:
        parser.error("the following arguments are required: --torch_ckpt_path (or --input_path and --output_path)")
    for flag, value in (("--dtype", args.dtype), ("--config", args.config)):
        if value:
            forwarded += [flag, value]
    forwarded += ["--reversed"] * args.reversed + ["--allow-pickle"] * args.allow_pickle
    forwarded += ["--overwrite"] * args.overwrite + ["--qkv_concat", "True"] * args.qkv_concat
    return main(forwarded, prog=prog, default_name=SEED_CKPT_NAME)


def upstream_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``convert_weight.py --upstream``: migrate an upstream MindFormers checkpoint to our layout."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Migrate a checkpoint written by upstream MindFormers (v1.3.2 - v1.5.0 converters "
                               "or training) to this project's layout.")
    parser.add_argument("--model", required=True, help=f"one of {', '.join(sorted(BUILTIN_MAPS))}")
    parser.add_argument("--upstream", "--from_upstream", dest="upstream", action="store_true",
                        help="the input is an upstream MindFormers checkpoint (required; selects this converter)")
    parser.add_argument("--input_path", required=True, help="the upstream .ckpt (or .safetensors)")
    parser.add_argument("--output_path", required=True, help="OURS.ckpt or OURS.safetensors, or a directory")
    parser.add_argument("--config", default=None,
                        help="the model's YAML (upstream's or ours) or HF config.json; default: the released size "
                             "that the checkpoint's shapes fit")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: keep)")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    output = output_file(args.output_path, False, f"{args.model}.ckpt")
    try:
        result = convert_upstream(args.input_path, output, args.model, args.config, normalize_dtype(args.dtype),
                                  progress=not args.no_progress, overwrite=args.overwrite)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return report(result, "migrated")


if __name__ == "__main__":
    sys.exit(main())
