"""Tiny DeepSeek-V2 test models and an independent torch reference of DeepSeek's original formulas.

HF transformers 4.57's native ``DeepseekV2ForCausalLM`` omits two things of DeepSeek's own
``modeling_deepseek.py``: the YaRN softmax-scale correction ``yarn_get_mscale(factor,
mscale_all_dim) ** 2`` and ``norm_topk_prob`` (it always multiplies by ``routed_scaling_factor``);
it also ignores ``moe_layer_freq``. :func:`reference_forward` re-implements the original forward
pass from the formulas (interleaved RoPE permuted to rotate-half at run time as DeepSeek does,
YaRN cos/sin cache with its mscale, group-limited routing, sequence-level aux loss) straight on an
HF state dict, so configs that use those features are tested against it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np

# HF DeepseekV2Config fields of the tiny variants. "full": low-rank q, group-limited routing with
# routed scale 2.5 (DeepSeek-V2's structure); "lite": plain q projection, greedy, scale 1 (V2-Lite's).
# 12 experts: more than 10, so safetensors' string order of names (experts.10 before experts.2)
# differs from the expert order that conversion stacks in.
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=12, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=24,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=2.5, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            aux_loss_alpha=0.01, seq_aux=True, rms_norm_eps=1e-6)
LITE = dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
            mscale=0.9, mscale_all_dim=0.8)
VARIANTS = {
    "full": {},
    "lite": dict(LITE, num_hidden_layers=2),
    # YaRN with mscale != mscale_all_dim: cos/sin and the softmax scale both change
    "yarn": dict(rope_scaling=dict(YARN), max_position_embeddings=64, num_hidden_layers=2),
    # V2-Lite-like with YaRN given only mscale_all_dim (HF's cos/sin rule differs there), normalised
    # top-k weights (no routed scale) and an MoE layer every other layer
    "yarn_lite_norm": dict(LITE, rope_scaling=dict(YARN, mscale=None), max_position_embeddings=64,
                           norm_topk_prob=True, moe_layer_freq=2,
                           topk_method="group_limited_greedy", n_group=2, topk_group=1),
}
# variants whose semantics HF 4.57's native class implements exactly
HF_NATIVE = ("full", "lite")


def hf_config_dict(variant: str) -> dict:
    cfg = dict(TINY, **VARIANTS[variant])
    if cfg.get("rope_scaling") and cfg["rope_scaling"].get("mscale") is None:
        cfg["rope_scaling"] = {k: v for k, v in cfg["rope_scaling"].items() if k != "mscale"}
    return cfg


def make_tiny_deepseek2(path: str, variant: str, seed: int = 0) -> dict:
    """Save a tiny random DeepSeek-V2 checkpoint (model.safetensors + config.json) under ``path``.

    Returns its state dict (torch tensors). The weights come from HF's DeepseekV2ForCausalLM,
    re-initialised by :func:`sharp_models.sharpen` (peaked attention, unit scale activations,
    decisive routers, norm weights away from 1). Layers that ``moe_layer_freq`` makes dense in
    DeepSeek's own code (HF ignores it) get a dense MLP.
    """
    import os

    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = hf_config_dict(variant)
    config = transformers.DeepseekV2Config(**cfg)
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    from sharp_models import sharpen

    sharpen(model)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{i}.mlp."
        if i >= cfg["first_k_dense_replace"] and not is_moe_layer(cfg, i):
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):
                state[f"{prefix}{name}.weight"] = torch.randn(shape) * shape[1] ** -0.5
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return state


# ------------------------------------------------------------------------------------ reference
@contextlib.contextmanager
def one_torch_thread():
    """Tiny torch ops run far faster on one thread than on several that spin beside MindSpore's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_tables(cfg: dict, seq: int):
    """cos / sin (seq, rope) as DeepSeek's (Yarn)RotaryEmbedding caches them, and the softmax scale."""
    import torch

    dim, base = cfg["qk_rope_head_dim"], cfg.get("rope_theta", 10000.0)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    scale = (cfg["qk_nope_head_dim"] + dim) ** -0.5
    rs = cfg.get("rope_scaling")
    if rs:
        factor = rs["factor"]
        original = rs.get("original_max_position_embeddings", 4096)
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
        mscale, mscale_all_dim = rs.get("mscale", 1), rs.get("mscale_all_dim", 0)
        freq_extra = 1.0 / (base ** exponents)
        freq_inter = 1.0 / (factor * base ** exponents)

        def corr_dim(rot):
            return (dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(base))
        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        mask = 1.0 - ramp
        inv_freq = freq_inter * (1 - mask) + freq_extra * mask
        attn = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        if mscale_all_dim:
            scale = scale * yarn_get_mscale(factor, mscale_all_dim) ** 2
    else:
        inv_freq = 1.0 / (base ** exponents)
        attn = 1.0
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attn, emb.sin() * attn, scale


