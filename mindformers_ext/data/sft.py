"""Tokenising and masking supervised fine-tuning samples.

Convention (the one MindFormers' causal LMs use in training; checked in MindFormers 1.9
``LlamaForCausalLM.construct``): a sample holds ``input_ids`` and ``labels`` of length
``seq_length + 1``, *aligned* (not shifted). The model feeds ``input_ids[:, :-1]`` (``seq_length``
tokens) and scores them against ``labels[:, 1:]``, so ``labels[i]`` is the target for the model's
prediction made at position ``i - 1``. Here:

* ``labels[i] = input_ids[i]`` for target tokens (the response and its end-of-turn token),
* ``labels[i] = -100`` (``IGNORE_INDEX``, MindFormers' ``ignore_token_id``) over the prompt and
  the padding,
* ``input_ids`` is padded on the right with ``pad_token_id`` up to ``seq_length + 1``.

Masking is by position, never by id: a pad id equal to the end-of-turn id (DeepSeek's upstream
recipe pads with ``<|EOT|>``) leaves the real end token learnable. MindFormers' Llama also zeroes
the loss where the *input* token equals the model's ``pad_token_id``; that only hits the
prediction made after the end token (already ignored), so the two conventions agree.

Prompt and target are tokenised separately (prompt with the tokenizer's special tokens, e.g.
DeepSeek's BOS; target without), then concatenated: the prompt's tokens are exactly what the model
sees at inference, where the prompt is encoded alone. Samples longer than ``seq_length + 1`` are
cut on the right (target tokens lost, end token included) or dropped (``drop_long``); a sample
whose prompt alone fills the window has nothing to learn and is always dropped.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .records import InstructionRecord
from .templates import PromptTemplate

__all__ = ["IGNORE_INDEX", "SFTSample", "PreprocessStats", "SFTEncoder", "build_sample", "encode_prefix"]

IGNORE_INDEX = -100

OK, TRUNCATED, DROPPED_LONG, DROPPED_NO_TARGET = "ok", "truncated", "dropped_long", "dropped_no_target"

# encode_prefix: first try this many characters per needed token (code and prose: 3 - 4 per token)
_CHARS_PER_TOKEN = 8
# tokens dropped from the end of an encoded prefix: the cut can change the tokens just before it
_BOUNDARY_SLACK = 64


def encode_prefix(tokenizer, text: str, need: int, add_special_tokens: bool) -> Tuple[List[int], bool]:
    """The leading tokens of ``tokenizer.encode(text)``, without tokenising all of a huge text.

    Returns ``(ids, complete)``: every token of ``text`` (``complete``), or at least ``need`` tokens
    equal to the first ones of the whole encoding (then the text has more than ``need`` tokens).
    Encodes a prefix of ``(need + slack) * 8`` characters, growing it 4x while it yields too few
    tokens, and drops the last ``slack`` (64) tokens, which the cut may have changed. Memory and time
    follow ``need``, not ``len(text)`` (a 48 MB record kept to 4K tokens reads ~40 KB of it).
    """
    chars = (need + _BOUNDARY_SLACK) * _CHARS_PER_TOKEN
    while True:
        if len(text) <= chars:
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens)), True
        ids = list(tokenizer.encode(text[:chars], add_special_tokens=add_special_tokens))
        if len(ids) >= need + _BOUNDARY_SLACK:
            return ids[:len(ids) - _BOUNDARY_SLACK], False
        chars *= 4


@dataclass
class SFTSample:
    """One training sample (arrays of length ``seq_length + 1``)."""
    input_ids: np.ndarray
    labels: np.ndarray

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class PreprocessStats:
    """Counts reported at the end of a preprocessing run."""
    records: int = 0
    written: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_no_target: int = 0
    files: List[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_long + self.dropped_no_target

    def add(self, status: str):
        self.records += 1
        if status in (OK, TRUNCATED):
            self.written += 1
        if status == TRUNCATED:
            self.truncated += 1
        elif status == DROPPED_LONG:
            self.dropped_long += 1
        elif status == DROPPED_NO_TARGET:
            self.dropped_no_target += 1

    def summary(self) -> str:
        return (f"records {self.records}: written {self.written} (truncated {self.truncated}), "
                f"dropped {self.dropped} (too long: {self.dropped_long}, "
                f"prompt fills seq_length: {self.dropped_no_target})")


def build_sample(prompt_ids: List[int], target_ids: List[int], seq_length: int, pad_token_id: int,
                 drop_long: bool = False) -> Tuple[Optional[SFTSample], str]:
    """Concatenate, mask, cut and pad one sample to ``seq_length + 1`` tokens.

    Returns ``(sample, status)``; ``sample`` is None when dropped. ``status`` is one of
    ``"ok"``, ``"truncated"``, ``"dropped_long"``, ``"dropped_no_target"``.
    """
    length = seq_length + 1
    ids = list(prompt_ids) + list(target_ids)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)
    status = OK
    if len(ids) > length:
        if drop_long:
            return None, DROPPED_LONG
        ids, labels = ids[:length], labels[:length]
        status = TRUNCATED
    # labels[0] is never scored (the model uses labels[:, 1:]), so it does not count.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, DROPPED_NO_TARGET
    pad = length - len(ids)
    input_ids = np.array(ids + [pad_token_id] * pad, dtype=np.int32)
    label_arr = np.array(labels + [IGNORE_INDEX] * pad, dtype=np.int32)
    return SFTSample(input_ids, label_arr), status


class SFTEncoder:
    """Turns records into samples with one tokenizer and one template.

    Args:
        tokenizer: a MindFormers / Hugging Face tokenizer (``encode``, ``convert_tokens_to_ids``).
        template: the prompt template; its ``end_token`` must be a single token of ``tokenizer``.
        seq_length: the model's sequence length (samples hold ``seq_length + 1`` tokens).
        pad_token_id: id written into the padding of ``input_ids``.
        drop_long: drop over-long samples instead of cutting them.
    """

    def __init__(self, tokenizer, template: PromptTemplate, seq_length: int, pad_token_id: int,
                 drop_long: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.tokenizer = tokenizer
        self.template = template
        self.seq_length = int(seq_length)
        self.pad_token_id = int(pad_token_id)
        self.drop_long = drop_long
        self.end_token_id = self._token_id(template.end_token)

    def _token_id(self, token: str) -> int:
        index = self.tokenizer.convert_tokens_to_ids(token)
        if index is None or self.tokenizer.convert_ids_to_tokens(index) != token:
            raise ValueError(f"template {self.template.name!r}: end token {token!r} is not a single token of "
                             f"{type(self.tokenizer).__name__}")
        return int(index)

    def tokenize(self, record: InstructionRecord) -> Tuple[List[int], List[int]]:
        """Prompt ids (with the tokenizer's special tokens, e.g. BOS) and target ids (+ end token)."""
        prompt = self.template.render_prompt(record.instruction, record.input)
        target = self.template.render_target(record.output)
        prompt_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        target_ids = list(self.tokenizer.encode(target, add_special_tokens=False)) if target else []
        return prompt_ids, target_ids + [self.end_token_id]

    def tokenize_kept(self, record: InstructionRecord) -> Tuple[List[int], List[int]]:
        """Like :meth:`tokenize`, but only as far as a sample can keep (see :func:`encode_prefix`): the
        sample and status :func:`build_sample` makes of it are the same, memory stays bounded."""
        length = self.seq_length + 1
        prompt = self.template.render_prompt(record.instruction, record.input)
        prompt_ids, complete = encode_prefix(self.tokenizer, prompt, length + 1, True)
        del prompt
        if not complete or len(prompt_ids) >= length:  # the prompt fills the window: no target is kept
            return prompt_ids, [self.end_token_id]
        target = self.template.render_target(record.output)
        target_ids = encode_prefix(self.tokenizer, target, length - len(prompt_ids) + 1, False)[0] if target else []
        return prompt_ids, target_ids + [self.end_token_id]

    def encode(self, record: InstructionRecord) -> Tuple[Optional[SFTSample], str]:
        """Sample and status for one record (see :func:`build_sample`)."""
        prompt_ids, target_ids = self.tokenize_kept(record)
        return build_sample(prompt_ids, target_ids, self.seq_length, self.pad_token_id, self.drop_long)

    def min_prompt_tokens(self) -> int:
        """Tokens of the template's prompt with an empty instruction (special tokens included)."""
        prompt = self.template.render_prompt("", "")
        return len(self.tokenizer.encode(prompt, add_special_tokens=True))

    def check_fits(self) -> None:
        """Fail when ``seq_length`` leaves no room for a target token after the template's own prompt."""
        prompt = self.min_prompt_tokens()
        if self.seq_length < prompt:
            raise ValueError(f"--seq_length {self.seq_length} is too small for template {self.template.name!r}: "
                             f"its prompt alone (with an empty instruction) takes {prompt} tokens, so no sample of "
                             f"seq_length + 1 = {self.seq_length + 1} tokens can hold a target token and nothing "
                             f"would be written; use --seq_length {prompt} at the very least (room for the "
                             "instruction and the answer: much more)")
