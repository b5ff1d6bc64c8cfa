"""DeepSeek-V2 (MLA, DeepSeekMoE, YaRN) against HF DeepseekV2ForCausalLM and DeepSeek's original formulas.

Variants (tests/deepseek2_reference.py): "full" (low-rank q, group-limited routing, routed scale
2.5) and "lite" (plain q, greedy) are compared with HF transformers' native class; the YaRN ones
(and normalised top-k, moe_layer_freq) with an independent torch re-implementation of DeepSeek's
own code, because HF 4.57 omits the YaRN softmax correction and norm_topk_prob.
"""
import json
import os

import numpy as np
import pytest
import torch

import mindspore as ms
from mindformers_ext import load_hf_model
from mindformers_ext.cache import KVCache
from mindformers_ext.generation.step_cells import CachedStep, cached_step_inputs
from decode_steps import STEPS, TOLERANCE, generate_with_logits, max_step_error, assert_paged_matches_contiguous
from deepseek2_reference import (HF_NATIVE, VARIANTS, aux_loss, cross_entropy, make_tiny_deepseek2,
                                 one_torch_thread, reference_forward, reference_greedy, route)
from sharp_models import assert_sharp
from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (our model, HF state dict, HF config dict, HF native model or None)}, built once."""
    import transformers

    root = tmp_path_factory.mktemp("hf_deepseek2")
    out = {}
    for i, variant in enumerate(VARIANTS):
        path = str(root / variant)
        state = make_tiny_deepseek2(path, variant, seed=i)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(path).eval()
        assert_sharp(hf)  # HF's scores lack YaRN's softmax correction, close enough to measure sharpness
        hf = hf if variant in HF_NATIVE else None
        out[variant] = (load_hf_model(path, use_past=True), state, cfg, hf)
    return out


def _prompts(lengths, seed=0, vocab=160):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab, size=n).tolist() for n in lengths]


_GREEDY: dict = {}


def _expected_greedy(entry, prompt):
    """HF generate (native variants) or the reference's greedy continuation; memoised."""
    _, state, cfg, hf = entry
    key = (id(state), tuple(prompt))
    if key not in _GREEDY:
        if hf is None:
            _GREEDY[key] = reference_greedy(state, cfg, prompt, NEW_TOKENS)
        else:
            ids = torch.tensor([prompt])
            with torch.no_grad(), one_torch_thread():
                _GREEDY[key] = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                           do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
    return _GREEDY[key]


@pytest.mark.parametrize("variant", HF_NATIVE)
def test_reference_matches_hf_native(tiny, variant):
    """The reference implements what HF does wherever HF follows DeepSeek's code."""
    _, state, cfg, hf = tiny[variant]
    ids = np.array(_prompts([19, 19], seed=5))
    with torch.no_grad(), one_torch_thread():
        expected = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(reference_forward(state, cfg, ids) - expected).max() < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match(tiny, variant):
    """fp32 logits within 1e-4 of HF native (full, lite) or of the original formulas (YaRN variants;
    40 positions, beyond YaRN's original 16)."""
    ours, state, cfg, hf = tiny[variant]
    assert isinstance(ours, DeepseekV2ForCausalLM)
    ids = np.array(_prompts([40, 40], seed=1), dtype=np.int32)
    logits = ours(ms.Tensor(ids)).asnumpy()
    if hf is not None:
        with torch.no_grad(), one_torch_thread():
            expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    else:
        expected = reference_forward(state, cfg, ids)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-4


def test_hf_native_omits_the_yarn_softmax_correction(tiny):
    """Why YaRN is checked against the reference: HF 4.57 scales scores by qk_head_dim ** -0.5 only."""
    import transformers

    ours, state, cfg, _ = tiny["yarn"]
    assert ours.config.softmax_scale() == pytest.approx(
        16 ** -0.5 * (0.1 * 0.8 * np.log(4.0) + 1.0) ** 2)
    hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    hf = transformers.DeepseekV2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(state)
    ids = np.array(_prompts([40], seed=1))
    with torch.no_grad(), one_torch_thread():
        native = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(native - reference_forward(state, cfg, ids)).max() > 1e-4  # fails the 1e-4 parity bar


