"""DeepSeek-V2 / V2-Lite: HF ``DeepseekV2ForCausalLM`` <-> our MindFormers-style names.

Beyond renames:

* routed experts: HF keeps one tensor per expert (``mlp.experts.{j}.gate_proj.weight`` ...); ours
  stacks them per layer and projection (``feed_forward.ffn.w1`` of shape (E, inter, hidden), still
  [out, in] per expert). The engine stacks one layer's experts at a time, so memory stays at one
  stacked tensor (``StackRule``);
* RoPE rows: DeepSeek's checkpoints hold the rope part of each query head (``q_b_proj`` /
  ``q_proj``) and the shared rope key (the last rows of ``kv_a_proj_with_mqa``) in the interleaved
  (complex pair) layout; our :class:`ApplyRotary` is rotate-half, so those rows are permuted
  ``[0, 2, 4, ..., 1, 3, 5, ...]`` on the way in and back on the way out (:class:`RopeRows`). That
  is exactly the permutation DeepSeek's own ``apply_rotary_pos_emb`` applies to q and k at run time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mindformers_ext.convert.weight_map import MS_TRAINING_STATE, StackRule, Transform, WeightMap

L = "model.layers.{}."
A = L + "self_attn."
NAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
    L + "input_layernorm.weight": L + "attention_norm.weight",
    L + "post_attention_layernorm.weight": L + "ffn_norm.weight",
    A + "q_a_proj.weight": L + "attention.q2l_proj.weight",
    A + "q_a_proj.bias": L + "attention.q2l_proj.bias",
    A + "q_a_layernorm.weight": L + "attention.lq_norm.weight",
    A + "q_b_proj.weight": L + "attention.l2q_proj.weight",
    A + "q_proj.weight": L + "attention.q_proj.weight",
    A + "kv_a_proj_with_mqa.weight": L + "attention.kv2l.weight",
    A + "kv_a_proj_with_mqa.bias": L + "attention.kv2l.bias",
    A + "kv_a_layernorm.weight": L + "attention.lkv_norm.weight",
    A + "kv_b_proj.weight": L + "attention.lkv2kv.weight",
    A + "o_proj.weight": L + "attention.wo.weight",
    A + "o_proj.bias": L + "attention.wo.bias",
    L + "mlp.gate.weight": L + "feed_forward.router.dense.weight",
}
_PROJ = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
for _hf, _ours in _PROJ:
    NAMES[f"{L}mlp.{_hf}.weight"] = f"{L}feed_forward.{_ours}.weight"
    NAMES[f"{L}mlp.shared_experts.{_hf}.weight"] = f"{L}feed_forward.shared_experts.{_ours}.weight"
STACKS = tuple(StackRule(f"{L}mlp.experts.{{}}.{_hf}.weight", f"{L}feed_forward.ffn.{_ours}", axis=0)
               for _hf, _ours in _PROJ)


def rope_permutation(rope_dim: int) -> np.ndarray:
    """Row order taking DeepSeek's interleaved rope rows to the rotate-half layout."""
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


@dataclass(frozen=True)
class RopeRows(Transform):
    """Permute the rope rows of a projection: ``per_head`` (queries: each head's last
    ``qk_rope_head_dim`` rows of ``qk_nope + qk_rope``) or the key latent (its last rope rows)."""

    per_head: bool

    def _order(self, rows: int, config: dict, inverse: bool) -> np.ndarray:
        rope = config["qk_rope_head_dim"]
        perm = rope_permutation(rope)
        if inverse:
            perm = np.argsort(perm)
        if self.per_head:
            width = config["qk_nope_head_dim"] + rope
            heads = rows // width
            block = np.concatenate([np.arange(width - rope), width - rope + perm])
            return (np.arange(heads)[:, None] * width + block[None, :]).reshape(-1)
        start = rows - rope
        return np.concatenate([np.arange(start), start + perm])

    def to_ours(self, array, config):
        return np.ascontiguousarray(array[self._order(array.shape[0], config, False)])

    def to_hf(self, array, config):
        return np.ascontiguousarray(array[self._order(array.shape[0], config, True)])


TRANSFORMS = {
    L + "attention.l2q_proj.weight": RopeRows(per_head=True),
    L + "attention.q_proj.weight": RopeRows(per_head=True),
    L + "attention.kv2l.weight": RopeRows(per_head=False),
    L + "attention.kv2l.bias": RopeRows(per_head=False),
}

