"""Training loss and gradients of every family against HF / torch (issue 9, item 6).

One batch per family in our fine-tuning format (``mindformers_ext/data/sft.py``): ``input_ids`` and
``labels`` of ``seq_length + 1`` tokens, aligned, right-padded with the pad id, ``labels = -100``
over the prompt and the padding. Our model in training mode takes ``(input_ids, labels)``, feeds
``input_ids[:, :-1]`` and scores ``labels[:, 1:]``; HF gets the same full-length sample with its
attention mask and ``labels`` (-100 where masked), which it shifts the same way. Checked:

* the loss within 1e-5 of HF's;
* one step's gradients (``mindspore.value_and_grad`` over our training forward) of the embedding,
  attention and MLP / expert weights within 1e-4 of torch's ``backward()``, names and layouts
  mapped through the converter's weight map (only plain renames / stacks are compared: DeepSeek-V2's
  ``kv2l`` / ``l2q_proj`` carry a rope row permutation and are left out).

DeepSeek-V2: our training loss is cross-entropy + the MoE layers' sequence-level balance loss
(``aux_loss_alpha``, DeepSeek's formula); HF 4.57's native class computes no aux loss. So our model
is compared twice: loaded with ``aux_loss_alpha=0`` against HF's plain loss, and as shipped (aux on)
against HF's cross-entropy plus the same balance loss written here in torch on HF's own router
inputs (hooks on every ``DeepseekV2MoEGate``), so its gradient path (router, hidden states) is
compared too. The balance loss counts every position of the sequence the model is fed, padding
included, as DeepSeek's code does; HF is then fed ``input_ids[:, :-1]`` without a padding mask so
that both sides route the same tokens.

The tiny HF models are the builders' sharp ones (unit-variance linear maps, peaked attention,
decisive routers) so that a small error moves the loss and gradients measurably; a test asserts it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import mindspore as ms
from conftest import make_tiny_llama
from deepseek2_reference import make_tiny_deepseek2, one_torch_thread
from mindformers_ext import load_hf_model
from mindformers_ext.convert.weight_map import get_weight_map
from mindformers_ext.convert.weight_map import fill, split_name
from sharp_models import MIN_STD, attention_score_std
from wizardcoder_util import make_tiny_bigcode

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
PAD = 0
# (real length, prompt length) of each sample; seq_length + 1 = 29 tokens per sample
SAMPLES = ((29, 7), (21, 5), (14, 9), (25, 3))
TOTAL = 29


# ------------------------------------------------------------------------------- batch and weights
def _batch(vocab: int, seed: int):
    """(input_ids, labels) int32 (B, TOTAL): right padding with PAD, labels -100 on prompt and padding."""
    rng = np.random.RandomState(seed)
    ids = np.full((len(SAMPLES), TOTAL), PAD, np.int32)
    labels = np.full((len(SAMPLES), TOTAL), -100, np.int32)
    for b, (length, prompt) in enumerate(SAMPLES):
        ids[b, :length] = rng.randint(3, vocab, size=length)
        labels[b, prompt:length] = ids[b, prompt:length]
    return ids, labels


def _sharp_reference(build, hf_class, tmp_path_factory, name):
    """HF dir of a sharp tiny model (the builders' default, tests/sharp_models.py) and the HF model
    (eval, eager attention)."""
    path = str(tmp_path_factory.mktemp(f"train_vs_hf_{name}") / "hf")
    build(path)
    return path, hf_class.from_pretrained(path, attn_implementation="eager").eval()


# -------------------------------------------------------------------------- ours vs HF, one family
def _hf_to_ours(wmap, hf_name: str):
    """(our parameter name, index into its stacking axis or None) for ``hf_name``; only layouts that
    are element-for-element renames (or one slice of a stacked tensor) qualify."""
    template, indices = split_name(hf_name)
    ours = wmap.names[template]
    if not isinstance(ours, str) or list(wmap.names.values()).count(ours) > 1:
        raise AssertionError(f"{hf_name}: split or concatenated ({ours}), not element-for-element")
    assert wmap.layouts.get(ours) is None, f"{hf_name}: a transformed layout ({ours})"
    if ours.count("{}") < len(indices):  # one of the stacked experts (the last index)
        return fill(ours, indices[:-1]), indices[-1]
    return fill(ours, indices), None


def _our_loss_and_grads(ours, param_names, ids, labels):
    params = dict(ours.parameters_and_names())
    ours.set_train(True)
    grad_fn = ms.value_and_grad(ours, None, [params[n] for n in param_names])
    loss, grads = grad_fn(ms.Tensor(ids), ms.Tensor(labels))
    return float(loss.asnumpy()), {n: g.asnumpy() for n, g in zip(param_names, grads)}


def _torch_grads(hf, loss, hf_names):
    hf.zero_grad(set_to_none=True)
    loss.backward()
    out = {}
    for name in hf_names:
        grad = hf.get_parameter(name).grad
        out[name] = np.zeros(tuple(hf.get_parameter(name).shape), np.float32) if grad is None else grad.numpy()
    return out


def _compare(wmap, hf_names, ours_loss, ours_grads, hf_loss, hf_grads):
    """{"loss": (ours, hf), hf_name: (ours grad, torch grad)} with ours mapped to HF's names."""
    result = {"loss": (ours_loss, hf_loss)}
    for name in hf_names:
        ours_name, index = _hf_to_ours(wmap, name)
        grad = ours_grads[ours_name]
        result[name] = (grad if index is None else grad[index], hf_grads[name])
    return result


def _run(hf, ours, wmap, hf_names, ids, labels):
    """Loss and named gradients on both sides: HF on the full sample with its padding mask and labels."""
    ours_names = sorted({_hf_to_ours(wmap, n)[0] for n in hf_names})
    ours_loss, ours_grads = _our_loss_and_grads(ours, ours_names, ids, labels)
    with one_torch_thread():
        ids_t = torch.tensor(ids, dtype=torch.long)
        out = hf(input_ids=ids_t, attention_mask=_real_mask(ids),
                 labels=torch.tensor(labels, dtype=torch.long), use_cache=False)
        hf_grads = _torch_grads(hf, out.loss, hf_names)
    return _compare(wmap, hf_names, ours_loss, ours_grads, float(out.loss.detach()), hf_grads)


def _real_mask(ids):
    """HF's attention mask: 1 on each sample's real tokens, 0 on its right padding."""
    mask = np.zeros(ids.shape, np.int64)
    for b, (length, _) in enumerate(SAMPLES):
        mask[b, :length] = 1
    return torch.tensor(mask)


# ---------------------------------------------------------------------------------------- fixtures
LLAMA = {"mha": dict(rope_theta=10000.0),
         "gqa": dict(rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0}, num_key_value_heads=2)}
