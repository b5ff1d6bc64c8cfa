"""DeepSeek-V2 / V2-Lite: HF ``DeepseekV2ForCausalLM`` <-> our names.

Beyond renames:

* routed experts: HF keeps one tensor per expert; ours stacks them per layer and projection
  (``feed_forward.ffn.w1`` of shape (E, inter, hidden)), one layer's experts at a time;
* RoPE rows: DeepSeek's checkpoints hold the rope part of each query head and the shared rope key (the last
  rows of ``kv_a_proj_with_mqa``) in the interleaved layout; our :class:`ApplyRotary` is rotate-half, so those
  rows are permuted ``[0, 2, 4, ..., 1, 3, 5, ...]`` on the way in and back on the way out, which is exactly
  the permutation DeepSeek's own ``apply_rotary_pos_emb`` applies to q and k at run time.

:data:`UPSTREAM_VARIANTS`: checkpoints written by upstream MindFormers (v1.3.2 - v1.5.0). Its MoE layers live
under ``feed_forward.routed_experts`` (``router.dense.weight``, stacked ``ffn.w1.weight``) and its rope rows
stay in HF's order; variants: ``gmm`` (``use_gmm``: the stacked experts transposed to (E, in, out)) and
``split`` (v1.5.0's MLA split: ``l2q_proj`` as ``l2q_nope_proj`` + ``l2q_pe_proj`` (rope rows already
rotate-half), ``kv2l`` as ``kv2l_latent_kv`` + ``kv2l_k_pe``, ``lkv2kv`` as ``lkv2kv_k_nope`` + ``lkv2kv_v``).
:func:`mindformers_ext.convert.upstream.upstream_weight_map` picks the variant from the checkpoint.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mindformers_ext.convert.weight_map import (MS_TRAINING_STATE, Layout, WeightMap, config_reader, skeleton,
                                                tied_head, upstream_map)

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
for _hf, _ours in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
    NAMES[f"{L}mlp.{_hf}.weight"] = f"{L}feed_forward.{_ours}.weight"
    NAMES[f"{L}mlp.shared_experts.{_hf}.weight"] = f"{L}feed_forward.shared_experts.{_ours}.weight"
    NAMES[f"{L}mlp.experts.{{}}.{_hf}.weight"] = f"{L}feed_forward.ffn.{_ours}"  # stacked: one {} fewer


def rope_permutation(rope_dim: int) -> np.ndarray:
    """Row order taking DeepSeek's interleaved rope rows to the rotate-half layout."""
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


