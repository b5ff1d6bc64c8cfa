"""Continuous batching over a paged KV cache: requests join and leave the running batch at every step.

One step (:meth:`Engine.step`): cancelled requests leave and free their blocks; waiting requests are
admitted in arrival order while the batch has room (``max_num_seqs``), the pool has blocks for their
prompt and ``max_tokens``, and the step's token budget (``max_num_batched_tokens``, one token per
running sequence plus each admitted prompt, padded to the longest) is not spent; the admitted
prompts are prefilled together (left-padded) and give their first tokens (requests that arrived
during that prefill are admitted and prefilled next, within the budget); then every other running
sequence decodes one token in one batched call. A sequence's tokens do not depend on its batch
mates: each row attends over its own tokens only (masked padding contributes exact zeros).

Decode batches are padded to bucketed shapes (batch 1, 2, 4, ... up to ``max_num_seqs``; attended
length 64, 256, 1024, ... up to the context), each compiled once as a static graph (by
:meth:`Engine.warmup`, or on first use): on CPU a static graph runs a step in about 60 % of the time
of the dynamic-shape one, which keeps the step that a newly arrived request waits for short. Prefills
of prompts up to 64 tokens are padded likewise (batch 1, 4, 16, ...; length 16, 64) where the padded
shape fits the token budget: the demo's prefill of one 11-token prompt took 1.9 ms in a static graph
against 3.3 ms in the dynamic-shape one that longer prompts take (16 prompts: 4.9 against 9.2 ms).

Results go out as :class:`Event` objects through the callback given to :meth:`Engine.submit`,
called from the engine's thread (``start`` runs :meth:`step` in a background thread; tests and
benches may call ``step`` themselves).
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
from mindspore import Tensor
from tokenizers import Tokenizer, decoders

from mindformers_ext.cache import PagedKVCache, left_pad
from mindformers_ext.generation.sampling import SamplingParams, draw, process_logits
from mindformers_ext.generation.step_cells import PagedStep


class EngineFull(RuntimeError):
    """The waiting queue is full (HTTP 503)."""


@dataclass
class GenerationRequest:
    """What to generate: the prompt's ids and the per-request sampling settings.

    ``stop``: strings that end the completion (not included in the text); ``stop_token_ids``: token
    ids that end it besides the engine's end tokens; ``logprobs``: how many top alternatives to report
    per token (None: no log-probabilities); ``ignore_eos``: the end tokens do not stop it (vLLM's
    option, for benchmarks of a fixed length).
    """
    prompt_ids: list
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: Optional[int] = None
    stop: tuple = ()
    stop_token_ids: tuple = ()
    logprobs: Optional[int] = None
    ignore_eos: bool = False


@dataclass
class Event:
    """Output of one step for one request: the new ``text`` (may be empty while an incomplete
    character or a possible stop string is held back), the new ``token_ids`` and, on the last event,
    ``finish_reason`` ("stop", "length", "cancelled", or "error" when the engine failed)."""
    request_id: str
    text: str
    token_ids: list
    finish_reason: Optional[str] = None
    logprobs: Optional[list] = None  # per new token: (token text, logprob, {alternative: logprob})
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Sequence:
    request_id: str
    request: GenerationRequest
    sink: Callable[[Event], None]
    rng: Optional[np.random.Generator]
    submitted: float
    detokenizer: Callable[[list], str]  # the text of ``generated``
    generated: list = field(default_factory=list)
    sent: str = ""          # text already sent
    first_token_at: Optional[float] = None


def _log_softmax(row: np.ndarray) -> np.ndarray:
    shifted = row.astype(np.float64) - row.max()
    return shifted - np.log(np.exp(shifted).sum())


class IncrementalDetokenizer:
    """The text of a growing list of token ids, as ``decode(ids)`` gives it, decoding only the ids since
    the last complete character (vLLM's incremental detokenizer) instead of the whole list at every new
    token: over a 2,000-token completion that took 94 us per token on average (0.2 ms at the end, 3.3 ms
    per step for 16 such requests), this takes 2.9 us.

    For byte-level BPE tokenizers (every family's here: DeepSeek-Coder, DeepSeek-V2, GPT-BigCode), whose
    decode is the ids' bytes as UTF-8, so that the text of a list is the text of its parts cut where a
    character ends; ``tests/test_serving.py`` checks it against the whole decode on random ids.
    """

    def __init__(self, decode: Callable[[list], str]) -> None:
        self.decode = decode
        self.text = ""  # the text of ids[:read]
        self.start = 0  # where the window decoded at each step begins (a character boundary)
        self.read = 0   # the ids whose text is in self.text

    def __call__(self, ids: list) -> str:
        """The text of ``ids`` (the same list as before, grown at its end)."""
        done = self.decode(ids[self.start:self.read])
        window = self.decode(ids[self.start:])
        if window.endswith("\ufffd"):  # an incomplete character: what follows may still change it
            return self.text + window[len(done):]
        self.text += window[len(done):]
        self.start, self.read = self.read, len(ids)
        return self.text


def _fast_backend(tokenizer: Any) -> Optional[Tokenizer]:
    """The ``tokenizers`` backend of a fast tokenizer that does not clean up spaces (None otherwise): its
    ``decode`` is the tokenizer's."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend
    return None


def _text_decoder(tokenizer: Any) -> Callable[[list], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, called for every new token of every request:
    for a fast tokenizer that does not clean up spaces, its ``tokenizers`` backend straight away
    (MindFormers' ``decode`` converts the ids element by element first, about 3x the decode's cost)."""
    backend = _fast_backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _round_up(sizes: list, n: int) -> int:
    """The first of the ascending ``sizes`` that is at least ``n``."""
    return next(size for size in sizes if size >= n)


def _buckets(first: int, factor: int, last: int) -> list:
    """``first, first * factor, ...`` below ``last``, then ``last``."""
    sizes = []
    while first < last:
        sizes.append(first)
        first *= factor
    return sizes + [last]


class Engine:
    """Serves one model: a :class:`PagedKVCache` pool shared by every request and the scheduler.

    Args:
        model: one of our causal LMs (``cache_spec()``, ``model``, ``logits``, ``config``).
        tokenizer: its tokenizer (``decode``), for stop strings and streamed text.
        num_blocks: blocks in the pool (default: room for ``max_num_seqs`` sequences of the full context).
        block_size: tokens per block.
        max_num_seqs: most sequences decoding at once.
        max_num_batched_tokens: token budget of one step (decode tokens plus admitted prompts); a prompt
            longer than the budget is admitted alone in a step.
        max_queue: most requests waiting for admission; :meth:`submit` raises :class:`EngineFull` beyond.
        eos_token_ids: ids that end every request (default: the model config's ``eos_token_id``).
        decode_buckets: pad decode batches to bucketed shapes with one static graph each (``False``:
            one dynamic-shape graph for every shape, nothing to warm up).
        prefill_buckets: pad short prefills (up to 64 tokens) to bucketed shapes with one static graph
            each (``False``: every prefill runs the dynamic-shape graph, as longer ones do).
    """

    def __init__(self, model: Any, tokenizer: Any, num_blocks: Optional[int] = None, block_size: int = 16,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 2048, max_queue: int = 256,
                 eos_token_ids: Optional[Sequence[int]] = None, decode_buckets: bool = True,
                 prefill_buckets: bool = True) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_queue < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_queue must be >= 1, got "
                             f"{max_num_seqs}, {max_num_batched_tokens}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self._decode_text = _text_decoder(tokenizer)
        backend = _fast_backend(tokenizer)
        self._incremental = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self.context = int(model.config.context_length())
        self.max_num_seqs, self.max_num_batched_tokens, self.max_queue = max_num_seqs, max_num_batched_tokens, max_queue
        spec, dtype = model.cache_spec(), model._cache_dtype()  # pylint: disable=protected-access
        if num_blocks is None:
            num_blocks = max_num_seqs * -(-self.context // block_size)
        self.cache = PagedKVCache(spec, num_blocks, block_size, dtype)
        self._prefill = PagedStep(model, self.cache.tensors, decode=False)
        self._prefill_static = PagedStep(model, self.cache.tensors, decode=False, dynamic=False)
        self._decode = PagedStep(model, self.cache.tensors, decode=True, dynamic=not decode_buckets)
        # the compiled decode shapes' batch sizes and attended lengths (none: one dynamic-shape graph)
        self._batch_buckets = _buckets(1, 2, max_num_seqs) if decode_buckets else []
        self._width_buckets = _buckets(64, 4, self.capacity) if decode_buckets else []
        # the static prefill shapes' batch sizes and prompt lengths (a prefill beyond them: the dynamic graph)
        self._prefill_batches = _buckets(1, 4, max_num_seqs) if prefill_buckets else []
        self._prefill_lengths = _buckets(16, 4, min(64, self.capacity)) if prefill_buckets else []
        for step in (self._prefill, self._prefill_static, self._decode):
            step.set_train(False)
        eos = model.config.eos_token_id if eos_token_ids is None else eos_token_ids
        self.eos_token_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])
                              if e is not None}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._running: dict = {}       # request id -> _Sequence
        self._cancelled: set = set()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.error: Optional[BaseException] = None  # what stopped the background thread
        self.metrics = {"requests": 0, "finished": 0, "cancelled": 0, "rejected": 0, "prompt_tokens": 0,
                        "generated_tokens": 0, "steps": 0}
        self.ttft = collections.deque(maxlen=1000)       # seconds from submit to first token
        self._token_times = collections.deque(maxlen=100000)  # time of each generated token

    def reset_stats(self) -> None:
        """Zero the counters and forget the timings (e.g. after a warm-up request)."""
        with self._lock:
            self.ttft.clear()
            self._token_times.clear()
            for key in self.metrics:
                self.metrics[key] = 0

    @property
    def capacity(self) -> int:
        """Most tokens (prompt + completion) one request may hold."""
        return min(self.context, self.cache.num_blocks * self.cache.block_size)

    def decode_shapes(self) -> list:
        """The (batch, attended length) shapes decode batches are padded to (empty without buckets)."""
        return [(rows, width) for rows in self._batch_buckets for width in self._width_buckets]

    def prefill_shapes(self) -> list:
        """The (batch, prompt length) shapes short prefills are padded to (empty without buckets)."""
        return [(rows, width) for rows in self._prefill_batches for width in self._prefill_lengths]

    def _decode_shape(self, rows: int, width: int) -> tuple:
        if not self._batch_buckets:
            return rows, width
        return _round_up(self._batch_buckets, rows), _round_up(self._width_buckets, width)

    def _prefill_shape(self, rows: int, width: int) -> Optional[tuple]:
        """The static prefill shape for ``rows`` prompts of up to ``width`` tokens (None: the dynamic graph,
        for longer prompts and where the padded shape would exceed the step's token budget)."""
        if not self._prefill_lengths or width > self._prefill_lengths[-1]:
            return None
        shape = _round_up(self._prefill_batches, rows), _round_up(self._prefill_lengths, width)
        return shape if shape[0] * shape[1] <= max(self.max_num_batched_tokens, rows * width) else None

    def warmup(self, log: Optional[Callable[[str], None]] = None) -> None:
        """Compile the prefill graphs and every decode shape now, so no request waits for a compile."""
        started = time.monotonic()

        def compiled(kind: str, i: int, shapes: list) -> None:
            if log is not None:
                log(f"compiled {kind} graph {i}/{len(shapes)}: batch {shapes[i - 1][0]}, length {shapes[i - 1][1]} "
                    f"({time.monotonic() - started:.1f} s)")

        longest = self._prefill_lengths[-1] if self._prefill_lengths else 0
        if longest < self.capacity - 1:  # the dynamic prefill graph, for prompts beyond the static shapes
            self.submit(GenerationRequest([0] * (longest + 1), 1, ignore_eos=True), lambda event: None)
            self.run_until_done()
        shapes = self.prefill_shapes()
        for i, (rows, width) in enumerate(shapes, 1):
            mask, (write, table) = self.cache.prefill([], [], rows, width)
            self._prefill_static(Tensor(np.zeros((rows, width), np.int32)), Tensor(np.zeros((rows, width), np.int32)),
                                 mask, write, table, *self.cache.tensors).asnumpy()
            compiled("prefill", i, shapes)
        shapes = self.decode_shapes()
        for i, (rows, width) in enumerate(shapes, 1):
            mask, (write, table) = self.cache.decode([], rows, width)
            self._decode(Tensor(np.zeros((rows, 1), np.int32)), Tensor(np.zeros((rows, 1), np.int32)), mask, write,
                         table, *self.cache.tensors).asnumpy()
            compiled("decode", i, shapes)
        self.reset_stats()

    # ---- requests in -------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` naming the field when ``request`` can never run."""
        if not request.prompt_ids:
            raise ValueError("prompt: the prompt is empty (no tokens)")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {request.max_tokens}")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.capacity:
            raise ValueError(f"max_tokens: the prompt has {len(request.prompt_ids)} tokens, so at most "
                             f"{max(self.capacity - len(request.prompt_ids), 0)} new tokens fit the model's "
                             f"context of {self.capacity}; got max_tokens={request.max_tokens}")
        request.sampling.validate()

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> str:
        """Queue ``request``; its events go to ``sink``. Returns its id. Raises ``ValueError`` for a
        request that can never run and :class:`EngineFull` when ``max_queue`` requests wait already."""
        self.check(request)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.metrics["rejected"] += 1
                raise EngineFull(f"{len(self._waiting)} requests are waiting already (max_queue "
                                 f"{self.max_queue}); retry later")
            request_id = f"cmpl-{next(self._ids)}"
            rng = np.random.default_rng(request.seed) if request.sampling.do_sample else None
            detokenizer = IncrementalDetokenizer(self._decode_text) if self._incremental else self._decode_text
            self._waiting.append(_Sequence(request_id, request, sink, rng, time.monotonic(), detokenizer))
            self.metrics["requests"] += 1
            self._lock.notify_all()
        return request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away); its blocks are freed at the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    # ---- the step ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._cancelled)

    def stats(self) -> dict:
        """Queue length, running requests, free blocks, counters, recent tokens/s and time to first token."""
        now = time.monotonic()
        with self._lock:
            recent = sum(1 for t in self._token_times if t > now - 10.0)
            return {"waiting": len(self._waiting), "running": len(self._running),
                    "free_blocks": len(self.cache.free_blocks), "num_blocks": self.cache.num_blocks,
                    "tokens_per_second": recent / 10.0, "ttft": list(self.ttft), **self.metrics}

    def step(self) -> None:
        """One scheduling step (see the module docstring)."""
        with self._lock:
            for request_id in self._cancelled:
                seq = self._running.pop(request_id, None)
                if seq is None:
                    seq = next((s for s in self._waiting if s.request_id == request_id), None)
                    if seq is not None:
                        self._waiting.remove(seq)
                if seq is not None:
                    self.cache.free(request_id)
                    self.metrics["cancelled"] += 1
                    self._emit(seq, "", [], "cancelled")
            self._cancelled.clear()
            decoding = list(self._running.values())
        self.metrics["steps"] += 1
        budget = self.max_num_batched_tokens - len(decoding)
        admitted = self._admit(budget, strict=False)
        if admitted:
            self._prefill_batch(admitted)
            # Requests that arrived during that prefill are prefilled now too, within the step's budget,
            # rather than after the decode below (a second arrival would otherwise wait a prefill and a
            # decode step for its first token).
            late = self._admit(budget - len(admitted) * max(len(s.request.prompt_ids) for s in admitted), strict=True)
            if late:
                self._prefill_batch(late)
        if decoding:
            self._decode_batch(decoding)

    def _admit(self, budget: int, strict: bool) -> list:
        """Waiting requests that join now, in arrival order: while the batch has room, the pool has blocks
        for their prompt and ``max_tokens``, and their padded prefill fits ``budget`` tokens (unless
        ``strict``, the first one always: a prompt longer than the budget runs alone)."""
        admitted: list = []
        longest = 0
        with self._lock:
            while self._waiting and len(self._running) < self.max_num_seqs:
                seq = self._waiting[0]
                prompt, total = len(seq.request.prompt_ids), len(seq.request.prompt_ids) + seq.request.max_tokens
                padded = (len(admitted) + 1) * max(longest, prompt)  # the prefill batch's tokens with it
                if ((admitted or strict) and padded > budget) or not self.cache.can_add(total):
                    break  # a request that does not fit waits, and so do those behind it
                self._waiting.popleft()
                self.cache.add(seq.request_id, total)
                self._running[seq.request_id] = seq
                admitted.append(seq)
                longest = max(longest, prompt)
        return admitted

    def _prefill_batch(self, seqs: list) -> None:
        ids, _, position_ids = left_pad([s.request.prompt_ids for s in seqs])  # as generate() batches prompts
        counts = [len(s.request.prompt_ids) for s in seqs]
        shape = self._prefill_shape(*ids.shape)
        step = self._prefill if shape is None else self._prefill_static
        rows, width = ids.shape if shape is None else shape
        # padding rows and columns (left): position 0, fully masked, written to the scratch block
        pad = ((0, rows - ids.shape[0]), (width - ids.shape[1], 0))
        mask, (positions, table) = self.cache.prefill([s.request_id for s in seqs], counts, rows, width)
        logits = step(Tensor(np.pad(ids, pad)), Tensor(np.pad(position_ids, pad)), mask, positions, table,
                      *self.cache.tensors).asnumpy()[:len(seqs), -1, :]
        self.metrics["prompt_tokens"] += sum(counts)
        self._advance_all(seqs, logits)

    def _decode_batch(self, seqs: list) -> None:
        rows, width = self._decode_shape(len(seqs), max(len(s.request.prompt_ids) + len(s.generated) for s in seqs))
        ids = np.zeros((rows, 1), np.int32)
        positions = np.zeros((rows, 1), np.int32)
        for row, seq in enumerate(seqs):
            ids[row, 0] = seq.generated[-1]
            positions[row, 0] = len(seq.request.prompt_ids) + len(seq.generated) - 1
        mask, (write, table) = self.cache.decode([s.request_id for s in seqs], rows, width)
        logits = self._decode(Tensor(ids), Tensor(positions), mask, write, table,
                              *self.cache.tensors).asnumpy()[:len(seqs), -1, :]
        self._advance_all(seqs, logits)

    def _advance_all(self, seqs: list, logits: np.ndarray) -> None:
        """Choose the next token of each of ``seqs`` from its row of ``logits`` (rows, vocab) and send what
        is new. Rows with the same sampling settings are processed together (one penalty, top-k / top-p and
        argmax call for all of them: per row, these calls cost a decode step of the demo model at batch 16
        about 1 ms of host time); sampled rows draw from their own request's generator."""
        logits = np.asarray(logits, np.float32)
        groups: dict = {}
        for row, seq in enumerate(seqs):
            groups.setdefault(seq.request.sampling, []).append(row)
        tokens = np.empty(len(seqs), np.int64)
        for rows in groups.values():
            params = seqs[rows[0]].request.sampling
            scores = process_logits(logits[rows] if len(rows) < len(seqs) else logits, params,
                                    [list(seqs[r].request.prompt_ids) + seqs[r].generated for r in rows],
                                    [seqs[r].generated for r in rows])
            if params.do_sample:
                tokens[rows] = [draw(scores[i:i + 1], params, seqs[r].rng)[0] for i, r in enumerate(rows)]
            else:
                tokens[rows] = draw(scores, params)
        for row, seq in enumerate(seqs):
            self._advance(seq, int(tokens[row]), logits[row])

    def _advance(self, seq: _Sequence, token: int, logits: np.ndarray) -> None:
        """Record ``token`` as the next token of ``seq`` (chosen from its float32 ``logits`` (vocab,)), send
        what is new."""
        request = seq.request
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.ttft.append(now - seq.submitted)
        self._token_times.append(now)
        self.metrics["generated_tokens"] += 1
        logprobs = None
        if request.logprobs is not None:
            lp = _log_softmax(logits)
            top = np.argsort(-lp)[:request.logprobs] if request.logprobs else []
            logprobs = [(self._token_text(token), float(lp[token]),
                         {self._token_text(int(t)): float(lp[t]) for t in top})]
        if not request.ignore_eos and (token in self.eos_token_ids or token in request.stop_token_ids):
            self._finish(seq, [token], "stop", logprobs, count_token=False)
            return
        seq.generated.append(token)
        text = seq.detokenizer(seq.generated)
        stop_at = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self._finish(seq, [token], "stop", logprobs, text=text[:stop_at])
            return
        if len(seq.generated) >= request.max_tokens:
            self._finish(seq, [token], "length", logprobs, text=text)
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
            safe = len(text.rstrip("\ufffd"))
        hold = 0  # hold back what may be the start of a stop string
        for stop in request.stop:
            hold = max([hold] + [k for k in range(1, min(len(stop) - 1, safe) + 1) if text[:safe].endswith(stop[:k])])
        safe -= hold
        delta = text[len(seq.sent):safe] if safe > len(seq.sent) else ""
        seq.sent += delta
        self._emit(seq, delta, [token], None, logprobs)

    def _finish(self, seq: _Sequence, tokens: list, reason: str, logprobs, count_token: bool = True,
                text: Optional[str] = None) -> None:
        delta = text[len(seq.sent):] if text is not None and len(text) > len(seq.sent) else ""
        seq.sent += delta
        with self._lock:
            self._running.pop(seq.request_id, None)
            self.cache.free(seq.request_id)
            self.metrics["finished"] += 1
        self._emit(seq, delta, tokens if count_token else [], reason, logprobs if count_token else None)

    def _emit(self, seq: _Sequence, text: str, tokens: list, reason: Optional[str], logprobs=None) -> None:
        seq.sink(Event(seq.request_id, text, tokens, reason, logprobs, len(seq.request.prompt_ids),
                       len(seq.generated)))

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    # ---- running -----------------------------------------------------------------------------
    def run_until_done(self) -> None:
        """Step until nothing waits or runs (offline use: tests, benches)."""
        while self.has_work():
            self.step()

    def start(self) -> None:
        """Run the scheduler in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mfx-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._waiting or self._running or self._cancelled or self._stopping):
                        self._lock.wait()
                    if self._stopping:
                        return
                self.step()
        except BaseException as exc:  # pylint: disable=broad-except
            self.error = exc
            with self._lock:
                failed = list(self._running.values()) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            for seq in failed:
                self._emit(seq, "", [], "error")
            raise
