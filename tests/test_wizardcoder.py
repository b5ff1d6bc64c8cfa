"""WizardCoder / GPT-BigCode model against HF GPTBigCodeForCausalLM on the same weights, plus its config,
registration and the 15B YAML's parallel layout."""
import os

import numpy as np
import pytest
import torch
import transformers

import mindspore as ms
from mindformers_ext import load_hf_model
from research.wizardcoder import WizardCoderConfig, WizardCoderForCausalLM
from decode_steps import STEPS, TOLERANCE, generate_with_logits, hf_rows, max_step_error, assert_paged_matches_contiguous
from sharp_models import assert_sharp
from wizardcoder_util import REPO, make_tiny_bigcode

NEW_TOKENS = 40
YAML_15B = os.path.join(REPO, "research", "wizardcoder", "run_wizardcoder.yaml")
# multi-query with exact GELU (WizardCoder); multi-head with tanh GELU and unscaled scores
VARIANTS = {
    "mq": dict(multi_query=True, activation_function="gelu"),
    "mha": dict(multi_query=False, activation_function="gelu_pytorch_tanh", scale_attn_weights=False),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{variant: (our model, HF model)}, built once for the module."""
    root = tmp_path_factory.mktemp("hf_bigcode")
    out = {}
    for i, (name, kwargs) in enumerate(VARIANTS.items()):
        path = make_tiny_bigcode(str(root / name), seed=i, **kwargs)
        ours = load_hf_model(path, use_past=True)
        ref = transformers.GPTBigCodeForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        assert_sharp(ref)
        out[name] = (ours, ref)
    return out


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab, size=n).tolist() for n in lengths]


def _hf_greedy(ref, prompt, new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt], dtype=torch.long)
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(pairs, variant):
    ours, ref = pairs[variant]
    assert isinstance(ours, WizardCoderForCausalLM)
    assert ours.config.multi_query == VARIANTS[variant]["multi_query"]
    ids = np.array(_prompts(ours.config.vocab_size, [23, 23], seed=1), dtype=np.int32)
    logits = ours(ms.Tensor(ids)).asnumpy()
    with torch.no_grad():
        expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_logits_match_hf(pairs, variant):
    """Every cached decode step (MQA: one shared K/V head in the cache; MHA) for a left-padded batch of
    three prompt lengths: logits equal HF's on each row's own sequence."""
    ours, ref = pairs[variant]
    prompts = _prompts(ours.config.vocab_size, [5, 12, 9], seed=3)
    sequences, logits = generate_with_logits(ours, prompts)
    error = max_step_error(prompts, sequences, logits, hf_rows(ref))
    assert error <= TOLERANCE, f"{variant}: max abs step-logit error {error:.2e} over {STEPS} steps"


def test_static_cache_decode_step_logits_match_hf(pairs):
    """generate(cache_implementation="static") (one static decode graph, the MQA cache rounded up to
    64 slots): every step's logits for the left-padded batch equal HF's."""
    ours, ref = pairs["mq"]
    prompts = _prompts(ours.config.vocab_size, [5, 12, 9], seed=3)
    sequences, logits = generate_with_logits(ours, prompts, cache_implementation="static")
    error = max_step_error(prompts, sequences, logits, hf_rows(ref))
    assert error <= TOLERANCE, f"static cache: max abs step-logit error {error:.2e} over {STEPS} steps"


@pytest.mark.parametrize("use_past", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_generate(pairs, variant, use_past):
    ours, ref = pairs[variant]
    prompt = _prompts(ours.config.vocab_size, [9], seed=2)[0]
    got = ours.generate([prompt], max_new_tokens=NEW_TOKENS, do_sample=False, use_past=use_past, eos_token_id=[])
    assert got[0].tolist() == _hf_greedy(ref, prompt)


@pytest.mark.parametrize("use_past", [True, False])
def test_padded_batch_matches_single_prompts_and_hf_batch(pairs, use_past):
    ours, ref = pairs["mq"]
    prompts = _prompts(ours.config.vocab_size, [5, 14], seed=3)
    got = ours.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, use_past=use_past, eos_token_id=[])
    for prompt, row in zip(prompts, got):
        assert row.tolist() == _hf_greedy(ref, prompt)
    # HF on the left-padded batch (positions from the attention mask) gives the same ids
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf_batch = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    for row, hf_row in zip(got, hf_batch[:, width:].tolist()):
        assert row.tolist()[-NEW_TOKENS:] == hf_row


def test_kv_cache_holds_one_head_for_multi_query(pairs):
    """The cache: K and V of (batch, 1, capacity, head_dim) per layer for multi-query, one per head
    otherwise; prefill fills the prompt's slots and leaves the rest zero."""
    from mindformers_ext.cache import KVCache

    for variant, heads in (("mq", 1), ("mha", 4)):
        ours, _ = pairs[variant]
        ids = np.array(_prompts(ours.config.vocab_size, [7, 7], seed=5), dtype=np.int32)
        pos = np.tile(np.arange(7, dtype=np.int32), (2, 1))
        cache = KVCache(ours.cache_spec(), 2, 10)
        mask, slot = cache.prefill(np.ones((2, 7), bool))
        prefill = ours._step("prefill")  # pylint: disable=protected-access
        cache.take_step_output(prefill(ms.Tensor(ids), ms.Tensor(pos), mask, slot, *cache.tensors))
        caches = [c.asnumpy() for c in cache.tensors]
        assert len(caches) == 2 * ours.config.num_layers
        assert all(c.shape == (2, heads, 10, ours.config.head_dim) for c in caches), variant
        assert all(np.abs(c[:, :, :7]).min(axis=-1).max() > 0 and not c[:, :, 7:].any() for c in caches)


def test_parameters_tied_head_and_names(pairs):
    ours, _ = pairs["mq"]
    names = {p.name for p in ours.get_parameters()}
    assert ours.lm_head.weight is ours.model.tok_embeddings.embedding_weight
    assert "lm_head.weight" not in names and "model.tok_embeddings.embedding_weight" in names
    assert {"model.layers.0.attention.q_attn.weight", "model.layers.0.attention.kv_attn.weight",
            "model.position_embeddings.embedding_weight", "model.norm_out.bias"} <= names
    assert ours.model.layers[0].attention.kv_attn.weight.shape == (2 * 16, 64)  # one key + one value head
    mha, _ = pairs["mha"]
    assert "model.layers.1.attention.c_attn.weight" in {p.name for p in mha.get_parameters()}


def test_generate_checks_the_position_table(pairs):
    ours, _ = pairs["mq"]
    with pytest.raises(ValueError, match="max_position_embedding"):
        ours.generate([[5] * 100], max_new_tokens=40)


def test_config_presets_upstream_names_and_hf_round_trip():
    from mindformers_ext.models.gpt_bigcode_config import gpt_bigcode_config_to_hf, gpt_bigcode_kwargs_from_hf

    cfg = WizardCoderConfig()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.n_position, cfg.vocab_size) == (6144, 40, 48, 8192,
                                                                                                 49153)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.seq_length, cfg.hidden_act) == (0, 49152, 2048, "gelu")
    assert cfg.kv_heads == 1 and cfg.intermediate_size == 4 * 6144 and cfg.gelu_approximate == "none"
    star = WizardCoderConfig.from_preset("starcoder-15b")
    assert star.vocab_size == 49152 and star.gelu_approximate == "tanh"
    # the seed's YAML spellings
    seed = WizardCoderConfig(embedding_size=64, n_position=256, num_layers=2, num_heads=4, expand_ratio=2,
                             eos_token=0, pad_token=7, layernorm_dtype="float32", softmax_dtype="float16",
                             hidden_dropout_prob=0.1, use_seq_parallel=True)
    assert (seed.hidden_size, seed.intermediate_size, seed.pad_token_id, seed.softmax_compute_type) == (
        64, 128, 7, "float16")
    assert seed.max_position_embedding == 256
    back = gpt_bigcode_kwargs_from_hf(gpt_bigcode_config_to_hf(cfg))
    for key, value in back.items():
        if key != "seq_length":
            assert getattr(cfg, key) == value, key
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        gpt_bigcode_kwargs_from_hf({**gpt_bigcode_config_to_hf(cfg), "activation_function": "relu"})


