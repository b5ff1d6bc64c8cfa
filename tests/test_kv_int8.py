"""int8 KV cache (``kv_cache_dtype: int8``): every cached key / value (or MLA latent entry) per token
and head as int8 with a float scale. Checked against independent references that run the same int8
round trip on the keys and values inside HF's attention (Llama with GQA, GPT-BigCode MQA) or on
DeepSeek-V2's latent in the original formulas, for the positions a decode step computes (the
prompt's own positions attend over unquantised keys in prefill, as ours do): every step's logits
equal them to 1e-4. The paged cache of the serving engine stores the same int8 entries."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from conftest import make_tiny_llama
from decode_steps import JOINS, generate_with_logits, paged_greedy_logits, random_prompts
from deepseek2_reference import fake_int8, make_tiny_deepseek2, one_torch_thread, reference_forward
from mindformers_ext import load_hf_model
from mindformers_ext.cache import KVCache
from wizardcoder_util import make_tiny_bigcode

STEPS = 24


INT8_FROM: list = [None]  # positions from here on attend over int8 keys / values


def _int8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    start = INT8_FROM[0]
    if start is not None:  # output (B, S, H, D): rows from ``start`` over the round-tripped cache
        quantised, _ = sdpa_attention_forward(module, query, fake_int8(key), fake_int8(value), attention_mask,
                                              **kwargs)
        out = torch.cat((out[:, :start], quantised[:, start:]), 1)
    return out, weights


def _hf_int8_kv(hf):
    """HF's model with every attention's keys / values through the int8 round trip (per token and head)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("int8_kv", _int8_kv_attention)
    AttentionMaskInterface.register("int8_kv", sdpa_mask)
    for module in hf.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "int8_kv"  # pylint: disable=protected-access
    return hf


def _check(ours, prompts, reference):
    """``reference(ids (1, S), int8_from)`` -> logits (1, S, V)."""
    sequences, logits = generate_with_logits(ours, prompts, STEPS)
    errors = []
    for row, prompt in enumerate(prompts):
        seq = np.asarray(sequences[row][:-1], dtype=np.int64)[None]
        expected = reference(seq, len(prompt))[0, len(prompt) - 1:]
        errors += np.abs(logits[:, row] - expected).max(-1).tolist()
    # Exact up to rounding-boundary flips: a cached value at x / s = k + 0.5 within float error can
    # round to either neighbour (one int8 step, ~1e-3 in the logits of later steps). A wrong scale,
    # axis or layout moves every step by 1e-2 or more.
    assert np.median(errors) <= 1e-4 and max(errors) <= 5e-3, f"step-logit errors {np.round(errors, 6)}"
    # the serving engine's paged pool stores the same int8 values and scales (two rows prefilled together, one joining later)
    paged_sequences, paged_logits = paged_greedy_logits(ours, prompts, STEPS, joins=JOINS)
    assert [s.tolist() for s in paged_sequences] == [s.tolist() for s in sequences]
    paged_errors = np.abs(paged_logits - logits).max(-1)
    assert np.median(paged_errors) <= 1e-5 and paged_errors.max() <= 5e-3, np.round(paged_errors, 6)


@pytest.mark.parametrize("family", [pytest.param("llama_gqa", marks=pytest.mark.slow), "bigcode_mqa"])  # same cache code
def test_int8_kv_cache_matches_hf_with_int8_keys_and_values(tmp_path, family):
    if family == "llama_gqa":
        path = make_tiny_llama(str(tmp_path / "hf"), seed=50, num_key_value_heads=2)
        hf_class = transformers.LlamaForCausalLM
    else:
        path = make_tiny_bigcode(str(tmp_path / "hf"), seed=51)
        hf_class = transformers.GPTBigCodeForCausalLM
    ours = load_hf_model(path, use_past=True, kv_cache_dtype="int8")
    spec = ours.cache_spec()
    assert spec.int8 and spec.per_layer == 4
    cache = KVCache(spec, 2, 10)
    assert [str(t.dtype) for t in cache.tensors[:2]] == ["Int8", "Float32"]
    hf = _hf_int8_kv(hf_class.from_pretrained(path, attn_implementation="sdpa").eval())

    def reference(ids, int8_from):
        INT8_FROM[0] = int8_from
        try:
            return hf(torch.tensor(ids)).logits.numpy()
        finally:
            INT8_FROM[0] = None

    prompts = random_prompts(160, [5, 11, 8], seed=4)
    with torch.no_grad(), one_torch_thread():
        _check(ours, prompts, reference)


def test_int8_latent_cache_matches_the_reference(tmp_path):
    path = str(tmp_path / "hf")
    state = make_tiny_deepseek2(path, "full", seed=52)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    ours = load_hf_model(path, use_past=True, kv_cache_dtype="int8")
    assert ours.cache_spec().per_layer == 2  # latent values + scales
    prompts = random_prompts(160, [5, 11, 8], seed=6)
    _check(ours, prompts, lambda ids, start: reference_forward(state, cfg, ids, int8_from=start))


def test_kv_cache_dtype_is_validated():
    from mindformers_ext.models.llama_config import LlamaFamilyConfig

    with pytest.raises(ValueError, match="kv_cache_dtype must be int8"):
        LlamaFamilyConfig(kv_cache_dtype="int4")
