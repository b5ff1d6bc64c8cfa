"""DeepSeek-V2 / V2-Lite weight conversion with the seed's flags; a thin wrapper of tools/convert_weight.py.

    python research/deepseek2/convert_weight.py --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT.ckpt
    python research/deepseek2/convert_weight.py --reversed --mindspore_ckpt_path OUT.ckpt \
        --torch_ckpt_path HF_OUT --config HF_DIR/config.json
    python research/deepseek2/convert_weight.py --pre_ckpt_path UPSTREAM.ckpt --mindspore_ckpt_path OUT.ckpt

Unlike the seed it streams tensor by tensor (the seed loaded the whole HF model: ~470 GB of RAM for
236B), stacks each layer's routed experts by their index in the tensor names (not by counting
parameters in order), permutes the RoPE rows of q_b_proj / kv_a_proj_with_mqa from DeepSeek's
interleaved layout to our rotate-half one, and converts back to HF safetensors with --reversed.

Upstream MindFormers' (v1.3.2 - v1.5.0) spellings of this script:

* ``--num_routed_experts N``: checked against the config's ``n_routed_experts`` (or the stacked experts
  of ``--pre_ckpt_path``); the experts are counted from the tensor names, so a different N is refused.
* ``--pre_ckpt_path CKPT --mindspore_ckpt_path OUT``: upstream's second pass over a checkpoint its own
  converter wrote; here it migrates that upstream checkpoint to our layout (as
  ``tools/convert_weight.py --model deepseek2 --upstream``). A folder of ``rank_N/`` sub-folders is
  migrated rank by rank into ``OUT/rank_N/``.
* ``--use_gmm`` (the stacked experts transposed for grouped matmul) and the MLA split (the positional
  flag with ``--n_head`` / ``--qk_nope_head_dim`` / ``--qk_rope_head_dim`` / ``--v_head_dim``) write
  layouts our model does not use: refused with what to run instead (checkpoints upstream already wrote
  that way load as they are). A positional ``False`` (v1.5.0 required one) is accepted.
"""
import argparse
import os
import sys
from typing import List, Optional, Sequence

try:
    from mindformers_ext.convert.cli import seed_main
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from mindformers_ext.convert.cli import seed_main

PROG = "research/deepseek2/convert_weight.py"
# the seed CLI's flags that take a value (forwarded as given)
SEED_VALUE_FLAGS = ("--torch_ckpt_path", "--mindspore_ckpt_path", "--input_path", "--output_path", "--model",
                    "--dtype", "--config")