def test_registered_names_resolve():
    from mindformers.tools.register import MindFormerModuleType as T, MindFormerRegister as R

    for kind, name in ((T.MODELS, "WizardCoderForCausalLM"), (T.MODELS, "WizardCoderLMHeadModel"),
                       (T.CONFIG, "WizardCoderConfig"), (T.TOKENIZER, "WizardCoderTokenizer"),
                       (T.PROCESSOR, "WizardCoderProcessor")):
        assert R.is_exist(kind, name), name


def test_15b_yaml_passes_the_parallel_check_on_8_devices():
    """run_wizardcoder.yaml: the real shapes with the seed's dp 1 x mp 4 x pp 2; a bad layout fails."""
    from mindformers.tools.register import MindFormerConfig
    from mindformers_ext.parallel import ParallelCheckError, build_skeleton, check_parallel
    from mindformers_ext.parallel.yaml_check import check_yaml

    summary = check_yaml(YAML_15B, 8)
    assert "dp=1 mp=4 pp=2" in summary[0]
    mc = MindFormerConfig(YAML_15B).model.model_config
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.n_position, mc.vocab_size) == (6144, 40, 48, 8192, 49153)
    assert (mc.eos_token_id, mc.pad_token_id, mc.seq_length, mc.hidden_act, mc.multi_query) == (
        0, 49152, 2048, "gelu", True)
    # multi-head variant of the same shapes also splits 4 ways
    parallel = dict(data_parallel=1, model_parallel=4, pipeline_stage=2, micro_batch_num=8, vocab_emb_dp=True)
    mha = build_skeleton(WizardCoderForCausalLM, WizardCoderConfig(multi_query=False, parallel_config=parallel))
    assert "mp=4" in check_parallel(mha, 8)[0]
    # the 49153-row vocabulary does not split 4 ways: it is replicated instead (upstream's rule, issue 13)
    replicated = WizardCoderConfig(parallel_config={**parallel, "vocab_emb_dp": False})
    assert replicated.parallel_config.vocab_emb_dp is True
    assert "mp=4" in check_parallel(build_skeleton(WizardCoderForCausalLM, replicated), 8)[0]
    # a split that does not divide still fails: 48 heads over model parallel 5
    bad = build_skeleton(WizardCoderForCausalLM, WizardCoderConfig(parallel_config={**parallel, "model_parallel": 5}))
    with pytest.raises(ParallelCheckError, match=r"not divisible by its split 5"):
        check_parallel(bad, 10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paged_cache_matches_contiguous_cache(pairs, variant):
    """The serving engine's paged cache (multi-query: one K/V head per block row) gives the contiguous
    cache's greedy ids and step logits within 1e-5, rows 0 and 1 prefilled together,
    row 2 joining at step 3."""
    ours, _ = pairs[variant]
    prompts = _prompts(ours.config.vocab_size, [5, 12, 9], seed=4)
    assert_paged_matches_contiguous(ours, prompts)
