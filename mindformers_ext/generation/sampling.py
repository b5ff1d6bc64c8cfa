"""Next-token choice from float32 logits (batch, vocab): greedy, or sampling after HF's warpers.

Order as HF's ``generate``: repetition penalty, then temperature, top-k, top-p, then softmax and a
draw from a seeded NumPy generator (reproducible for a given seed). The server's OpenAI settings
(``generate`` has none, as HF's) go where vLLM's sampler puts them: ``logit_bias`` is added to the raw
logits first, the presence and frequency penalties come right after the repetition penalty.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What decides the next token; ``do_sample=False`` is greedy. Frozen: hashable, so the serving
    engine groups a step's rows by their settings."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0   # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated so far
    logit_bias: tuple = ()  # OpenAI's: (token id, bias) pairs added to the raw logits

    def validate(self) -> None:
        """Reject values HF also rejects, naming the field."""
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {dict(self.logit_bias)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


def apply_repetition_penalty(logits: np.ndarray, histories: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """HF's CTRL penalty: seen tokens' logits divided by ``penalty`` if positive, multiplied if negative."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, seen in enumerate(histories):
        ids = np.unique(np.asarray(seen, dtype=np.int64))
        vals = out[row, ids]
        out[row, ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def apply_presence_frequency_penalties(logits: np.ndarray, generated: Sequence[Sequence[int]], presence: float,
                                       frequency: float) -> np.ndarray:
    """OpenAI's penalties over each row's generated tokens (not its prompt, as vLLM):
    ``logit[j] -= frequency * count[j] + presence * (count[j] > 0)``."""
    if presence == 0 and frequency == 0:
        return logits
    out = logits.copy()
    for row, tokens in enumerate(generated):
        ids, counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)
        out[row, ids] -= np.float32(frequency) * counts.astype(np.float32) + np.float32(presence)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits per row (ties at the k-th value kept, as HF), the rest -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most probable tokens whose probability reaches ``p`` (HF's nucleus).

    Tokens tied with the least probable kept token are all kept (as top-k keeps ties): HF's unstable
    sort keeps an arbitrary subset of them, a subset of ours.
    """
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as HF
    sorted_logits = np.take_along_axis(logits, order, -1)
    probs = _softmax(sorted_logits)
    cumulative = np.cumsum(probs, axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # always keep the most probable token
    smallest_kept = np.min(np.where(remove_sorted, np.inf, sorted_logits), axis=-1, keepdims=True)
    return np.where(logits < smallest_kept, -np.inf, logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, params: SamplingParams, histories: Sequence[Sequence[int]],
                   generated: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """The scores the next token is chosen from (HF's ``scores``): float32 logits (batch, vocab) after
    the repetition penalty (over ``histories``: prompt and generated tokens), the presence and frequency
    penalties (over ``generated``, needed when either is set) and, when sampling, temperature, top-k
    and top-p (removed tokens -inf); ``params.logit_bias`` is added before all of them."""
    logits = logits.astype(np.float32)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[:, list(ids)] += np.asarray(biases, np.float32)
    logits = apply_repetition_penalty(logits, histories, params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        if generated is None:
            raise ValueError("presence_penalty / frequency_penalty need the generated tokens")
        logits = apply_presence_frequency_penalties(logits, generated, params.presence_penalty,
                                                    params.frequency_penalty)
    if not params.do_sample:
        return logits
    logits = logits / np.float32(params.temperature)
    return top_p_filter(top_k_filter(logits, params.top_k), params.top_p)


def draw(scores: np.ndarray, params: SamplingParams, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Next token id per row (int64, shape (batch,)) from :func:`process_logits`' scores: the argmax when
    greedy, else one draw per row from softmax(scores)."""
    if not params.do_sample:
        return np.argmax(scores, axis=-1)
    rng = rng if rng is not None else np.random.default_rng()
    probs = _softmax(scores.astype(np.float64))
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])