@pytest.mark.parametrize("use_past", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches(tiny, variant, use_past):
    """32 greedy tokens identical with and without the latent KV cache."""
    ours = tiny[variant][0]
    prompt = _prompts([9], seed=2)[0]
    got = ours.generate([prompt], max_new_tokens=NEW_TOKENS, do_sample=False, use_past=use_past, eos_token_id=[])
    assert got[0].tolist() == _expected_greedy(tiny[variant], prompt)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_logits_match_reference(tiny, variant):
    """Every step of the cached decode (absorbed MLA over the latent cache, MoE expert gather) for a
    left-padded batch of three prompt lengths: logits equal DeepSeek's formulas (the reference, equal
    to HF where HF is right) on each row's own sequence; YaRN variants decode to 60 > 16 positions."""
    ours, state, cfg, _ = tiny[variant]
    prompts = _prompts([5, 12, 9], seed=7)
    sequences, logits = generate_with_logits(ours, prompts)
    error = max_step_error(prompts, sequences, logits, lambda ids: reference_forward(state, cfg, ids))
    assert error <= TOLERANCE, f"{variant}: max abs step-logit error {error:.2e} over {STEPS} steps"


def test_static_cache_decode_step_logits_match_reference(tiny):
    """generate(cache_implementation="static") (one static decode graph over the latent cache rounded
    up to 64 slots): every step's logits equal DeepSeek's formulas."""
    ours, state, cfg, _ = tiny["full"]
    prompts = _prompts([5, 12, 9], seed=7)
    sequences, logits = generate_with_logits(ours, prompts, cache_implementation="static")
    error = max_step_error(prompts, sequences, logits, lambda ids: reference_forward(state, cfg, ids))
    assert error <= TOLERANCE, f"static cache: max abs step-logit error {error:.2e} over {STEPS} steps"


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_decode_with_more_assignments_than_experts_matches_reference(tiny, cache_implementation):
    """Six rows x top-2 = 12 assignments >= the 12 experts: the static decode graph runs every expert
    once on the batch (weights read in place) instead of gathering 12 expert copies, the dynamic one
    gathers; every step's logits equal DeepSeek's formulas either way."""
    ours, state, cfg, _ = tiny["full"]
    assert 6 * cfg["num_experts_per_tok"] >= cfg["n_routed_experts"]
    prompts = _prompts([5, 12, 9, 3, 7, 10], seed=11)
    sequences, logits = generate_with_logits(ours, prompts, steps=16, cache_implementation=cache_implementation)
    error = max_step_error(prompts, sequences, logits, lambda ids: reference_forward(state, cfg, ids))
    assert error <= TOLERANCE, f"{cache_implementation}: max abs step-logit error {error:.2e}"


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_decode_without_the_cpu_kernel_matches_reference(tmp_path, monkeypatch, cache_implementation):
    """MINDFORMERS_EXT_CPU_KERNELS=0 (as on a machine without a C++ compiler): the decode gathers the
    chosen experts' weights instead of reading them in place; every step's logits still equal
    DeepSeek's formulas."""
    path = str(tmp_path / "full")
    state = make_tiny_deepseek2(path, "full", seed=1)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    monkeypatch.setenv("MINDFORMERS_EXT_CPU_KERNELS", "0")
    ours = load_hf_model(path, use_past=True)
    assert all(cell.indexed_matmul is None for _, cell in ours.cells_and_names() if hasattr(cell, "indexed_matmul"))
    prompts = _prompts([5, 12], seed=7)
    sequences, logits = generate_with_logits(ours, prompts, cache_implementation=cache_implementation)
    error = max_step_error(prompts, sequences, logits, lambda ids: reference_forward(state, cfg, ids))
    assert error <= TOLERANCE, f"{cache_implementation}: max abs step-logit error {error:.2e} over {STEPS} steps"


def test_step_without_cpu_kernels_exports_to_mindir(tiny, tmp_path):
    """A decode step built with cpu_kernels=False holds stock operators only (the MoE gathers the chosen
    experts' weights, the cache is written functionally): its MindIR export names no AOT operator (their
    compiled library, cpu_kernels-<key>.so, which exists on this machine only). The same model's generate
    keeps its kernels (compiled before and after)."""
    ours = tiny["full"][0]
    prompts = _prompts([5, 9], seed=12)
    before = ours.generate(prompts, max_new_tokens=4, do_sample=False, eos_token_id=[])
    spec = ours.cache_spec()
    step = CachedStep(ours, spec, ms.float32, decode=True, cpu_kernels=False)
    step.set_train(False)
    step.prepare()
    ms.export(step, *cached_step_inputs(spec, ms.float32), file_name=str(tmp_path / "decode"), file_format="MINDIR")
    with open(tmp_path / "decode.mindir", "rb") as f:
        graph = f.read()
    assert b"RoutedExperts" in graph  # the MoE's decode is in the exported graph (its scope names)
    assert b"Custom" not in graph and b"cpu_kernels-" not in graph
    after = ours.generate(prompts, max_new_tokens=4, do_sample=False, eos_token_id=[], cache_implementation="static")
    assert ours._steps()["static_decode"].in_place  # pylint: disable=protected-access
    assert [a.tolist() for a in after] == [b.tolist() for b in before]


def test_left_padded_batch_matches_single_prompts(tiny):
    ours = tiny["full"][0]
    prompts = _prompts([5, 14], seed=3)
    got = ours.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, use_past=True, eos_token_id=[])
    for prompt, row in zip(prompts, got):
        assert row.tolist() == _expected_greedy(tiny["full"], prompt)


