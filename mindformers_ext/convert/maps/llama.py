"""Llama family (DeepSeek-Coder v1 / v1.5): HF ``LlamaForCausalLM`` <-> our names.

Shapes are identical on both sides (Dense weights are [out, in]) and our RoPE uses HF's rotate_half layout, so
every entry is a plain rename. Upstream MindFormers' converter renamed HF's tensors exactly as we do, so
:data:`UPSTREAM_MAP` is the identity on our names; it exists so that ``--upstream`` works (and checks every
shape) the same way for all families.

:data:`QKV_CONCAT_MAP`: checkpoints of ``qkv_concat`` models (ours, or upstream's ``convert_weight.py
--qkv_concat True`` and training): q/k/v as one ``attention.w_qkv`` and gate/up as one
``feed_forward.w_gate_hidden``, rows in upstream's grouped order (:func:`grouped_rows`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mindformers_ext.convert.weight_map import (MS_TRAINING_STATE, Layout, WeightMap, config_reader, grouped_rows,
                                                skeleton, tied_head, upstream_map)

L = "model.layers.{}."
NAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
    L + "input_layernorm.weight": L + "attention_norm.weight",
    L + "post_attention_layernorm.weight": L + "ffn_norm.weight",
}
for _hf, _ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
    for _kind in ("weight", "bias"):
        NAMES[f"{L}self_attn.{_hf}.{_kind}"] = f"{L}attention.{_ours}.{_kind}"
for _hf, _ours in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
    for _kind in ("weight", "bias"):
        NAMES[f"{L}mlp.{_hf}.{_kind}"] = f"{L}feed_forward.{_ours}.{_kind}"

SHAPE_NOTES = {
    "model.embed_tokens.weight": "[vocab_size, hidden_size]",
    "lm_head.weight": "[vocab_size, hidden_size]",
    "model.norm.weight": "[hidden_size]",
    L + "input_layernorm.weight": "[hidden_size]",
    L + "post_attention_layernorm.weight": "[hidden_size]",
    L + "self_attn.q_proj.weight": "[num_attention_heads*head_dim, hidden_size]",
    L + "self_attn.k_proj.weight": "[num_key_value_heads*head_dim, hidden_size]",
    L + "self_attn.v_proj.weight": "[num_key_value_heads*head_dim, hidden_size]",
    L + "self_attn.o_proj.weight": "[hidden_size, num_attention_heads*head_dim]",
    L + "mlp.gate_proj.weight": "[intermediate_size, hidden_size]",
    L + "mlp.up_proj.weight": "[intermediate_size, hidden_size]",
    L + "mlp.down_proj.weight": "[hidden_size, intermediate_size]",
}


def _our_config(fields: dict) -> Any:
    from mindformers_ext.models.llama_config import LlamaFamilyConfig  # pylint: disable=import-outside-toplevel
    return LlamaFamilyConfig(**{k: v for k, v in fields.items() if k != "type"})


def _to_hf(config: Any) -> dict:
    from mindformers_ext.models.llama_hf_config import llama_config_to_hf  # pylint: disable=import-outside-toplevel
    return llama_config_to_hf(config)


# our LlamaFamilyConfig and our YAML's model_config dict go through llama_config_to_hf
hf_config = config_reader("Llama", "num_hidden_layers", "HF", _our_config, lambda c: hasattr(c, "num_layers"), _to_hf)


WEIGHT_MAP = WeightMap(
    name="llama",
    names=NAMES,
    shapes=skeleton("llama"),
    hf_config=hf_config,
    # Old HF checkpoints (DeepSeek-Coder v1 among them) store the RoPE inverse frequencies.
    hf_ignore=tied_head(r"lm_head\.weight", False, (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)),
    ours_ignore=tied_head(r"lm_head\.weight", False, MS_TRAINING_STATE),
    shape_notes=SHAPE_NOTES,
    summary_keys=("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "attention_bias", "mlp_bias", "tie_word_embeddings"),
    model_types=("llama",),
)


def _qkv_sizes(rows: int, cfg: dict) -> list[int]:
    """Rows of q, k and v in a ``w_qkv`` of ``rows`` rows."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = rows // (heads + 2 * kv_heads)
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def qkv_rows(rows: int, cfg: dict) -> np.ndarray:
    """Row order of ``w_qkv`` over [q; k; v]: per key/value head, its queries, its key, its value."""
    return grouped_rows(_qkv_sizes(rows, cfg), cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def gate_up_rows(rows: int, cfg: dict) -> np.ndarray:  # pylint: disable=unused-argument
    """Row order of ``w_gate_hidden`` over [gate; up]: interleaved."""
    return grouped_rows((rows // 2, rows // 2), rows // 2)


def _fused_rows(template: str, shape: tuple[int, ...], cfg: dict) -> list[int]:
    """The map's ``part_rows``: rows of q, k, v in ``w_qkv``; of gate, up in ``w_gate_hidden``."""
    return _qkv_sizes(shape[0], cfg) if "w_qkv" in template else [shape[0] // 2] * 2


QKV_CONCAT_NAMES = dict(NAMES)  # q, k, v (and gate, up) name one tensor of ours: concatenated in this order
for _hf, _fused in (("self_attn.q_proj", "attention.w_qkv"), ("self_attn.k_proj", "attention.w_qkv"),
                    ("self_attn.v_proj", "attention.w_qkv"), ("mlp.gate_proj", "feed_forward.w_gate_hidden"),
                    ("mlp.up_proj", "feed_forward.w_gate_hidden")):
    for _kind in ("weight", "bias"):
        QKV_CONCAT_NAMES[f"{L}{_hf}.{_kind}"] = f"{L}{_fused}.{_kind}"
QKV_CONCAT_MAP = dataclasses.replace(
    WEIGHT_MAP, name="llama_qkv_concat", names=QKV_CONCAT_NAMES, shapes=skeleton("llama", qkv_concat=True),
    part_rows=_fused_rows,
    layouts={f"{L}{fused}.{kind}": Layout(rows=rows) for fused, rows in (("attention.w_qkv", qkv_rows),
                                                                          ("feed_forward.w_gate_hidden", gate_up_rows))
             for kind in ("weight", "bias")})
WEIGHT_MAP = dataclasses.replace(WEIGHT_MAP, qkv_concat=QKV_CONCAT_MAP)

UPSTREAM_MAP = upstream_map(WEIGHT_MAP, names={ours: ours for ours in NAMES.values()})
