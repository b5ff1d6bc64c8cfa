"""WikiText (raw ``wiki.train.tokens``) -> MindRecord for pretraining: ``--dataset_type wiki``.

Upstream MindFormers' ``deepseek_preprocess_1_5.py`` (v1.3.2 - v1.5.0) had this mode; the layout
here is the same: the file is detokenised (WikiText's `` @-@ `` / `` @,@ `` / `` @.@ `` number
separators, spaces before punctuation and inside brackets and quotes, ``= = =`` headings), split into
paragraphs at blank lines, headings (paragraphs starting with ``=``) skipped, each paragraph encoded
as BOS + text + the end token, and the token stream (repeated ``repeat`` times) cut into samples of
``seq_length + 1`` tokens; a shorter tail is dropped. Each record holds ``input_ids`` and ``labels``
(the same tokens: every one is learned), so the finetune YAMLs' ``input_columns`` read it unchanged
(upstream wrote ``input_ids`` only).
"""
import re
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from .mindrecord_io import AtomicMindRecordWriter

__all__ = ["detokenize_wikitext", "wiki_paragraphs", "wiki_samples", "wiki_to_mindrecord"]

# plain replacements, in order (WikiText tokenisation -> text)
_REPLACE: Tuple[Tuple[str, str], ...] = (
    ("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
)
# spaces just inside brackets and quotes
_BRACKETS: Tuple[Tuple[str, str], ...] = (
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'"),
)
_AFTER: Tuple[Tuple[str, str], ...] = (
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "), (" 's", "'s"),
)


def detokenize_wikitext(text: str) -> str:
    """WikiText's tokenised text back to plain text (the rules upstream applied)."""
    for old, new in _REPLACE:
        text = text.replace(old, new)
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for pattern, repl in _BRACKETS:
        text = re.sub(pattern, repl, text)
    for old, new in _AFTER:
        text = text.replace(old, new)
    return text


def wiki_paragraphs(text: str) -> Iterator[str]:
    """The paragraphs of a detokenised WikiText file that are not headings."""
    for para in text.split("\n\n"):
        if para and not para.strip().startswith("="):
            yield para


def wiki_samples(paths: Sequence[str], tokenizer, end_token_id: int, seq_length: int,
                 repeat: int = 1) -> Iterator[np.ndarray]:
    """int32 samples of ``seq_length + 1`` tokens from the WikiText files ``paths`` (see the module)."""
    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    stream: List[int] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = detokenize_wikitext(f.read())
        for para in wiki_paragraphs(text):
            stream += list(tokenizer.encode(para, add_special_tokens=True)) + [end_token_id]
    stream *= repeat
    size = seq_length + 1
    for start in range(0, len(stream) - size + 1, size):
        yield np.asarray(stream[start:start + size], dtype=np.int32)


def wiki_to_mindrecord(paths: Sequence[str], output_file: str, tokenizer, end_token_id: int, seq_length: int,
                       repeat: int = 1, overwrite: bool = False, shard_num: int = 1) -> int:
    """Write the samples of :func:`wiki_samples` (``input_ids`` = ``labels``); returns how many.
    All or nothing: an error (or no complete sample) leaves no output."""
    writer = AtomicMindRecordWriter(output_file, shard_num=shard_num, overwrite=overwrite, desc="wiki")
    writer.check_output()
    with writer:
        batch = []
        for sample in wiki_samples(paths, tokenizer, end_token_id, seq_length, repeat):
            batch.append({"input_ids": sample, "labels": sample.copy()})
            if len(batch) >= 256:
                writer.write(batch)
                batch = []
        writer.write(batch)
        if writer.count == 0:
            raise ValueError(f"no samples to write to {output_file}: {', '.join(paths)} hold fewer than "
                             f"seq_length + 1 = {seq_length + 1} tokens (after skipping headings)")
    return writer.count
