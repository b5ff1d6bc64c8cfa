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

The preprocess CLIs go through :meth:`SFTEncoder.encode_many`: a batch of records is tokenised in one
call on the tokenizer's Rust backend (``encode_batch_fast``, all cores) and packed, masked and padded
with numpy (:func:`pack_samples`), giving the samples :meth:`SFTEncoder.encode` gives one by one. For a
tokenizer whose pre-tokenizer isolates every newline first (DeepSeek's), text cut after a newline
encodes as its parts do: the prompt's constant head is encoded once and each distinct line once.
"""
import json
import os
from dataclasses import dataclass, field
from itertools import chain
from string import Formatter
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .records import InstructionRecord
from .templates import PromptTemplate

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["IGNORE_INDEX", "SFTSample", "PreprocessStats", "SFTEncoder", "build_sample", "pack_samples",
           "encode_prefix"]

IGNORE_INDEX = -100

OK, TRUNCATED, DROPPED_LONG, DROPPED_NO_TARGET = "ok", "truncated", "dropped_long", "dropped_no_target"
_STATUSES = (OK, TRUNCATED, DROPPED_LONG, DROPPED_NO_TARGET)  # pack_samples' status codes 0 - 3

# encode_prefix: first try this many characters per needed token (code and prose: 3 - 4 per token)
_CHARS_PER_TOKEN = 8
# tokens dropped from the end of an encoded prefix: the cut can change the tokens just before it
_BOUNDARY_SLACK = 64
# SFTEncoder's cache of encoded lines is trimmed to the current batch's lines past this many characters
_LINE_CACHE_CHARS = 2**24


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


def _plain_backend(tokenizer) -> Optional["Tokenizer"]:
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer when it encodes as ``tokenizer.encode`` does
    (no truncation or padding set on it), else None."""
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer) and backend.truncation is None and backend.padding is None:
        return backend
    return None


def _literal_head(fmt: str) -> str:
    """The literal text of a format string before its first field."""
    literal, _, _, _ = next(iter(Formatter().parse(fmt)), ("", None, None, None))
    return literal


def _isolates_newlines(backend: "Tokenizer") -> bool:
    """Whether text cut just after a newline encodes as its two parts do (see ``SFTEncoder._prompt_head``)."""
    if backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    state = json.loads(backend.pre_tokenizer.__getstate__())
    first = (state.get("pretokenizers") or [None])[0] if state.get("type") == "Sequence" else state
    if first != {"type": "Split", "pattern": {"Regex": "[\r\n]"}, "behavior": "Isolated", "invert": False}:
        return False
    return not any(t.lstrip or t.rstrip or "\n" in t.content or "\r" in t.content
                   for t in backend.get_added_tokens_decoder().values())


@dataclass
class SFTSample:
    """One training sample (arrays of length ``seq_length + 1``)."""
    input_ids: np.ndarray
    labels: np.ndarray


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