def _rope(x, cos, sin):
    """DeepSeek's apply_rotary_pos_emb on (B, H, S, d): interleaved pairs -> halves, then rotate-half."""
    import torch

    b, h, s, d = x.shape
    x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
    return x * cos + rotated * sin


def _rms(x, w, eps):
    import torch
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mlp(sd, prefix, x):
    import torch.nn.functional as F
    g = F.linear(x, sd[prefix + "gate_proj.weight"])
    return F.linear(F.silu(g) * F.linear(x, sd[prefix + "up_proj.weight"]), sd[prefix + "down_proj.weight"])


def route(scores, cfg: dict):
    """DeepSeek-V2 MoEGate top-k on softmax ``scores`` (N, E): (indices (N, k), weights (N, k))."""
    import torch

    n, e = scores.shape
    k = cfg["num_experts_per_tok"]
    if cfg.get("topk_method", "greedy") == "group_limited_greedy":
        groups = cfg["n_group"]
        group_scores = scores.view(n, groups, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=cfg["topk_group"], dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, groups, e // groups).reshape(n, -1)
        weights, idx = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=k, dim=-1, sorted=False)
    else:
        weights, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    if k > 1 and cfg.get("norm_topk_prob", False):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * cfg.get("routed_scaling_factor", 1.0)
    return idx, weights


def aux_loss(scores, idx, batch: int, seq: int, cfg: dict) -> float:
    """DeepSeek-V2's balance loss (``seq_aux`` or the token-level one) times ``aux_loss_alpha``."""
    import torch
    import torch.nn.functional as F

    e, k, alpha = scores.shape[1], cfg["num_experts_per_tok"], cfg.get("aux_loss_alpha", 0.001)
    idx = idx.view(batch, -1)
    if cfg.get("seq_aux", True):
        ce = torch.zeros(batch, e).scatter_add_(1, idx, torch.ones(batch, seq * k)).div_(seq * k / e)
        return float((ce * scores.view(batch, seq, -1).mean(dim=1)).sum(dim=1).mean() * alpha)
    fi = F.one_hot(idx.view(-1), num_classes=e).float().mean(0) * e
    return float((scores.mean(0) * fi).sum() * alpha)


def is_moe_layer(cfg: dict, i: int) -> bool:
    return (cfg.get("n_routed_experts") is not None and i >= cfg.get("first_k_dense_replace", 0)
            and i % (cfg.get("moe_layer_freq") or 1) == 0)


def fake_int8(x):
    """Symmetric int8 round trip over the last axis (scale max|x| / 127), in float32."""
    import torch

    scale = x.abs().amax(-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale) * scale


