"""Our Llama-family model (DeepSeek-Coder) against HF LlamaForCausalLM on the same weights."""
import numpy as np
import pytest
import torch
import transformers

import mindspore as ms
from decode_steps import (STEPS, TOLERANCE, generate_with_logits, hf_cached_batch_logits, hf_rows, max_step_error,
                          assert_paged_matches_contiguous)
from mindformers_ext import load_hf_model
from mindformers_ext.cache import KVCache, can_write_in_place
from mindformers_ext.generation.step_cells import CachedStep
from research.deepseek1_5 import DeepSeekCoderForCausalLM
from sharp_models import assert_sharp

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def pairs(tiny_llama_dirs):
    """{variant: (our model, HF model)}, built once for the module."""
    out = {}
    for name, path in tiny_llama_dirs.items():
        ours = load_hf_model(path, use_past=True)
        ref = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        assert_sharp(ref)
        out[name] = (ours, ref)
    return out


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab, size=n).tolist() for n in lengths]


def _hf_greedy(ref, prompt, new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt], dtype=torch.long)
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("variant", ["v1_5", "v1_linear", "gqa"])
def test_logits_match_hf(pairs, variant):
    ours, ref = pairs[variant]
    assert isinstance(ours, DeepSeekCoderForCausalLM)
    ids = np.array(_prompts(ours.config.vocab_size, [23, 23], seed=1), dtype=np.int32)
    logits = ours(ms.Tensor(ids)).asnumpy()
    with torch.no_grad():
        expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("variant", ["v1_5", "v1_linear", "gqa", "dynamic", "yarn"])
def test_decode_step_logits_match_hf(pairs, variant):
    """Every cached decode step's logits, for a left-padded batch of three prompt lengths, equal HF's
    on each row's own sequence (dynamic NTK: HF's own cached decode of the same batch, since its
    frequencies follow the longest position of each call; the table is 32 long, decoding reaches 60)."""
    ours, ref = pairs[variant]
    prompts = _prompts(ours.config.vocab_size, [5, 12, 9], seed=3)
    sequences, logits = generate_with_logits(ours, prompts)
    if variant == "dynamic":
        error = float(np.abs(logits - hf_cached_batch_logits(ref, prompts, sequences)).max())
    else:
        error = max_step_error(prompts, sequences, logits, hf_rows(ref))
    assert error <= TOLERANCE, f"{variant}: max abs step-logit error {error:.2e} over {STEPS} steps"


def test_static_cache_decode_step_logits_match_hf(pairs):
    """generate(cache_implementation="static"): the cache rounded up to 64 slots and one static decode
    graph; every step's logits for the left-padded batch still equal HF's (GQA)."""
    ours, ref = pairs["gqa"]
    prompts = _prompts(ours.config.vocab_size, [5, 12, 9], seed=3)
    sequences, logits = generate_with_logits(ours, prompts, cache_implementation="static")
    error = max_step_error(prompts, sequences, logits, hf_rows(ref))
    assert error <= TOLERANCE, f"static cache: max abs step-logit error {error:.2e} over {STEPS} steps"
    with pytest.raises(ValueError, match="cache_implementation must be 'dynamic' or 'static', got 'paged'"):
        ours.generate(prompts, max_new_tokens=2, cache_implementation="paged")
    with pytest.raises(ValueError, match="cache_implementation must be 'dynamic' .* or 'static'"):
        type(ours.config)(cache_implementation="paged")
    # the YAML's model_config.cache_implementation is generate's default
    ours._steps().pop("static_decode")  # pylint: disable=protected-access
    ours.config.cache_implementation = "static"
    try:
        again = ours.generate(prompts, max_new_tokens=4, eos_token_id=[])
    finally:
        ours.config.cache_implementation = "dynamic"
    assert "static_decode" in ours._steps()  # pylint: disable=protected-access
    assert [s.tolist() for s in again] == [s[:len(p) + 4].tolist() for s, p in zip(sequences, prompts)]


@pytest.mark.parametrize("use_past", [True, False])
@pytest.mark.parametrize("variant", ["v1_5", "gqa"])
def test_greedy_matches_hf_generate(pairs, variant, use_past):
    ours, ref = pairs[variant]
    prompt = _prompts(ours.config.vocab_size, [9], seed=2)[0]
    got = ours.generate([prompt], max_new_tokens=NEW_TOKENS, do_sample=False, use_past=use_past, eos_token_id=[])
    assert got[0].tolist() == _hf_greedy(ref, prompt)