LLAMA_WEIGHTS = ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight")
# wte is tied to the LM head on both sides: its gradient sums the input and the output use
BIGCODE_WEIGHTS = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.attn.c_proj.weight",
                   "transformer.h.0.mlp.c_proj.weight")
# layer 0 is dense, layers 1-2 are MoE (first_k_dense_replace = 1); experts.{e} are slices of our
# stacked feed_forward.ffn.w2 (every expert is compared, routed or not)
DS2_EXPERTS = 12
DS2_WEIGHTS = (("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.shared_experts.down_proj.weight",
                "model.layers.1.mlp.gate.weight")
               + tuple(f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(DS2_EXPERTS)))


@pytest.fixture(scope="module")
def llama_results(tmp_path_factory):
    out = {}
    for i, (variant, kw) in enumerate(LLAMA.items()):
        path, hf = _sharp_reference(lambda p, kw=kw, i=i: make_tiny_llama(p, seed=20 + i, **kw),
                                    transformers.LlamaForCausalLM, tmp_path_factory, f"llama_{variant}")
        ids, labels = _batch(hf.config.vocab_size, seed=i)
        ours = load_hf_model(path, use_past=False)
        out[variant] = dict(score_std=attention_score_std(hf),
                            cmp=_run(hf, ours, get_weight_map("deepseek"), LLAMA_WEIGHTS, ids, labels))
    return out


