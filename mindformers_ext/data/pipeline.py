"""Instruction data -> MindRecord, shared by the DeepSeek-Coder and WizardCoder preprocess scripts.

See :mod:`mindformers_ext.data.sft` for the sample layout (``seq_length + 1`` aligned
``input_ids`` / ``labels``) and :mod:`mindformers_ext.data.records` for the accepted inputs.
"""
import argparse
import glob
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

from tqdm import tqdm

from mindformers_ext.interrupts import Interrupted

from .mindrecord_io import AtomicMindRecordWriter
from .records import InstructionRecord, read_records
from .sft import PreprocessStats, SFTEncoder
from .templates import PromptTemplate

__all__ = ["expand_inputs", "preprocess_to_mindrecord", "add_common_arguments", "run_cli", "cli_exit"]

_BATCH = 1024  # records tokenised (one batch on the tokenizer's backend) and written per MindRecord call


def _read_all(input_files: Sequence[str], bar: tqdm) -> Iterator[InstructionRecord]:
    for path in input_files:
        bar.set_postfix_str(os.path.basename(path))
        yield from read_records(path)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while True:
        chunk = list(islice(iterator, size))
        if not chunk:
            return
        yield chunk


def expand_inputs(input_glob: str) -> List[str]:
    """Files matching ``input_glob`` (a path, a glob, or several separated by commas), sorted."""
    files: List[str] = []
    for pattern in (p.strip() for p in str(input_glob).split(",")):
        if not pattern:
            continue
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"--input_glob {pattern!r} matches no file")
        files.extend(m for m in matches if m not in files)
    if not files:
        raise FileNotFoundError(f"--input_glob {input_glob!r} names no file")
    return files


def preprocess_to_mindrecord(input_files: Sequence[str], output_file: str, tokenizer, template: PromptTemplate,
                             seq_length: int, pad_token_id: int, drop_long: bool = False, overwrite: bool = False,
                             shard_num: int = 1, progress: Optional[bool] = None,
                             desc: Optional[str] = None) -> PreprocessStats:
    """Read, tokenise, mask and write; all or nothing (a failure leaves no output).

    Args:
        input_files: JSON / JSON Lines files (detected by content).
        output_file: MindRecord path (plus ``.db``).
        tokenizer: tokenizer used for prompt and target.
        template: prompt template (its end token must be one token of ``tokenizer``).
        seq_length: the model's sequence length; samples hold ``seq_length + 1`` tokens.
        pad_token_id: padding id of ``input_ids`` (labels are padded with -100).
        drop_long: drop samples longer than ``seq_length + 1`` instead of truncating them.
        overwrite: replace an existing output.
        shard_num: MindRecord shard count.
        progress: show a tqdm bar (None: only on a terminal).
        desc: schema description stored in the MindRecord (default ``sft-<template>``).

    Returns:
        The counts (records / written / truncated / dropped).
    """
    encoder = SFTEncoder(tokenizer, template, seq_length, pad_token_id, drop_long)
    encoder.check_fits()
    stats = PreprocessStats(files=list(input_files))
    writer = AtomicMindRecordWriter(output_file, shard_num=shard_num, overwrite=overwrite,
                                    desc=desc or f"sft-{template.name}")
    writer.check_output()
    disable = (not sys.stderr.isatty()) if progress is None else not progress

    def write(encoded: Future):
        input_ids, labels, statuses = encoded.result()
        for status in statuses:
            stats.add(status)
        writer.write([{"input_ids": ids, "labels": lab} for ids, lab in zip(input_ids, labels)])
        bar.update(len(statuses))

    # One chunk is tokenised (Rust, without the GIL) in a worker thread while the previous one is written.
    with writer, tqdm(desc="preprocess", unit=" records", disable=disable) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for records in _chunks(_read_all(input_files, bar), _BATCH):
            encoded = pool.submit(encoder.encode_many, records)
            if pending is not None:
                write(pending)
            pending = encoded
        if pending is not None:
            write(pending)
        if stats.written == 0:
            raise ValueError(nothing_written(stats, output_file, seq_length))
    return stats


def nothing_written(stats: PreprocessStats, output_file: str, seq_length: int) -> str:
    """Why no sample was written, for the error message."""
    if stats.records == 0:
        return f"no samples to write to {output_file}: the input files hold no records ({', '.join(stats.files)})"
    reasons = []
    if stats.dropped_no_target:
        reasons.append(f"{stats.dropped_no_target} had a prompt that fills seq_length + 1 = {seq_length + 1} tokens "
                       "(no room for the answer: raise --seq_length)")
    if stats.dropped_long:
        reasons.append(f"{stats.dropped_long} were longer than seq_length + 1 = {seq_length + 1} tokens and "
                       "--drop_long is set")
    return (f"no samples to write to {output_file}: all {stats.records} records were dropped: "
            + "; ".join(reasons))


def add_common_arguments(parser: argparse.ArgumentParser, default_pad: Optional[int]) -> argparse.ArgumentParser:
    """Arguments both preprocess CLIs share (model-specific ones are added by the scripts)."""
    parser.add_argument("--input_glob", required=True,
                        help="input JSON list / JSON Lines file(s): a path or glob, comma-separated for several")
    parser.add_argument("--output_file", required=True, help="output MindRecord file (a .db index is written too)")
    parser.add_argument("--seq_length", type=int, required=True,
                        help="the model's seq_length; records hold seq_length + 1 tokens (MindFormers shifts them)")
    pad_help = "the template's end token" if default_pad is None else default_pad
    parser.add_argument("--pad_token_id", type=int, default=default_pad,
                        help=f"padding id for input_ids (default: {pad_help}); labels are padded with -100")
    parser.add_argument("--drop_long", action="store_true",
                        help="drop samples longer than seq_length + 1 (default: truncate them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--file_partition", type=int, default=1, help="number of MindRecord shards")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run_cli(args: argparse.Namespace, tokenizer, template: PromptTemplate) -> PreprocessStats:
    """Run a parsed CLI: expand inputs, preprocess, print the report."""
    files = expand_inputs(args.input_glob)
    pad = args.pad_token_id
    if pad is None:
        pad = tokenizer.convert_tokens_to_ids(template.end_token)
    stats = preprocess_to_mindrecord(files, args.output_file, tokenizer, template, args.seq_length, pad,
                                     drop_long=args.drop_long, overwrite=args.overwrite,
                                     shard_num=args.file_partition, progress=False if args.no_progress else None,
                                     desc=getattr(args, "mindrecord_schema", None))
    print(f"{args.output_file}: {stats.summary()}; {len(files)} input file(s), template {template.name}, "
          f"{args.seq_length + 1} tokens per record, pad id {pad}")
    return stats


def cli_exit(main: Callable[[], object]) -> int:
    """Run a CLI ``main``; report data, file and argument errors as one line instead of a traceback."""
    try:
        main()
    except Interrupted as exc:
        print(f"error: {exc}; nothing was written (the temporary output was removed)", file=sys.stderr)
        return exc.code
    except (OSError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0