@pytest.mark.parametrize("use_past", [True, False])
def test_batch_of_different_lengths_matches_single_prompts(pairs, use_past):
    ours, ref = pairs["v1_linear"]
    prompts = _prompts(ours.config.vocab_size, [5, 14], seed=3)
    got = ours.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, use_past=use_past, eos_token_id=[])
    for prompt, row in zip(prompts, got):
        assert row.tolist() == _hf_greedy(ref, prompt)
    # HF itself on the left-padded batch gives the same ids
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf_batch = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    for row, hf_row in zip(got, hf_batch[:, width:].tolist()):
        assert row.tolist()[-NEW_TOKENS:] == hf_row


def test_generate_stops_at_eos_and_returns_prompt_plus_new(pairs):
    ours, ref = pairs["v1_5"]
    prompt = _prompts(ours.config.vocab_size, [6], seed=4)[0]
    full = _hf_greedy(ref, prompt, 10)
    stop = full[len(prompt) + 3]  # make the 4th new token the end token
    new = full[len(prompt):]
    got = ours.generate([prompt], max_new_tokens=10, eos_token_id=stop)[0].tolist()
    assert got == prompt + new[:new.index(stop) + 1]


@pytest.mark.parametrize("variant,context", [("v1_linear", 512), ("dynamic", 64), ("yarn", 128)])
def test_generate_checks_the_context_with_rope_scaling(pairs, variant, context):
    """Prompt + new tokens are checked against the effective context before any work: PI and YaRN
    configs give it extended already; dynamic NTK extends its 32-position table by its factor 2."""
    ours, _ = pairs[variant]
    assert ours.config.context_length() == context
    with pytest.raises(ValueError, match=f"exceeds the model's context of {context} positions"):
        ours.generate([[5] * (context - 10)], max_new_tokens=11)


@pytest.mark.parametrize("variant", ["v1_5", "gqa", pytest.param("v1_linear", marks=pytest.mark.slow),
                                     pytest.param("yarn", marks=pytest.mark.slow)])
def test_paged_cache_matches_contiguous_cache(pairs, variant):
    """Greedy decoding over the serving engine's paged cache (block size 4, rows 0 and 1
    prefilled together, row 2 joining at step 3, decode batches padded) gives the contiguous cache's ids and step logits within 1e-5. Dynamic
    NTK is left out: its frequencies follow the longest position of each call (as HF's), so they
    depend on the batch."""
    ours, _ = pairs[variant]
    prompts = _prompts(ours.config.vocab_size, [5, 12, 9], seed=4)
    assert_paged_matches_contiguous(ours, prompts)


@pytest.mark.parametrize("in_place", [True, False])
def test_cache_tensors_hold_hf_keys_and_values(pairs, in_place):
    """The step graphs' cache writes, in place (on CPU: the KVCache's own tensors change and the step
    returns only the logits) or functional (the step returns new tensors, as the MindIR export): after a
    prefill and three decode steps the cache holds HF's cached keys and values (GQA, 2 heads) in the
    written slots and zeros after them. Both modes are compiled on the same model."""
    ours, ref = pairs["gqa"]
    assert can_write_in_place(ours), "the CPU cache-write operator did not build (is g++ installed?)"
    spec = ours.cache_spec()
    prompt_len, steps, capacity = 7, 3, 16
    ids = np.array(_prompts(ours.config.vocab_size, [prompt_len, prompt_len], seed=8), dtype=np.int32)
    cache = KVCache(spec, 2, capacity)
    held = cache.tensors
    prefill, decode = (CachedStep(ours, spec, ms.float32, decode=d, cpu_kernels=in_place) for d in (False, True))
    mask, slot = cache.prefill(np.ones(ids.shape, bool))
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), ids.shape)
    out = prefill(ms.Tensor(ids), ms.Tensor(positions), mask, slot, *cache.tensors)
    tokens = ids
    for step in range(steps + 1):
        assert len(out) == (1 if in_place else 1 + spec.num_tensors)
        logits = cache.take_step_output(out)
        if step == steps:
            break
        last = logits.asnumpy()[:, -1].argmax(-1).astype(np.int32)[:, None]
        tokens = np.concatenate([tokens, last], 1)
        mask, slot = cache.next_slot()
        pos = np.full((2, 1), prompt_len + step, np.int32)
        out = decode(ms.Tensor(last), ms.Tensor(pos), mask, slot, *cache.tensors)
    assert (cache.tensors is held) == in_place
    written = prompt_len + steps
    hf_cache = transformers.DynamicCache()
    with torch.no_grad():
        ref(torch.tensor(tokens[:, :written], dtype=torch.long), past_key_values=hf_cache, use_cache=True)
    for layer in range(spec.num_layers):
        for i, expected in enumerate((hf_cache.layers[layer].keys, hf_cache.layers[layer].values)):
            got = cache.tensors[layer * spec.per_layer + i].asnumpy()
            assert got.shape == (2, 2, capacity, expected.shape[-1])
            np.testing.assert_allclose(got[:, :, :written], expected.numpy(), rtol=1e-4, atol=1e-4)
            assert not got[:, :, written:].any()
