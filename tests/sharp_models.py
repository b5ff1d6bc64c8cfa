"""Sharp tiny reference models: peaked attention and hidden states far from zero (not a test module).

HF's random init (std 0.02) gives tiny models nearly uniform attention (score std about 0.16), so a
wrong softmax scale, rotary frequency or routing weight barely moves their logits. :func:`sharpen`
re-initialises a tiny HF model so that every linear map keeps unit variance (std 1 / sqrt(fan_in)),
embeddings have std 0.5 and MoE routers are decisive, then scales the query and key projections
until the pre-softmax attention scores have std :data:`TARGET_STD`. Scaling q by ``a`` and k by
``a`` scales every score by ``a ** 2`` exactly (biases and the rope parts included), so one
measurement fixes the factor. :func:`attention_score_std` measures the scores through HF's own
attention modules (a registered attention function that records ``q @ k^T * scaling`` and then
runs sdpa), so it checks what the reference model really computes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import numpy as np

TARGET_STD = 3.0  # fixtures assert >= MIN_STD after sharpening
MIN_STD = 2.0
MIN_HIDDEN_STD = 0.3

_RECORDED: list = []


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    k = key
    if k.shape[1] != query.shape[1]:  # GQA / MQA: repeat the shared key heads
        k = k.repeat_interleave(query.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
    q_len, k_len = scores.shape[-2:]
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    _RECORDED.append(scores[..., causal].detach().flatten())
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@contextlib.contextmanager
def _recording(model) -> Iterator[list]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("score_probe", _probe_attention)
    AttentionMaskInterface.register("score_probe", sdpa_mask)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    before = {key: cfg._attn_implementation for key, cfg in configs.items()}
    for cfg in configs.values():
        cfg._attn_implementation = "score_probe"
    _RECORDED.clear()
    try:
        yield _RECORDED
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = before[key]


def _random_ids(model, batch: int = 2, seq: int = 24, seed: int = 0):
    import torch

    rng = np.random.RandomState(seed)
    return torch.tensor(rng.randint(3, model.config.vocab_size, size=(batch, seq)), dtype=torch.long)


def attention_score_std(model, seed: int = 0) -> float:
    """Std of the causal pre-softmax attention scores of ``model`` on random prompts (all layers, heads)."""
    import torch

    with torch.no_grad(), _recording(model) as recorded:
        model(_random_ids(model, seed=seed), use_cache=False)
        return float(torch.cat(recorded).std())


def hidden_state_std(model, seed: int = 0) -> float:
    """Std of the residual stream after the second-to-last decoder layer on random prompts (HF's last
    hidden state is taken after the final norm, which would hide a collapsed stream)."""
    import torch

    with torch.no_grad():
        out = model(_random_ids(model, seed=seed), output_hidden_states=True, use_cache=False)
    return float(out.hidden_states[-2].std())


def _reinit(model, router_std: float) -> None:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, module.in_features ** -0.5)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1)
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, 0.5)
        elif name.endswith("mlp.gate") and hasattr(module, "weight"):  # DeepSeek's router (a bare Parameter)
            module.weight.normal_(0.0, router_std * module.weight.shape[-1] ** -0.5)
        if "norm" in name.split(".")[-1] or name.split(".")[-1].startswith("ln"):
            for p in module.parameters(recurse=False):  # norms at 1 / 0 would hide a swapped weight
                p.normal_(1.0 if p is getattr(module, "weight", None) else 0.0, 0.1)


def _llama_qk(model, a: float) -> None:
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.mul_(a)
            if proj.bias is not None:
                proj.bias.mul_(a)


def _bigcode_qk(model, a: float) -> None:
    cfg = model.config
    embed, head_dim = cfg.n_embd, cfg.n_embd // cfg.n_head
    for block in model.transformer.h:
        c_attn = block.attn.c_attn
        if cfg.multi_query:  # rows: q (embed), k (head_dim), v (head_dim)
            rows = slice(0, embed + head_dim)
            c_attn.weight[rows].mul_(a)
            c_attn.bias[rows].mul_(a)
        else:  # rows per head: q, k, v of head_dim each
            w = c_attn.weight.view(cfg.n_head, 3, head_dim, embed)
            b = c_attn.bias.view(cfg.n_head, 3, head_dim)
            w[:, :2].mul_(a)
            b[:, :2].mul_(a)


def _deepseek2_qk(model, a: float) -> None:
    cfg = model.config
    nope, vdim, kv_lora = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for layer in model.model.layers:
        attn = layer.self_attn
        q = attn.q_b_proj if cfg.q_lora_rank else attn.q_proj
        q.weight.mul_(a)  # q_nope and q_pe
        attn.kv_a_proj_with_mqa.weight[kv_lora:].mul_(a)  # k_pe (not normalised)
        kv_b = attn.kv_b_proj.weight.view(cfg.num_attention_heads, nope + vdim, kv_lora)
        kv_b[:, :nope].mul_(a)  # k_nope rows of every head


QK_SCALERS: dict[str, Callable] = {"llama": _llama_qk, "gpt_bigcode": _bigcode_qk, "deepseek_v2": _deepseek2_qk}


def sharpen(model, router_std: float = 3.0) -> float:
    """Re-initialise ``model`` (an HF causal LM, in place) as described in the module docstring.

    Returns the attention score std reached (about :data:`TARGET_STD`).
    """
    import torch

    scale_qk = QK_SCALERS[model.config.model_type]
    with torch.no_grad():
        _reinit(model, router_std)
        std = attention_score_std(model)
        scale_qk(model, math.sqrt(TARGET_STD / std))
    return attention_score_std(model)


def assert_sharp(model) -> None:
    """What the sharp fixtures promise: peaked attention, hidden states far from zero."""
    std = attention_score_std(model, seed=1)
    assert std >= MIN_STD, f"attention score std {std:.3f} < {MIN_STD}: the reference model is not sharp"
    hidden = hidden_state_std(model, seed=1)
    assert hidden >= MIN_HIDDEN_STD, f"hidden state std {hidden:.3f} < {MIN_HIDDEN_STD}"