def reference_forward(state: dict, cfg: dict, ids: np.ndarray, with_aux: bool = False,
                      int8_from: Optional[int] = None):
    """Logits (B, S, V) float32 of DeepSeek-V2's original forward for unpadded ``ids`` (B, S); with
    ``with_aux`` also the summed balance loss over MoE layers. With ``int8_from`` the positions from
    there on attend over int8 round trips of every cache entry (normalised latent and rotated shared
    key), as tokens decoded over an int8 latent cache after a prefill of the first ``int8_from``."""
    import torch
    import torch.nn.functional as F

    sd = {k: v.float() for k, v in state.items()}
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    bsz, seq = ids_t.shape
    heads, nope, rope, vdim = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                               cfg["v_head_dim"])
    kv_lora, eps = cfg["kv_lora_rank"], cfg.get("rms_norm_eps", 1e-6)
    cos, sin, scale = _rope_tables(cfg, seq)
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    x = sd["model.embed_tokens.weight"][ids_t]
    total_aux = 0.0
    with torch.no_grad(), one_torch_thread():
        for i in range(cfg["num_hidden_layers"]):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            h = _rms(x, sd[p + "input_layernorm.weight"], eps)
            if cfg.get("q_lora_rank"):
                q = F.linear(_rms(F.linear(h, sd[a + "q_a_proj.weight"]), sd[a + "q_a_layernorm.weight"], 1e-6),
                             sd[a + "q_b_proj.weight"])
            else:
                q = F.linear(h, sd[a + "q_proj.weight"])
            q = q.view(bsz, seq, heads, nope + rope).transpose(1, 2)
            q_nope, q_pe = q[..., :nope], q[..., nope:]
            ckv = F.linear(h, sd[a + "kv_a_proj_with_mqa.weight"])
            c, k_pe = ckv[..., :kv_lora], ckv[..., kv_lora:].view(bsz, seq, 1, rope).transpose(1, 2)
            kv = F.linear(_rms(c, sd[a + "kv_a_layernorm.weight"], 1e-6), sd[a + "kv_b_proj.weight"])
            kv = kv.view(bsz, seq, heads, nope + vdim).transpose(1, 2)
            k_nope, v = kv[..., :nope], kv[..., nope:]
            q_pe, k_pe = _rope(q_pe, cos, sin), _rope(k_pe, cos, sin)
            k_nope_q, v_q, k_pe_q = k_nope, v, k_pe
            if int8_from is not None:  # what an int8 latent cache stores: [c_kv | k_pe] per token
                entry = fake_int8(torch.cat((_rms(c, sd[a + "kv_a_layernorm.weight"], 1e-6), k_pe[:, 0]), -1))
                kv_q = F.linear(entry[..., :kv_lora], sd[a + "kv_b_proj.weight"])
                kv_q = kv_q.view(bsz, seq, heads, nope + vdim).transpose(1, 2)
                k_nope_q, v_q, k_pe_q = kv_q[..., :nope], kv_q[..., nope:], entry[..., kv_lora:].unsqueeze(1)
            query = torch.cat((q_nope, q_pe), -1)

            def attend(k_nope, k_pe, v):
                key = torch.cat((k_nope, k_pe.expand(bsz, heads, seq, rope)), -1)
                return torch.softmax(query @ key.transpose(2, 3) * scale + causal, dim=-1) @ v

            out = attend(k_nope, k_pe, v)
            if int8_from is not None:
                out = torch.cat((out[:, :, :int8_from], attend(k_nope_q, k_pe_q, v_q)[:, :, int8_from:]), 2)
            out = out.transpose(1, 2).reshape(bsz, seq, heads * vdim)
            x = x + F.linear(out, sd[a + "o_proj.weight"])
            h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            if is_moe_layer(cfg, i):
                flat = h.reshape(-1, h.shape[-1])
                scores = torch.softmax(F.linear(flat, sd[p + "mlp.gate.weight"]), dim=-1)
                idx, weights = route(scores, cfg)
                if with_aux:
                    total_aux += aux_loss(scores, idx, bsz, seq, cfg)
                y = torch.zeros_like(flat)
                for e in range(cfg["n_routed_experts"]):  # expert e on its tokens, times their weight for e
                    w_e = (weights * (idx == e)).sum(-1)
                    rows = w_e != 0
                    if rows.any():
                        y[rows] += w_e[rows, None] * _mlp(sd, f"{p}mlp.experts.{e}.", flat[rows])
                y = y.view_as(h)
                if cfg.get("n_shared_experts"):
                    y = y + _mlp(sd, p + "mlp.shared_experts.", h)
            else:
                y = _mlp(sd, p + "mlp.", h)
            x = x + y
        x = _rms(x, sd["model.norm.weight"], eps)
        head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]
        logits = F.linear(x, head).numpy()
    return (logits, total_aux) if with_aux else logits


def reference_greedy(state: dict, cfg: dict, prompt: list, new_tokens: int) -> list:
    """Greedy continuation by the reference (full recompute each step)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(reference_forward(state, cfg, np.array([ids]))[0, -1])))
    return ids


def cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore: Optional[int] = -100) -> float:
    """Mean token cross-entropy (float64) over targets != ignore."""
    logits = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = logits[np.arange(len(targets)), np.where(keep, targets, 0)]
    return float(((logz - picked) * keep).sum() / max(keep.sum(), 1))