MLA_FLAGS = ("--n_head", "--qk_nope_head_dim", "--qk_rope_head_dim", "--v_head_dim")
FALSE_WORDS = ("false", "0", "no", "")
INSTEAD = ("our DeepSeek-V2 loads the stacked experts as (E, out, in) and l2q_proj / kv2l / lkv2kv whole; "
           "convert with `python research/deepseek2/convert_weight.py --torch_ckpt_path HF_DIR "
           "--mindspore_ckpt_path OUT.ckpt`, or load a checkpoint upstream already wrote this way as it is "
           "(run_mindformer.py --load_checkpoint maps it; `python tools/convert_weight.py --model deepseek2 "
           "--upstream --input_path UP.ckpt --output_path OURS.ckpt` migrates it once)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    for flag in SEED_VALUE_FLAGS + MLA_FLAGS:
        parser.add_argument(flag, default=None)
    parser.add_argument("--num_routed_experts", type=int, default=None)
    parser.add_argument("--use_gmm", action="store_true")
    parser.add_argument("--pre_ckpt_path", default=None)
    parser.add_argument("mla_weight_split_flag", nargs="?", default=None)
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _experts_in_config(args: argparse.Namespace) -> tuple:
    """(n_routed_experts, where it was read) from --config or the HF directory's config.json."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.convert.weight_map import get_weight_map, load_config

    where = args.config or args.torch_ckpt_path or args.input_path
    if where and not args.config and os.path.isfile(where):
        where = os.path.dirname(where) or "."
    if not where:
        raise ValueError("--num_routed_experts: give the HF directory (--torch_ckpt_path) or --config to check it")
    return load_config(where, get_weight_map("deepseek2")).get("n_routed_experts"), where


def _experts_in_checkpoint(path: str) -> tuple:
    """(number of stacked routed experts, file) of an upstream checkpoint (first MoE layer's w1)."""
    from mindformers_ext.convert import read_ckpt_index  # pylint: disable=import-outside-toplevel

    files = _rank_files(path) if os.path.isdir(path) else [path]
    for entry in read_ckpt_index(files[0]):
        if entry.name.endswith(".feed_forward.routed_experts.ffn.w1.weight"):
            return entry.shape[0], files[0]
    return None, files[0]


def _rank_files(folder: str) -> List[str]:
    """``rank_N/*.ckpt`` of a distributed save, one file per rank (the only .ckpt in each)."""
    files = []
    ranks = sorted((d for d in os.listdir(folder) if d.startswith("rank_") and d[5:].isdigit()),
                   key=lambda d: int(d[5:]))
    if not ranks:
        raise ValueError(f"--pre_ckpt_path {folder}: a folder without rank_N/ sub-folders; pass the .ckpt file")
    for rank in ranks:
        ckpts = sorted(f for f in os.listdir(os.path.join(folder, rank)) if f.endswith(".ckpt"))
        if len(ckpts) != 1:
            raise ValueError(f"--pre_ckpt_path {os.path.join(folder, rank)}: expected one .ckpt, found "
                             f"{len(ckpts)} ({', '.join(ckpts) or 'none'})")
        files.append(os.path.join(folder, rank, ckpts[0]))
    return files


def _migrate(args: argparse.Namespace, passthrough: Sequence[str]) -> int:
    """--pre_ckpt_path: migrate upstream's checkpoint (or each rank's) to our layout."""
    from mindformers_ext.convert.cli import upstream_main  # pylint: disable=import-outside-toplevel

    if args.torch_ckpt_path or args.input_path or args.output_path:
        return _fail("--pre_ckpt_path reads an upstream MindSpore checkpoint and writes --mindspore_ckpt_path; "
                     "do not combine it with --torch_ckpt_path / --input_path / --output_path")
    if not args.mindspore_ckpt_path:
        return _fail("--pre_ckpt_path needs --mindspore_ckpt_path (the migrated checkpoint to write)")
    unknown = [a for a in passthrough if a not in ("--overwrite", "--no_progress")]
    if unknown:
        return _fail(f"--pre_ckpt_path: {' '.join(unknown)} not supported with it (only --config, --dtype, "
                     "--num_routed_experts, --overwrite)")
    extra = [f for flag, value in (("--config", args.config), ("--dtype", args.dtype)) if value
             for f in (flag, value)] + list(passthrough)
    if not os.path.isdir(args.pre_ckpt_path):
        return upstream_main(["--model", "deepseek2", "--upstream", "--input_path", args.pre_ckpt_path,
                              "--output_path", args.mindspore_ckpt_path] + extra, prog=PROG)
    for file in _rank_files(args.pre_ckpt_path):
        rank = os.path.basename(os.path.dirname(file))
        out_dir = os.path.join(args.mindspore_ckpt_path, rank)
        os.makedirs(out_dir, exist_ok=True)
        code = upstream_main(["--model", "deepseek2", "--upstream", "--input_path", file, "--output_path",
                              os.path.join(out_dir, os.path.basename(file))] + extra, prog=PROG)
        if code:
            return code
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Upstream's flags checked or refused, then the seed CLI (tools/convert_weight.py --model deepseek2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return seed_main("deepseek2", PROG, __doc__.split("\n")[0], argv)
    args, passthrough = _parser().parse_known_args(argv)
    split = args.mla_weight_split_flag
    if split is not None and split.strip().lower() not in FALSE_WORDS:
        return _fail(f"positional {split!r}: upstream's MLA weight split (l2q_nope_proj / l2q_pe_proj, "
                     f"kv2l_latent_kv / kv2l_k_pe, lkv2kv_k_nope / lkv2kv_v) is not needed: {INSTEAD}")
    mla = [f for f in MLA_FLAGS if getattr(args, f[2:]) is not None]
    if mla:
        return _fail(f"{', '.join(mla)}: only used by upstream's MLA weight split; the head sizes come from the "
                     f"config here: drop them ({INSTEAD})")
    if args.use_gmm:
        return _fail(f"--use_gmm: upstream's grouped-matmul expert layout (E, in, out) is not ours: {INSTEAD}")
    if args.num_routed_experts is not None:
        try:
            if args.pre_ckpt_path:
                found, where = _experts_in_checkpoint(args.pre_ckpt_path)
            else:
                found, where = _experts_in_config(args)
        except (OSError, ValueError) as exc:  # ConversionError is a ValueError
            return _fail(str(exc))
        if found != args.num_routed_experts:
            return _fail(f"--num_routed_experts {args.num_routed_experts}: {where} has {found} routed experts; "
                         "the experts are counted from the checkpoint here, drop the flag or fix the path")
    if args.pre_ckpt_path:
        try:
            return _migrate(args, passthrough)
        except (OSError, ValueError) as exc:
            return _fail(str(exc))
    forwarded = [f for flag in SEED_VALUE_FLAGS if getattr(args, flag[2:]) is not None
                 for f in (flag, getattr(args, flag[2:]))] + list(passthrough)
    return seed_main("deepseek2", PROG, __doc__.split("\n")[0], forwarded)


if __name__ == "__main__":
    sys.exit(main())