def query_rope_rows(rows: int, cfg: dict) -> np.ndarray:
    """Row order of a query projection: each head's last ``qk_rope_head_dim`` rows (of ``qk_nope + qk_rope``)
    permuted to rotate-half."""
    rope = cfg["qk_rope_head_dim"]
    width = cfg["qk_nope_head_dim"] + rope
    block = np.concatenate([np.arange(width - rope), width - rope + rope_permutation(rope)])
    return (np.arange(rows // width)[:, None] * width + block[None, :]).reshape(-1)


def key_rope_rows(rows: int, cfg: dict) -> np.ndarray:
    """Row order of the key latent projection: its last ``qk_rope_head_dim`` rows (the shared rope key)
    permuted to rotate-half."""
    start = rows - cfg["qk_rope_head_dim"]
    return np.concatenate([np.arange(start), start + rope_permutation(cfg["qk_rope_head_dim"])])


LAYOUTS = {
    L + "attention.l2q_proj.weight": Layout(rows=query_rope_rows),
    L + "attention.q_proj.weight": Layout(rows=query_rope_rows),
    L + "attention.kv2l.weight": Layout(rows=key_rope_rows),
    L + "attention.kv2l.bias": Layout(rows=key_rope_rows),
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


def _family() -> Any:
    from mindformers_ext.families import family_for_weight_map  # pylint: disable=import-outside-toplevel
    return family_for_weight_map("deepseek2")


hf_config = config_reader(
    "DeepSeek-V2", "num_hidden_layers", "HF",
    lambda fields: _family().config_class(**{k: v for k, v in fields.items() if k != "type"}),
    lambda c: hasattr(c, "num_layers") and hasattr(c, "kv_lora_rank"), lambda c: _family().config_to_hf(c))


WEIGHT_MAP = WeightMap(
    name="deepseek2",
    names=NAMES,
    shapes=skeleton("deepseek_v2"),
    hf_config=hf_config,
    layouts=LAYOUTS,
    hf_ignore=tied_head(r"lm_head\.weight", False,
                        (r"model\.layers\.\d+\.self_attn\.rotary_emb\.(inv_freq|cos_cached|sin_cached)",)),
    ours_ignore=tied_head(r"lm_head\.weight", False, MS_TRAINING_STATE),
    shape_notes=SHAPE_NOTES,
    summary_keys=("hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
                  "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "vocab_size",
                  "tie_word_embeddings"),
    model_types=("deepseek_v2",),
)

# ------------------------------------------------------------------------------- upstream MindFormers
ROUTER = L + "feed_forward.routed_experts.router.dense.weight"
EXPERTS = L + "feed_forward.routed_experts.ffn.{w}.weight"  # {w}: w1 / w2 / w3
# our template -> upstream's, where they differ
_UPSTREAM_NAMES = {L + "feed_forward.router.dense.weight": ROUTER,
                   **{f"{L}feed_forward.ffn.{w}": EXPERTS.replace("{w}", w) for w in ("w1", "w2", "w3")}}
B = L + "attention."
# our whole tensor -> upstream v1.5.0's two split ones, with the per-head row counts of each (HF config keys)
SPLITS = {
    B + "l2q_proj.weight": ((B + "l2q_nope_proj.weight", B + "l2q_pe_proj.weight"),
                            ("qk_nope_head_dim", "qk_rope_head_dim")),
    B + "kv2l.weight": ((B + "kv2l_latent_kv.weight", B + "kv2l_k_pe.weight"), None),
    B + "lkv2kv.weight": ((B + "lkv2kv_k_nope.weight", B + "lkv2kv_v.weight"), ("qk_nope_head_dim", "v_head_dim")),
}


def head_parts(first_key: str, second_key: str) -> Layout:
    """Rows ``[part 0 of every head; part 1 of every head]`` (two split tensors concatenated) <-> ours,
    head by head ``[part 0; part 1]``; the HF config keys give the two per-head row counts."""
    def rows(n: int, cfg: dict) -> np.ndarray:
        first, second = int(cfg[first_key]), int(cfg[second_key])
        heads = n // (first + second)
        head = np.arange(heads)[:, None]
        return np.concatenate([head * first + np.arange(first), heads * first + head * second + np.arange(second)],
                              axis=1).reshape(-1)
    return Layout(rows=rows)


def _split_rows(template: str, shape: tuple[int, ...], cfg: dict) -> list[int]:
    per_head = SPLITS[template][1]
    if per_head:
        return [cfg["num_attention_heads"] * cfg[k] for k in per_head]
    return [cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]]


def _upstream_map(gmm: bool, split: bool) -> WeightMap:
    names, layouts = {}, dict(LAYOUTS)
    for ours in NAMES.values():
        if split and ours in SPLITS:
            parts, per_head = SPLITS[ours]
            names.update((p, ours) for p in parts)  # concatenated, in this order
            layouts.pop(ours, None)  # the split rope rows are in our order already; q_proj (not split) is not
            if per_head:
                layouts[ours] = head_parts(*per_head)
        else:
            names[_UPSTREAM_NAMES.get(ours, ours)] = ours
    if gmm:
        layouts.update({f"{L}feed_forward.ffn.{w}": Layout(axes=(0, 2, 1)) for w in ("w1", "w2", "w3")})
    return upstream_map(
        WEIGHT_MAP,
        name="deepseek2_upstream" + ("_gmm" if gmm else "") + ("_mla_split" if split else ""),
        names=names,
        part_rows=_split_rows,
        layouts=layouts,
        shape_notes={ROUTER: "[n_routed_experts, hidden_size]",
                     EXPERTS.replace("{w}", "w1"): "[n_routed_experts, moe_intermediate_size, hidden_size]"
                                                      + (" transposed (gmm)" if gmm else ""),
                     B + "l2q_proj.weight": SHAPE_NOTES[A + "q_b_proj.weight"],
                     B + "kv2l.weight": SHAPE_NOTES[A + "kv_a_proj_with_mqa.weight"]},
    )


# (gmm, split) -> map
UPSTREAM_VARIANTS = {(gmm, split): _upstream_map(gmm, split) for gmm in (False, True) for split in (False, True)}
UPSTREAM_MAP = UPSTREAM_VARIANTS[(False, False)]