@pytest.fixture(scope="module")
def bigcode_results(tmp_path_factory):
    path, hf = _sharp_reference(lambda p: make_tiny_bigcode(p, seed=21, multi_query=True),
                                transformers.GPTBigCodeForCausalLM, tmp_path_factory, "bigcode_mqa")
    ids, labels = _batch(hf.config.vocab_size, seed=5)
    ours = load_hf_model(path, use_past=False)
    wmap = get_weight_map("wizardcoder").for_config(hf.config.to_dict())
    return {"mqa": dict(score_std=attention_score_std(hf), cmp=_run(hf, ours, wmap, BIGCODE_WEIGHTS, ids, labels))}


def _balance_loss_hooks(hf, store):
    """Forward hooks adding DeepSeek-V2's sequence balance loss of every MoE gate to ``store``
    (differentiable through the router scores, as in DeepSeek's code; the counts are constants)."""
    cfg = hf.config
    k, experts, alpha = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.aux_loss_alpha
    assert cfg.seq_aux

    def hook(gate, inputs, output):
        hidden = inputs[0]
        bsz, seq, dim = hidden.shape
        scores = F.linear(hidden.reshape(-1, dim).float(), gate.weight.float()).softmax(-1)
        idx = output[0].reshape(bsz, seq * k)
        counts = torch.zeros(bsz, experts).scatter_add_(1, idx, torch.ones(bsz, seq * k)) / (seq * k / experts)
        store.append((counts * scores.view(bsz, seq, experts).mean(1)).sum(1).mean() * alpha)

    return [layer.mlp.gate.register_forward_hook(hook) for layer in hf.model.layers if hasattr(layer.mlp, "gate")]


@pytest.fixture(scope="module")
def deepseek2_results(tmp_path_factory):
    path, hf = _sharp_reference(lambda p: make_tiny_deepseek2(p, "full", seed=22),
                                transformers.DeepseekV2ForCausalLM, tmp_path_factory, "deepseek2")
    assert hf.config.aux_loss_alpha > 0 and hf.config.seq_aux
    ids, labels = _batch(hf.config.vocab_size, seed=7)
    wmap = get_weight_map("deepseek2")
    out = {}
    # aux off on our side: HF's plain loss
    ours = load_hf_model(path, use_past=False, aux_loss_alpha=0.0)
    out["aux_off"] = dict(score_std=attention_score_std(hf), cmp=_run(hf, ours, wmap, DS2_WEIGHTS, ids, labels))
    # aux on (as shipped): HF's cross-entropy + the balance loss on the tokens our model is fed
    ours = load_hf_model(path, use_past=False)
    ours_names = sorted({_hf_to_ours(wmap, n)[0] for n in DS2_WEIGHTS})
    ours_loss, ours_grads = _our_loss_and_grads(ours, ours_names, ids, labels)
    aux: list = []
    handles = _balance_loss_hooks(hf, aux)
    # HF's nn.Embedding(padding_idx=pad_token_id) never gives the pad row a gradient; ours (like
    # MindFormers') has no such rule. The balance loss routes the padding positions too, so the pad
    # row does get a true gradient here: compare it with torch's without that rule.
    embed = hf.get_input_embeddings()
    padding_idx, embed.padding_idx = embed.padding_idx, None
    try:
        with one_torch_thread():
            logits = hf(input_ids=torch.tensor(ids[:, :-1], dtype=torch.long), use_cache=False).logits
            ce = hf.loss_function(logits=logits, labels=None, vocab_size=hf.config.vocab_size,
                                  shift_labels=torch.tensor(labels[:, 1:], dtype=torch.long))
            total = ce + sum(aux)
            hf_grads = _torch_grads(hf, total, DS2_WEIGHTS)
    finally:
        embed.padding_idx = padding_idx
        for handle in handles:
            handle.remove()
    out["aux_on"] = dict(cmp=_compare(wmap, DS2_WEIGHTS, ours_loss, ours_grads, float(total.detach()), hf_grads),
                         aux=float(sum(aux).detach()), moe_layers=len(aux))
    return out