SHAPE_NOTES = {
    "model.embed_tokens.weight": "[vocab_size, hidden_size]",
    "lm_head.weight": "[vocab_size, hidden_size]",
    A + "q_a_proj.weight": "[q_lora_rank, hidden_size]",
    A + "q_b_proj.weight": "[num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim), q_lora_rank]",
    A + "q_proj.weight": "[num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim), hidden_size]",
    A + "kv_a_proj_with_mqa.weight": "[kv_lora_rank+qk_rope_head_dim, hidden_size]",
    A + "kv_b_proj.weight": "[num_attention_heads*(qk_nope_head_dim+v_head_dim), kv_lora_rank]",
    A + "o_proj.weight": "[hidden_size, num_attention_heads*v_head_dim]",
    L + "mlp.gate.weight": "[n_routed_experts, hidden_size]",
    L + "mlp.gate_proj.weight": "[intermediate_size, hidden_size]",
    L + "mlp.experts.{}.gate_proj.weight": "[moe_intermediate_size, hidden_size]",
    L + "mlp.shared_experts.gate_proj.weight": "[moe_intermediate_size*n_shared_experts, hidden_size]",
}


def _is_moe(cfg: dict, layer: int) -> bool:
    return (cfg.get("n_routed_experts") is not None and layer >= cfg.get("first_k_dense_replace", 0)
            and layer % (cfg.get("moe_layer_freq") or 1) == 0)


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF DeepSeek-V2 checkpoint with this config.json, with its shape."""
    hidden, heads, vocab = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_lora, kv_lora = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    bias = cfg.get("attention_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(cfg["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        if q_lora:
            shapes[a + "q_a_proj.weight"] = (q_lora, hidden)
            if bias:
                shapes[a + "q_a_proj.bias"] = (q_lora,)
            shapes[a + "q_a_layernorm.weight"] = (q_lora,)
            shapes[a + "q_b_proj.weight"] = (heads * (nope + rope), q_lora)
        else:
            shapes[a + "q_proj.weight"] = (heads * (nope + rope), hidden)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (kv_lora + rope, hidden)
        shapes[a + "kv_a_layernorm.weight"] = (kv_lora,)
        shapes[a + "kv_b_proj.weight"] = (heads * (nope + v), kv_lora)
        shapes[a + "o_proj.weight"] = (hidden, heads * v)
        if bias:
            shapes[a + "kv_a_proj_with_mqa.bias"] = (kv_lora + rope,)
            shapes[a + "o_proj.bias"] = (hidden,)
        if _is_moe(cfg, i):
            experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (experts, hidden)
            for j in range(experts):
                for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                    ("down_proj", (hidden, inter))):
                    shapes[f"{p}mlp.experts.{j}.{name}.weight"] = shape
            shared = (cfg.get("n_shared_experts") or 0) * inter
            if shared:
                for name, shape in (("gate_proj", (shared, hidden)), ("up_proj", (shared, hidden)),
                                    ("down_proj", (hidden, shared))):
                    shapes[f"{p}mlp.shared_experts.{name}.weight"] = shape
        else:
            inter = cfg["intermediate_size"]
            for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):
                shapes[f"{p}mlp.{name}.weight"] = shape
    return shapes


def hf_config(config: Any) -> dict:
    """An HF DeepSeek-V2 config dict from an HF dict / transformers config, our DeepseekV2Config, or our
    YAML's ``model_config`` dict."""
    from mindformers_ext.families import family_for_weight_map  # pylint: disable=import-outside-toplevel

    if isinstance(config, dict):
        if "num_hidden_layers" in config:
            return dict(config)
        if "num_layers" in config:
            config_class = family_for_weight_map("deepseek2").config_class
            return hf_config(config_class(**{k: v for k, v in config.items() if k != "type"}))
        raise KeyError("the config has neither num_hidden_layers (HF) nor num_layers (ours)")
    if hasattr(config, "num_layers") and hasattr(config, "kv_lora_rank"):
        return family_for_weight_map("deepseek2").config_to_hf(config)
    if hasattr(config, "to_dict"):
        return hf_config(config.to_dict())
    raise TypeError(f"cannot read a DeepSeek-V2 config from {type(config).__name__}")


def _ignore_hf(cfg: dict) -> tuple[str, ...]:
    patterns = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.(inv_freq|cos_cached|sin_cached)",)
    if cfg.get("tie_word_embeddings", False):
        patterns += (r"lm_head\.weight",)
    return patterns


def _ignore_ours(cfg: dict) -> tuple[str, ...]:
    return MS_TRAINING_STATE + ((r"lm_head\.weight",) if cfg.get("tie_word_embeddings", False) else ())


WEIGHT_MAP = WeightMap(
    name="deepseek2",
    names=NAMES,
    hf_shapes=hf_shapes,
    hf_config=hf_config,
    stacks=STACKS,
    transforms=TRANSFORMS,
    hf_ignore=_ignore_hf,
    ours_ignore=_ignore_ours,
    shape_notes=SHAPE_NOTES,
    summary_keys=("hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
                  "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "vocab_size",
                  "tie_word_embeddings"),
    model_types=("deepseek_v2",),
)
