"""``generate`` for our causal LMs: left-padded batches, a static KV cache (:class:`KVCache`) and
dynamic-shape graphs.

Replaces MindFormers' ``GenerationMixin.generate`` (whose cached path needs Ascend's paged attention)
with the same call shape: ``model.generate(input_ids, max_new_tokens=..., do_sample=...)`` returns a
list of int32 arrays, prompt followed by the new tokens (the end token included when one is hit).
MindFormers' ``pipeline("text_generation")`` calls it unchanged.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindformers.generation.utils import GenerateOutput
from mindformers.tools.logger import logger

from mindformers_ext.cache import CacheSpec, KVCache, left_pad, padded_causal_mask
from mindformers_ext.generation.sampling import SamplingParams, draw, process_logits
from mindformers_ext.generation.step_cells import CachedStep, LastLogitsStep
from mindformers_ext.layers.linear import ms_dtype

_GENERATION_KEYS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
                    "repetition_penalty", "eos_token_id", "pad_token_id", "use_past", "seed",
                    "return_dict_in_generate", "output_scores", "output_logits", "stop_strings", "tokenizer",
                    "cache_implementation")
# cache_implementation="static": the KV cache's capacity is rounded up to a power of two (at least this)
# and the decode step is compiled as a static graph for each (batch, capacity): no per-kernel shape
# inference, about half the time per token on CPU at batch 1, one compile per new shape.
_STATIC_MIN_CAPACITY = 64
# MindFormers generation options that do not change greedy / sampled ids here.
_IGNORED_KEYS = ("num_beams", "min_length", "min_new_tokens", "audio_processor", "batch_size")


def _as_prompt_list(input_ids: Any, pad_token_id: Optional[int]) -> list[list[int]]:
    """Prompts as lists of ints. A rectangular batch (array, or lists of one length) is MindFormers'
    right-padded batch: trailing ``pad_token_id`` entries are stripped as MindFormers' generate does.
    Lists of different lengths are taken as given."""
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.asnumpy()
    if (isinstance(input_ids, (list, tuple)) and len(input_ids) > 1
            and all(isinstance(r, (list, tuple, np.ndarray)) for r in input_ids)
            and len({len(r) for r in input_ids}) == 1):
        input_ids = np.array(input_ids)
    if isinstance(input_ids, np.ndarray):
        arr = input_ids.reshape(-1, input_ids.shape[-1]) if input_ids.ndim else input_ids.reshape(1, 1)
        prompts = []
        for row in arr.tolist():
            end = len(row)
            while pad_token_id is not None and end > 1 and row[end - 1] == pad_token_id:
                end -= 1
            prompts.append([int(t) for t in row[:end]])
        return prompts
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(t, (int, np.integer)) for t in input_ids):
        return [[int(t) for t in input_ids]]
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be a non-empty list of token ids or a list of such lists")
    prompts = []
    for i, row in enumerate(input_ids):
        row = row.tolist() if isinstance(row, np.ndarray) else list(row)
        if not row:
            raise ValueError(f"input_ids[{i}] is empty: every prompt needs at least one token")
        prompts.append([int(t) for t in row])
    return prompts


class DecodingMixin:
    """Adds ``generate`` to a :class:`CausalLMBase`."""

    _step_cells: Optional[dict] = None

    def _steps(self) -> dict:
        if self._step_cells is None:
            self._step_cells = {}
        return self._step_cells

    def cache_spec(self) -> CacheSpec:
        """What the model caches per layer (its decoder stack's :class:`CacheSpec`)."""
        return self.model.cache_spec

    def _cache_dtype(self):
        return ms_dtype(self.config.compute_dtype)

    def _step(self, kind: str):
        """The compiled graph of ``kind``: "logits" (no cache), "prefill", "decode" or "static_decode"
        (one static graph per input shape)."""
        steps = self._steps()
        if kind not in steps:
            if kind == "logits":
                steps[kind] = LastLogitsStep(self)
            else:
                steps[kind] = CachedStep(self, self.cache_spec(), self._cache_dtype(), decode=kind != "prefill",
                                         dynamic=kind != "static_decode")
            steps[kind].set_train(False)
        return steps[kind]

    def _resolve(self, generation_config: Any, kwargs: dict) -> dict:
        cfg = self.config
        opts = {
            "max_new_tokens": None, "max_length": getattr(cfg, "max_decode_length", 1024),
            "do_sample": getattr(cfg, "do_sample", False), "temperature": 1.0,
            "top_k": getattr(cfg, "top_k", 0), "top_p": getattr(cfg, "top_p", 1.0),
            "repetition_penalty": getattr(cfg, "repetition_penalty", 1.0),
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "use_past": getattr(cfg, "use_past", True), "seed": None, "return_dict_in_generate": False,
            "output_scores": False, "output_logits": False, "stop_strings": None, "tokenizer": None,
            "cache_implementation": getattr(cfg, "cache_implementation", "dynamic"),
        }
        if generation_config is not None:
            for key in _GENERATION_KEYS:
                value = getattr(generation_config, key, None)
                if value is not None:
                    opts[key] = value
        for key in list(kwargs):
            if key in _GENERATION_KEYS:
                value = kwargs.pop(key)
                if value is not None:
                    opts[key] = value
        unknown = [k for k in kwargs if k not in _IGNORED_KEYS]
        if unknown:
            logger.warning("generate() ignores unsupported keyword arguments %s; supported: %s",
                           unknown, list(_GENERATION_KEYS))
        if opts["cache_implementation"] not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {opts['cache_implementation']!r}")
        if isinstance(opts["stop_strings"], str):
            opts["stop_strings"] = [opts["stop_strings"]]
        if opts["stop_strings"] and opts["tokenizer"] is None:
            raise ValueError("stop_strings needs the tokenizer to decode with: pass tokenizer=...")
        eos = opts["eos_token_id"]
        opts["eos_token_id"] = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}
        return opts

    def generate(self, input_ids: Union[Sequence[int], Sequence[Sequence[int]], np.ndarray, Tensor],
                 generation_config: Any = None, logits_processor: Any = None, streamer: Any = None,
                 seed: Optional[int] = None, **kwargs) -> list[np.ndarray]:
        """Generate continuations of a prompt or a batch of prompts of different lengths.

        Keyword arguments (override ``generation_config`` and the model config): max_new_tokens,
        max_length (prompt + new), do_sample, temperature, top_k, top_p, repetition_penalty,
        eos_token_id (int or list), pad_token_id, use_past, seed, stop_strings (with tokenizer: a row
        stops once its new text contains one), return_dict_in_generate, output_scores, output_logits,
        cache_implementation ("dynamic", default: one dynamic-shape decode graph for every batch and
        length; "static", as HF's static cache: the cache capacity rounded up to a power of two and one
        static decode graph per (batch, capacity), compiled on first use, 1.1-1.3x as fast per
        token on CPU).
        Returns one int32 array per prompt: the prompt followed by the generated ids, stopping after
        an end token. With return_dict_in_generate, a ``GenerateOutput`` with ``sequences`` and, as
        HF, ``logits`` (raw float32 (batch, vocab) per step, if output_logits) and ``scores`` (after
        repetition penalty and, when sampling, temperature / top-k / top-p, if output_scores); rows
        that already finished keep producing entries (fed the pad token), as in HF.
        """
        del logits_processor  # custom MindFormers processors are not supported by this decoder
        opts = self._resolve(generation_config, kwargs)
        if seed is not None:
            opts["seed"] = seed
        prompts = _as_prompt_list(input_ids, opts["pad_token_id"])
        longest = max(len(p) for p in prompts)
        max_new = opts["max_new_tokens"] if opts["max_new_tokens"] is not None else opts["max_length"] - longest
        if max_new < 1:
            raise ValueError(f"nothing to generate: the longest prompt has {longest} tokens and max_length is "
                             f"{opts['max_length']}; pass max_new_tokens")
        limit = self.config.context_length()
        if longest + max_new > limit:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new}) exceeds the model's context of "
                             f"{limit} positions (max_position_embedding, with its rope scaling)")
        params = SamplingParams(opts["do_sample"], float(opts["temperature"]), int(opts["top_k"] or 0),
                                float(opts["top_p"]), float(opts["repetition_penalty"]))
        params.validate()
        rng = np.random.default_rng(opts["seed"]) if params.do_sample else None
        was_training = self.training
        self.set_train(False)
        record = {"logits": [] if opts["output_logits"] else None, "scores": [] if opts["output_scores"] else None}
        try:
            sequences = self._decode_loop(prompts, max_new, params, rng, opts, streamer, record)
        finally:
            self.set_train(was_training)
        if opts["return_dict_in_generate"]:
            return GenerateOutput(sequences=sequences, **{k: None if v is None else tuple(v) for k, v in record.items()})
        return sequences

    def _decode_loop(self, prompts: list[list[int]], max_new: int, params: SamplingParams,
                     rng: Optional[np.random.Generator], opts: dict, streamer: Any,
                     record: dict) -> list[np.ndarray]:
        pad = int(opts["pad_token_id"] or 0)
        ids, valid, positions = left_pad(prompts, pad)
        batch, width = ids.shape
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        histories = [list(p) for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        finished = np.zeros(batch, dtype=bool)
        if streamer is not None:
            streamer.put(np.array(prompts[0] if batch == 1 else ids))
        use_past = bool(opts["use_past"])
        static = opts["cache_implementation"] == "static"
        capacity = width + max_new
        if static:
            capacity = max(_STATIC_MIN_CAPACITY, 1 << (capacity - 1).bit_length())
        cache = KVCache(self.cache_spec(), batch, capacity, self._cache_dtype()) if use_past else None
        for step in range(max_new):
            if use_past and step == 0:
                mask, slot = cache.prefill(valid)
                logits = cache.take_step_output(self._step("prefill")(Tensor(ids), Tensor(positions), mask, slot,
                                                                      *cache.tensors))
            elif use_past:
                mask, slot = cache.next_slot()
                pos = (lengths + step - 1)[:, None].astype(np.int32)
                graph = self._step("static_decode" if static else "decode")
                logits = cache.take_step_output(graph(Tensor(last[:, None]), Tensor(pos), mask, slot, *cache.tensors))
            else:  # recompute the whole sequence each step
                full_valid = np.concatenate([valid, np.ones((batch, step), bool)], 1)
                pos = np.concatenate([positions, (lengths[:, None] + np.arange(step)[None]).astype(np.int32)], 1)
                tokens = np.concatenate(
                    [ids, np.array([g + [pad] * (step - len(g)) for g in generated], np.int32).reshape(batch, step)], 1)
                logits = self._step("logits")(Tensor(tokens), Tensor(pos), Tensor(padded_causal_mask(full_valid)))
            step_logits = logits.asnumpy()[:, -1, :].astype(np.float32)
            scores = process_logits(step_logits, params, histories)
            next_ids = draw(scores, params, rng)
            if record["logits"] is not None:
                record["logits"].append(step_logits)
            if record["scores"] is not None:
                record["scores"].append(scores)
            last = next_ids.astype(np.int32)
            for row in range(batch):
                if finished[row]:
                    last[row] = pad
                    continue
                token = int(next_ids[row])
                generated[row].append(token)
                histories[row].append(token)
                if token in opts["eos_token_id"] or self._hit_stop_string(generated[row], opts):
                    finished[row] = True
            if streamer is not None:
                streamer.put(last[:1] if batch == 1 else last)
            if finished.all():
                break
        if streamer is not None:
            streamer.end()
        return [np.array(p + g, dtype=np.int32) for p, g in zip(prompts, generated)]

    @staticmethod
    def _hit_stop_string(new_ids: list[int], opts: dict) -> bool:
        """Whether the text generated so far contains one of ``stop_strings``."""
        if not opts["stop_strings"]:
            return False
        text = opts["tokenizer"].decode(new_ids, skip_special_tokens=False)
        return any(stop in text for stop in opts["stop_strings"])