FAMILIES = {"llama": "llama_results", "bigcode": "bigcode_results", "deepseek2": "deepseek2_results"}
CASES = [("llama", "mha"), ("llama", "gqa"), ("bigcode", "mqa"), ("deepseek2", "aux_off"), ("deepseek2", "aux_on")]


def _case(request, family, variant):
    return request.getfixturevalue(FAMILIES[family])[variant]


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family,variant", [c for c in CASES if c[1] != "aux_on"])
def test_reference_is_sharp(request, family, variant):
    """The re-initialised references have peaked attention (else a wrong scale would hardly show)."""
    std = _case(request, family, variant)["score_std"]
    assert std >= MIN_STD, f"attention-logit std {std:.3f} < {MIN_STD}"


@pytest.mark.parametrize("family,variant", CASES)
def test_loss_matches_hf(request, family, variant):
    ours, hf = _case(request, family, variant)["cmp"]["loss"]
    assert abs(ours - hf) <= LOSS_TOL, f"loss {ours!r} vs HF {hf!r}"


@pytest.mark.parametrize("family,variant", CASES)
def test_gradients_match_torch(request, family, variant):
    cmp = _case(request, family, variant)["cmp"]
    diffs = {name: float(np.abs(ours - ref).max()) for name, (ours, ref) in cmp.items() if name != "loss"}
    for name, (ours, ref) in cmp.items():
        if name != "loss":
            assert ours.shape == ref.shape, name
    bad = {name: d for name, d in diffs.items() if not d <= GRAD_TOL}
    assert not bad, f"gradients differ from torch's: {bad}"
    # the comparison means something: the embedding / attention / MLP gradients are not all ~0
    assert all(np.abs(ref).max() > 1e-3 for name, (_, ref) in cmp.items()
               if name != "loss" and ".experts." not in name)


def test_deepseek2_training_loss_includes_the_balance_loss(deepseek2_results):
    """Our shipped training loss = HF's cross-entropy + DeepSeek's balance loss of both MoE layers,
    and that term is not negligible against the tolerances (it changes loss and gradients)."""
    on, off = deepseek2_results["aux_on"], deepseek2_results["aux_off"]
    assert on["moe_layers"] == 2 and on["aux"] > 1e-3
    ce_on_fed_tokens = on["cmp"]["loss"][1] - on["aux"]
    assert on["cmp"]["loss"][0] - ce_on_fed_tokens == pytest.approx(on["aux"], abs=LOSS_TOL)
    assert abs(off["cmp"]["loss"][0] - ce_on_fed_tokens) <= LOSS_TOL  # same CE with the aux switched off
    router = "model.layers.1.mlp.gate.weight"
    assert np.abs(on["cmp"][router][0] - off["cmp"][router][0]).max() > 10 * GRAD_TOL


def test_some_expert_gradients_are_nonzero(deepseek2_results):
    """At least two routed experts of layer 1 get tokens, so the stacked-expert comparison bites."""
    cmp = deepseek2_results["aux_off"]["cmp"]
    live = [e for e in range(DS2_EXPERTS)
            if np.abs(cmp[f"model.layers.1.mlp.experts.{e}.down_proj.weight"][1]).max() > 1e-3]
    assert len(live) >= 2