def test_kv_cache_holds_the_latent_only(tiny):
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (16 + 8 = 24 here;
    V2: 512 + 64 = 576), not 2 x heads x head_dim of full keys and values."""
    ours, _, cfg, _ = tiny["full"]
    batch, width = 2, 7
    ids = np.array(_prompts([width] * batch, seed=4), dtype=np.int32)
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width)).copy()
    cache = KVCache(ours.cache_spec(), batch, width)
    mask, slot = cache.prefill(np.ones((batch, width), bool))
    cache.take_step_output(ours._step("prefill")(ms.Tensor(ids), ms.Tensor(pos), mask, slot, *cache.tensors))
    caches = cache.tensors
    assert len(caches) == cfg["num_hidden_layers"]  # one tensor per layer (no separate K and V)
    per_token_layer = sum(c.nbytes for c in caches) / (batch * width * len(caches)) / 4  # float32 values
    assert per_token_layer == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 24
    assert all(tuple(c.shape) == (batch, 1, width, 24) and c.asnumpy().any() for c in caches)
    full_kv = cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"])
    assert per_token_layer < full_kv  # 24 vs 112 values
    # the real V2 shapes: 576 values per token and layer against 40960 for decompressed K and V
    v2 = DeepseekV2Config.from_preset("deepseek-v2")
    assert v2.kv_lora_rank + v2.qk_rope_head_dim == 576
    assert v2.num_heads * (v2.qk_head_dim + v2.v_head_dim) == 40960


def test_rope_row_permutation_equals_interleaved_rotation():
    """DeepSeek's checkpoints rotate (x0, x1), (x2, x3) ... pairs; after the converter's row permutation
    our rotate-half RoPE gives the same q . k (the permuted vectors themselves differ)."""
    from mindformers_ext.convert.maps.deepseek2 import rope_permutation

    rng = np.random.default_rng(0)
    dim, pos_q, pos_k = 8, 5, 2
    inv_freq = 1.0 / 10000 ** (np.arange(0, dim, 2) / dim)
    q, k = rng.normal(size=dim), rng.normal(size=dim)

    def interleaved(x, pos):
        z = (x[0::2] + 1j * x[1::2]) * np.exp(1j * pos * inv_freq)
        return np.stack([z.real, z.imag], -1).reshape(-1)

    def rotate_half(x, pos):
        angle = np.concatenate([pos * inv_freq] * 2)
        return x * np.cos(angle) + np.concatenate([-x[dim // 2:], x[:dim // 2]]) * np.sin(angle)

    perm = rope_permutation(dim)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    expected = interleaved(q, pos_q) @ interleaved(k, pos_k)
    assert rotate_half(q[perm], pos_q) @ rotate_half(k[perm], pos_k) == pytest.approx(expected, rel=1e-12)
    assert abs(rotate_half(q, pos_q) @ rotate_half(k, pos_k) - expected) > 1e-3  # without it: wrong


def test_training_loss_adds_the_sequence_aux_loss(tiny):
    """Train mode: cross-entropy of the shifted labels + alpha x balance loss of every MoE layer."""
    ours, state, cfg, _ = tiny["full"]
    ids = np.array(_prompts([17, 17], seed=6), dtype=np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    ours.set_train(True)
    try:
        loss = float(ours(ms.Tensor(ids), ms.Tensor(labels)).asnumpy())
    finally:
        ours.set_train(False)
    logits, aux = reference_forward(state, cfg, ids[:, :-1], with_aux=True)
    assert aux > 0.0
    assert loss == pytest.approx(cross_entropy(logits, labels[:, 1:]) + aux, abs=1e-5)


# ------------------------------------------------------------------------------------------ the MoE
def _router(topk_method, norm=False, scale=1.0, **kw):
    from research.deepseek2.deepseek2 import TopKRouter

    router = TopKRouter(8, 8, 2, topk_method, routed_scaling_factor=scale, norm_topk_prob=norm, **kw)
    router.dense.weight.set_data(ms.Tensor(np.eye(8, dtype=np.float32)))  # logits = the input itself
    return router


def test_routing_on_a_hand_computed_case():
    """Logits [3.0, 0.0, 0.1, 0.2, 2.9, 2.95, 2.8, 0.0] in 4 groups of 2: greedy picks experts 0 and 5;
    group-limited with one group keeps group 0 only (its best, 3.0, beats group 2's 2.95): experts 0, 1;
    with two groups: groups 0 and 2, experts 0 and 5."""
    logits = np.array([[3.0, 0.0, 0.1, 0.2, 2.9, 2.95, 2.8, 0.0]], np.float32)
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    x = ms.Tensor(logits)

    def run(router):
        scores, idx, weights = router(x)
        order = np.argsort(idx.asnumpy()[0])
        return scores.asnumpy()[0], idx.asnumpy()[0][order].tolist(), weights.asnumpy()[0][order]

    scores, idx, weights = run(_router("greedy", scale=16.0))
    np.testing.assert_allclose(scores, probs, rtol=1e-6)
    assert idx == [0, 5]
    np.testing.assert_allclose(weights, probs[[0, 5]] * 16.0, rtol=1e-6)
    _, idx, weights = run(_router("group_limited_greedy", scale=2.0, n_group=4, topk_group=1))
    assert idx == [0, 1]
    np.testing.assert_allclose(weights, probs[[0, 1]] * 2.0, rtol=1e-6)
    _, idx, _ = run(_router("group_limited_greedy", n_group=4, topk_group=2))
    assert idx == [0, 5]
    # norm_topk_prob: the two weights sum to 1 and DeepSeek-V2 applies no routed scale on that path
    _, idx, weights = run(_router("greedy", norm=True, scale=16.0))
    np.testing.assert_allclose(weights, probs[[0, 5]] / probs[[0, 5]].sum(), rtol=1e-6)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_matches_a_direct_computation(seq_aux):
    """A DeepSeekMoE layer in training returns alpha x sum f_i P_i (per sequence or over all tokens),
    computed here with numpy from its own router's scores; its output matches an expert-by-expert sum."""
    from research.deepseek2.deepseek2 import DeepSeekMoE

    rng = np.random.default_rng(1)
    batch, seq, hidden, experts, k, alpha = 2, 5, 16, 6, 2, 0.3
    moe = DeepSeekMoE(hidden, experts, k, 12, 1, "greedy", aux_loss_alpha=alpha, seq_aux=seq_aux,
                      routed_scaling_factor=1.5)
    moe.router.dense.weight.set_data(ms.Tensor(rng.normal(size=(experts, hidden)).astype(np.float32)))
    x = rng.normal(size=(batch, seq, hidden)).astype(np.float32)
    moe.set_train(True)
    out, aux = moe(ms.Tensor(x))
    moe.set_train(False)
    w = moe.router.dense.weight.asnumpy()
    logits = x.reshape(-1, hidden) @ w.T
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    idx, weights = route(torch.tensor(scores), dict(num_experts_per_tok=k, routed_scaling_factor=1.5))
    counts = np.zeros((batch, experts))
    for b in range(batch):
        for e in idx.view(batch, -1)[b].tolist():
            counts[b, e] += 1
    if seq_aux:
        f = counts / (seq * k / experts)
        expected = alpha * (f * scores.reshape(batch, seq, experts).mean(1)).sum(1).mean()
    else:
        expected = alpha * (scores.mean(0) * counts.sum(0) / (batch * seq * k) * experts).sum()
    assert float(aux.asnumpy()) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(aux_loss(torch.tensor(scores), idx, batch, seq,
                                              dict(num_experts_per_tok=k, aux_loss_alpha=alpha, seq_aux=seq_aux)))

    def silu(v):
        return v / (1 + np.exp(-v))
    w1, w2, w3 = (moe.ffn.w1.asnumpy(), moe.ffn.w2.asnumpy(), moe.ffn.w3.asnumpy())
    tokens = x.reshape(-1, hidden)
    routed = np.zeros_like(tokens)
    for t in range(len(tokens)):
        for slot in range(k):
            e = int(idx[t, slot])
            routed[t] += float(weights[t, slot]) * (w2[e] @ (silu(w1[e] @ tokens[t]) * (w3[e] @ tokens[t])))
    shared = moe.shared_experts
    sw1, sw2, sw3 = shared.w1.weight.asnumpy(), shared.w2.weight.asnumpy(), shared.w3.weight.asnumpy()
    routed += (silu(tokens @ sw1.T) * (tokens @ sw3.T)) @ sw2.T
    np.testing.assert_allclose(out.asnumpy().reshape(-1, hidden), routed, rtol=1e-4, atol=1e-6)
    # the decode path (gathering only the chosen experts) gives the same output
    np.testing.assert_allclose(moe(ms.Tensor(x), True)[0].asnumpy(), out.asnumpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ config
def test_presets_and_upstream_moe_config():
    v2 = DeepseekV2Config.from_preset("deepseek-v2")
    assert (v2.hidden_size, v2.num_layers, v2.num_heads, v2.q_lora_rank, v2.kv_lora_rank) == (5120, 60, 128, 1536, 512)
    assert (v2.n_routed_experts, v2.n_shared_experts, v2.num_experts_per_tok, v2.n_group, v2.topk_group) == \
        (160, 2, 6, 8, 3)
    assert v2.routed_scaling_factor == 16.0 and v2.topk_method == "group_limited_greedy"
    assert v2.rotary_scaling()["attention_factor"] == pytest.approx(1.0)  # mscale == mscale_all_dim
    lite = DeepseekV2Config.from_preset("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.n_routed_experts == 64 and lite.topk_method == "greedy"
    assert [lite.is_moe_layer(i) for i in range(3)] == [False, True, True]
    # an upstream MindFormers moe_config section fills what model_config leaves unset
    cfg = DeepseekV2Config(num_layers=2, moe_config=dict(expert_num=32, num_experts_chosen=4, shared_expert_num=1,
                                                         routed_scaling_factor=2.0, topk_method="greedy",
                                                         moe_intermediate_size=64, first_k_dense_replace=0,
                                                         aux_loss_types=["expert"], aux_loss_factors=[0.01]),
                           routed_scaling_factor=3.0)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (32, 4, 1)
    assert cfg.routed_scaling_factor == 3.0 and cfg.aux_loss_alpha == 0.01 and cfg.first_k_dense_replace == 0
    assert DeepseekV2Config(moe_config=None).n_routed_experts == 160  # MindFormers' one-expert default ignored
    with pytest.raises(ValueError, match="topk_group"):
        DeepseekV2Config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="extend_method YARN needs scaling_factor"):
        DeepseekV2Config(extend_method="YARN", scaling_factor=1.0)
    dense = DeepseekV2Config(num_layers=2, n_routed_experts=None)
    assert not any(dense.is_moe_layer(i) for i in range(2))


def test_hf_config_translation_round_trips():
    """Our config -> HF config.json -> our config keeps every preset field (YaRN dict included)."""
    from research.deepseek2 import PRESETS
    from research.deepseek2.deepseek2_hf_config import deepseek2_config_to_hf, deepseek2_kwargs_from_hf

    for name in ("deepseek-v2", "deepseek-v2-lite"):
        cfg = DeepseekV2Config.from_preset(name)
        hf = deepseek2_config_to_hf(cfg)
        assert hf["model_type"] == "deepseek_v2" and hf["rope_scaling"]["type"] == "yarn"
        again = DeepseekV2Config(**deepseek2_kwargs_from_hf(hf))
        for key in PRESETS[name]:
            assert getattr(again, key) == getattr(cfg, key), (name, key)
    with pytest.raises(KeyError, match="missing keys"):
        deepseek2_kwargs_from_hf({"hidden_size": 8}, "x/config.json")


@pytest.mark.parametrize("variant", [v if v in ("full", "lite") else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])  # YaRN changes no cache code: slow tier
def test_paged_cache_matches_contiguous_cache(tiny, variant):
    """MLA's latent + rope key in the serving engine's paged cache (absorbed decode over gathered
    blocks, MoE expert gather) gives the contiguous cache's greedy ids and step logits within 2e-5,
    rows 0 and 1 prefilled together, row 2 joining at step 3, decode batches padded. (2e-5, not 1e-5:
    the contiguous cache itself differs by up to 1.0e-5 between a prompt run alone and in the
    left-padded batch, float32 rounding of other matmul shapes; measured paged vs contiguous
    1.0e-5 / 1.1e-5, logits up to 4.4.)"""
    ours = tiny[variant][0]
    prompts = _prompts([5, 12, 9], seed=4)
    assert_paged_matches_contiguous(ours, prompts, tolerance=2e-5)


def test_capacity_factor_comes_from_model_config_or_upstream_moe_config():
    from mindformers.modules.transformer.moe import MoEConfig

    from research.deepseek2.deepseek2 import RoutedExperts

    upstream = dict(expert_num=32, num_experts_chosen=4, n_group=4, topk_group=2)
    assert DeepseekV2Config(num_layers=2).capacity_factor is None  # ours: nothing dropped
    # a moe_config section gets upstream MoEConfig's default, as a dict and as MindFormers' object
    default = MoEConfig().capacity_factor
    assert DeepseekV2Config(num_layers=2, moe_config=upstream).capacity_factor == default
    assert DeepseekV2Config(num_layers=2, moe_config=MoEConfig(**upstream)).capacity_factor == default
    assert DeepseekV2Config(num_layers=2, moe_config=dict(upstream, capacity_factor=2.0)).capacity_factor == 2.0
    assert DeepseekV2Config(num_layers=2, capacity_factor=1.5, moe_config=dict(upstream, capacity_factor=2.0)
                            ).capacity_factor == 1.5
    with pytest.raises(ValueError, match=r"capacity_factor \(0\) must be > 0"):
        DeepseekV2Config(num_layers=2, capacity_factor=0)
    # model parallel runs every expert on every token: the factor cannot drop anything, and says so
    with pytest.warns(UserWarning, match="capacity_factor 1.25: with expert / model parallel .* no token is dropped"):
        RoutedExperts(8, 16, 12, top_k=2, capacity_factor=1.25).shard(1, 2)


def test_eval_loss_is_the_cross_entropy_alone(tiny):
    """run_mode eval's loss: DeepSeek's cross-entropy, without the balance loss training adds and without
    the drops a capacity_factor makes in training (here 0.5: half the fair share per expert)."""
    from mindformers_ext.counters import COUNTERS
    from mindformers_ext.hf_loader import build_from_hf_config
    from mindformers_ext.runner.train import loss_without_training_behaviour

    ours, state, cfg, _ = tiny["full"]
    ids = np.array(_prompts([15, 15], seed=8), dtype=np.int32)
    labels = ids.copy()
    labels[:, :3] = -100
    logits, aux = reference_forward(state, cfg, ids[:, :-1], with_aux=True)
    assert aux > 0.0
    losses, counts = [], []
    for mode in ("train", "eval"):  # a model each: a compiled graph keeps the modes it was compiled in
        model = build_from_hf_config(cfg, capacity_factor=0.5)[0]
        ms.load_param_into_net(model, dict(ours.parameters_and_names()), strict_load=True)
        if mode == "train":
            model.set_train(True)
        else:
            loss_without_training_behaviour(model)
        losses.append(float(model(ms.Tensor(ids), ms.Tensor(labels)).asnumpy()))
        counts.append(sum(COUNTERS[cell.dropped_key].asnumpy() for _, cell in model.cells_and_names()
                          if getattr(cell, "dropped_key", None)))
    expected = cross_entropy(logits, labels[:, 1:])
    assert losses[1] == pytest.approx(expected, abs=1e-5)
    np.testing.assert_array_equal(counts[1], [0, 0])
    # the same weights in training: assignments dropped and the balance loss added
    assert counts[0][0] > 0 and abs(losses[0] - (expected + aux)) > 1e-4