def pack_samples(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], seq_length: int,
                 pad_token_id: int, drop_long: bool = False) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Concatenate, mask, cut and pad many samples at once (the rules of :func:`build_sample`).

    Returns ``(input_ids, labels, statuses)``: int32 arrays of shape ``(kept, seq_length + 1)`` holding
    the written samples in order, and one status per input (``"ok"``, ``"truncated"``,
    ``"dropped_long"``, ``"dropped_no_target"``); rows exist for ``"ok"`` and ``"truncated"`` only.
    """
    length = seq_length + 1
    count = len(prompts)
    if len(targets) != count:
        raise ValueError(f"pack_samples: {count} prompts but {len(targets)} targets")
    prompt_len = np.fromiter(map(len, prompts), np.int64, count)
    total = prompt_len + np.fromiter(map(len, targets), np.int64, count)
    over = total > length
    # labels[0] is never scored (the model uses labels[:, 1:]): a target needs a position in [1, length)
    no_target = np.maximum(prompt_len, 1) >= np.minimum(total, length)
    codes = np.where(over & drop_long, 2, np.where(no_target, 3, over.astype(np.int64)))
    statuses = [_STATUSES[c] for c in codes.tolist()]
    kept = np.flatnonzero(codes < 2)
    input_ids = np.full((len(kept), length), pad_token_id, np.int32)
    labels = np.full((len(kept), length), IGNORE_INDEX, np.int32)
    sizes = total[kept]
    flat = np.fromiter(chain.from_iterable(chain(prompts[i], targets[i]) for i in kept.tolist()), np.int32,
                       int(sizes.sum()))
    rows = np.repeat(np.arange(len(kept)), sizes)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    inside = cols < length  # cut on the right
    rows, cols, flat = rows[inside], cols[inside], flat[inside]
    input_ids[rows, cols] = flat
    learned = cols >= prompt_len[kept][rows]  # masked by position: the prompt stays -100
    labels[rows[learned], cols[learned]] = flat[learned]
    return input_ids, labels, statuses


def build_sample(prompt_ids: List[int], target_ids: List[int], seq_length: int, pad_token_id: int,
                 drop_long: bool = False) -> Tuple[Optional[SFTSample], str]:
    """Concatenate, mask, cut and pad one sample to ``seq_length + 1`` tokens.

    Returns ``(sample, status)``; ``sample`` is None when dropped. ``status`` is one of
    ``"ok"``, ``"truncated"``, ``"dropped_long"``, ``"dropped_no_target"``.
    """
    input_ids, labels, (status,) = pack_samples([prompt_ids], [target_ids], seq_length, pad_token_id, drop_long)
    return (SFTSample(input_ids[0], labels[0]) if len(input_ids) else None), status


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
        self._backend = _plain_backend(tokenizer)
        self._newline_id = self._newline_token()
        self._line_ids: Dict[str, List[int]] = {}  # line -> ids, for a tokenizer that isolates newlines
        self._line_chars = 0
        self._head, self._head_ids = self._prompt_head()

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

    def _newline_token(self) -> Optional[int]:
        """The id of ``"\\n"`` when the backend isolates newlines and encodes one as one token, else None."""
        if self._backend is None or not _isolates_newlines(self._backend):
            return None
        ids = self._backend.encode("\n", add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 else None

    def _encode_batch(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        """Ids of each text. A tokenizer that isolates newlines (see :func:`_isolates_newlines`) encodes a
        text as its lines joined by the newline's id, so each distinct line is encoded once (code repeats
        lines: fences, ``else:``, ``return result``); the line cache is emptied past 16M characters."""
        if self._backend is None:
            return [list(self.tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
        if self._newline_id is None or add_special_tokens:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        split = [text.split("\n") for text in texts]
        new = [line for line in dict.fromkeys(chain.from_iterable(split)) if line not in self._line_ids]
        chars = sum(map(len, new))
        if self._line_chars + chars > _LINE_CACHE_CHARS:
            self._line_ids = {line: self._line_ids[line] for lines in split for line in lines if line in self._line_ids}
            self._line_chars = sum(map(len, self._line_ids))
        self._line_ids.update(zip(new, (e.ids for e in self._backend.encode_batch_fast(new, add_special_tokens=False))))
        self._line_chars += chars
        cache, newline, out = self._line_ids, self._newline_id, []
        for lines in split:
            ids = list(cache[lines[0]])
            for line in lines[1:]:
                ids.append(newline)
                ids += cache[line]
            out.append(ids)
        return out

    def _prompt_head(self) -> Tuple[str, List[int]]:
        """The constant start of every prompt, to encode once, and its ids (with the special tokens).

        Every prompt starts with the template's text before its first field. Cut after its last newline,
        that head can be encoded apart from the rest exactly when the tokenizer's pre-tokenizer isolates
        every newline first (DeepSeek's: ``Split([\\r\\n], Isolated)``, no normalizer), no added token holds a
        newline or strips whitespace around it, and the special tokens are only prepended. Otherwise
        (WizardCoder's byte-level regex joins a newline to following whitespace) the head is empty.
        """
        heads = [_literal_head(fmt) for fmt in (self.template.prompt_no_input, self.template.prompt_input)
                 if fmt is not None]
        head = os.path.commonprefix(heads)
        head = head[:head.rfind("\n") + 1]
        if not head or self._newline_id is None:
            return "", []
        with_special = self._backend.encode(head, add_special_tokens=True).ids
        plain = self._backend.encode(head, add_special_tokens=False).ids
        if with_special[len(with_special) - len(plain):] != plain:
            return "", []
        return head, with_special

    def encode_many(self, records: Sequence[InstructionRecord]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """Samples and statuses of many records, as :func:`pack_samples` returns them.

        The same samples as :meth:`encode` record by record: texts short enough that
        :func:`encode_prefix` would read them whole are encoded whole, in one batch on the tokenizer's
        Rust backend (all cores); longer ones go through :meth:`tokenize_kept` (memory bounded).
        """
        bound = (self.seq_length + 2 + _BOUNDARY_SLACK) * _CHARS_PER_TOKEN  # encode_prefix's first read
        prompts: List[Optional[List[int]]] = [None] * len(records)
        targets: List[Optional[List[int]]] = [None] * len(records)
        small, prompt_texts, target_texts = [], [], []
        for i, record in enumerate(records):
            prompt = self.template.render_prompt(record.instruction, record.input)
            target = self.template.render_target(record.output)
            if len(prompt) <= bound and len(target) <= bound:
                small.append(i)
                prompt_texts.append(prompt[len(self._head):])
                target_texts.append(target)
            else:
                del prompt, target
                prompts[i], targets[i] = self.tokenize_kept(record)
        if small:
            rests = self._encode_batch(prompt_texts, add_special_tokens=not self._head)
            answers = self._encode_batch(target_texts, add_special_tokens=False)
            for i, rest, answer in zip(small, rests, answers):
                prompts[i] = self._head_ids + rest
                answer.append(self.end_token_id)
                targets[i] = answer
        return pack_samples(prompts, targets, self.seq_length, self.pad_token_id, self.drop_long)

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
