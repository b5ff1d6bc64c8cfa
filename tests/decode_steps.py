"""Decode-step logits of our ``generate`` against a teacher-forced reference (not a test module).

Our model generates from a left-padded batch of prompts of several lengths with the KV cache
(``use_past=True``) and returns the raw logits of every step (``output_logits``). The reference
then scores each row's own unpadded sequence (prompt + the tokens we generated) and must give the
same logits at the positions where each of our steps predicted the next token.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

STEPS = 48
TOLERANCE = 1e-4  # float32, max abs over every step and row


def random_prompts(vocab: int, lengths, seed: int = 0, low: int = 3) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(low, vocab, size=n).tolist() for n in lengths]


def generate_with_logits(model, prompts: list[list[int]], steps: int = STEPS, cache_implementation: str = "dynamic"):
    """(sequences, logits (steps, batch, vocab)) of a greedy cached generate that never stops early."""
    out = model.generate(prompts, max_new_tokens=steps, do_sample=False, use_past=True, eos_token_id=[],
                         return_dict_in_generate=True, output_logits=True, cache_implementation=cache_implementation)
    logits = np.stack(out["logits"])
    assert logits.shape[:2] == (steps, len(prompts)), logits.shape
    return out["sequences"], logits


def max_step_error(prompts, sequences, logits, reference_rows: Callable) -> float:
    """Max abs difference between our step logits and ``reference_rows(ids (1, S)) -> (1, S, V)`` on each
    row's unpadded sequence (prompt and all generated tokens but the last)."""
    worst = 0.0
    for row, prompt in enumerate(prompts):
        seq = np.asarray(sequences[row][:-1], dtype=np.int64)
        assert len(seq) == len(prompt) + logits.shape[0] - 1
        expected = reference_rows(seq[None])[0, len(prompt) - 1:]
        worst = max(worst, float(np.abs(logits[:, row] - expected).max()))
    return worst


def hf_rows(hf_model) -> Callable:
    """``reference_rows`` of :func:`max_step_error` for an HF model: its logits on the ids, without grad."""
    import torch

    def rows(ids):
        with torch.no_grad():
            return hf_model(torch.tensor(ids)).logits.numpy()
    return rows


def hf_cached_batch_logits(hf_model, prompts: list[list[int]], sequences, pad: int = 0) -> np.ndarray:
    """HF's logits for the same left-padded batch, teacher-forced one token per step through its own
    cache (for dynamic-NTK rope, whose frequencies depend on the longest position in each call)."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    steps = len(sequences[0]) - len(prompts[0])
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = []
    with torch.no_grad():
        logits = hf_model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True).logits[:, -1]
        out.append(logits.numpy())
        for step in range(1, steps):
            tokens = torch.tensor([[int(s[len(p) + step - 1])] for s, p in zip(sequences, prompts)])
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], 1)
            pos = positions[:, -1:] + step
            logits = hf_model(tokens, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True).logits[:, -1]
            out.append(logits.numpy())
    return np.stack(out)


JOINS = (0, 0, 3)  # the paged parity tests' three rows: two prefilled together, one joining later


def paged_greedy_logits(model, prompts: list[list[int]], steps: int = STEPS, joins=None, block_size: int = 4):
    """(sequences, logits (steps, batch, vocab)) of greedy decoding over a shared paged KV cache.

    Row r joins the running batch at engine step ``joins[r]`` (default: all at step 0): it is
    prefilled with the rows joining at the same step (left-padded), then decodes together with
    whichever rows are running, as the serving engine's scheduler does. ``logits[t, r]`` is row r's
    t-th step, comparable with :func:`generate_with_logits`.
    """
    from mindspore import Tensor

    from mindformers_ext.cache import PagedKVCache
    from mindformers_ext.generation.step_cells import PagedStep

    joins = list(joins or [0] * len(prompts))
    spec, dtype = model.cache_spec(), model._cache_dtype()  # pylint: disable=protected-access
    cache = PagedKVCache(spec, sum(-(-(len(p) + steps) // block_size) for p in prompts) + 3, block_size, dtype)
    prefill, decode = PagedStep(model, cache.tensors, False), PagedStep(model, cache.tensors, True)
    generated = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    tick = 0
    while any(len(g) < steps for g in generated):
        running = [r for r in range(len(prompts)) if joins[r] < tick and 0 < len(generated[r]) < steps]
        joining = [r for r in range(len(prompts)) if joins[r] == tick]
        if joining:  # prefilled together, left-padded to the longest
            width = max(len(prompts[r]) for r in joining)
            ids, position_ids = np.zeros((2, len(joining), width), np.int32)
            for row, r in enumerate(joining):
                cache.add(r, len(prompts[r]) + steps)
                ids[row, width - len(prompts[r]):] = prompts[r]
                position_ids[row, width - len(prompts[r]):] = np.arange(len(prompts[r]))
            mask, (pos, table) = cache.prefill(joining, [len(prompts[r]) for r in joining])
            out = prefill(Tensor(ids), Tensor(position_ids), mask, pos, table, *cache.tensors).asnumpy()
            for row, r in enumerate(joining):
                logits[r].append(out[row, -1])
                generated[r].append(int(logits[r][-1].argmax()))
        if running:
            ids = np.array([[generated[r][-1]] for r in running], np.int32)
            positions = np.array([[len(prompts[r]) + len(generated[r]) - 1] for r in running], np.int32)
            # padded as the engine pads to its compiled shapes: one more row, four more columns
            rows, width = len(running) + 1, max(len(prompts[r]) + len(generated[r]) for r in running) + 4
            ids, positions = (np.concatenate([a, np.zeros((1, 1), np.int32)]) for a in (ids, positions))
            mask, (pos, table) = cache.decode(running, rows, width)
            out = decode(Tensor(ids), Tensor(positions), mask, pos, table, *cache.tensors).asnumpy()
            for row, r in enumerate(running):
                logits[r].append(out[row, -1])
                generated[r].append(int(logits[r][-1].argmax()))
        for r in range(len(prompts)):
            if len(generated[r]) == steps:
                cache.free(r)
        tick += 1
    assert len(cache.free_blocks) == cache.num_blocks, "blocks leaked"
    sequences = [np.array(p + g, np.int32) for p, g in zip(prompts, generated)]
    return sequences, np.stack([np.stack(row) for row in logits], axis=1)


def assert_paged_matches_contiguous(model, prompts: list[list[int]], tolerance: float = 1e-5, steps: int = 24) -> None:
    """Greedy decoding over the paged cache (rows 0 and 1 prefilled together, row 2 joining at step 3,
    decode batches padded) gives the contiguous cache's ids, and step logits within ``tolerance``."""
    sequences, logits = generate_with_logits(model, prompts, steps=steps)
    paged_sequences, paged_logits = paged_greedy_logits(model, prompts, steps=steps, joins=JOINS)
    assert [s.tolist() for s in paged_sequences] == [s.tolist() for s in sequences]
    error = float(np.abs(paged_logits - logits).max())
    assert error <= tolerance, f"paged vs contiguous step logits differ by {error}"
