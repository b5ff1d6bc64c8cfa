"""DeepSeek-V2 checkpoints written by upstream MindFormers (``research/deepseek2/convert_weight.py`` of
tags v1.3.2 - v1.5.0, or saved by its training) <-> ours.

The "hf" side of this map is upstream's layout. Upstream renamed HF's tensors much as we do (the
dense parts have our names), but

* MoE layers live under ``feed_forward.routed_experts``: the router is
  ``feed_forward.routed_experts.router.dense.weight`` (ours ``feed_forward.router.dense.weight``) and
  the stacked experts ``feed_forward.routed_experts.ffn.w1.weight`` (E, inter, hidden) (ours
  ``feed_forward.ffn.w1``, same shape); shared experts have our names;
* the rope rows of ``attention.l2q_proj`` / ``attention.q_proj`` (each head's last
  ``qk_rope_head_dim`` rows) and of ``attention.kv2l`` (its last rows) stay in HF's interleaved order;
  ours are permuted to rotate-half (:class:`~mindformers_ext.convert.maps.deepseek2.RopeRows`);
* its converter stored norms and the router in float32, everything else in bfloat16 (dtypes are
  kept here; loading casts to the model's dtype).

:data:`GMM_MAP` is the variant for MindFormers' grouped-matmul MoE layout (``use_gmm``): the stacked
experts transposed to (E, in, out). :data:`SPLIT_MAP` is the one for checkpoints that upstream v1.5.0's
converter split for its MLA (its positional flag with ``--pre_ckpt_path``): ``attention.l2q_proj`` as
``l2q_nope_proj`` (every head's nope rows) + ``l2q_pe_proj`` (every head's rope rows, already in our
rotate-half order), ``attention.kv2l`` as ``kv2l_latent_kv`` + ``kv2l_k_pe`` (rotate-half too) and
``attention.lkv2kv`` as ``lkv2kv_k_nope`` + ``lkv2kv_v``; ``q_proj`` (V2-Lite) is not split and keeps HF's
order. :func:`mindformers_ext.convert.upstream.upstream_weight_map` picks the variant from the
checkpoint's names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mindformers_ext.convert.maps import deepseek2 as family
from mindformers_ext.convert.maps.deepseek2 import RopeRows
from mindformers_ext.convert.weight_map import MS_TRAINING_STATE, ConcatRule, Transform, Transpose, WeightMap

L = "model.layers.{}."
_ATTN = ("q2l_proj.weight", "q2l_proj.bias", "lq_norm.weight", "l2q_proj.weight", "q_proj.weight", "kv2l.weight",
         "kv2l.bias", "lkv_norm.weight", "lkv2kv.weight", "wo.weight", "wo.bias")
ROUTER = L + "feed_forward.routed_experts.router.dense.weight"
EXPERTS = L + "feed_forward.routed_experts.ffn.{w}.weight"  # {w}: w1 / w2 / w3

# upstream template -> our template
NAMES = {
    "model.tok_embeddings.embedding_weight": "model.tok_embeddings.embedding_weight",
    "model.norm_out.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
    L + "attention_norm.weight": L + "attention_norm.weight",
    L + "ffn_norm.weight": L + "ffn_norm.weight",
    ROUTER: L + "feed_forward.router.dense.weight",
}
for _name in _ATTN:
    NAMES[L + "attention." + _name] = L + "attention." + _name
for _w in ("w1", "w2", "w3"):
    NAMES[f"{L}feed_forward.{_w}.weight"] = f"{L}feed_forward.{_w}.weight"
    NAMES[f"{L}feed_forward.shared_experts.{_w}.weight"] = f"{L}feed_forward.shared_experts.{_w}.weight"
    NAMES[EXPERTS.replace("{w}", _w)] = f"{L}feed_forward.ffn.{_w}"

ROPE_TRANSFORMS = {
    L + "attention.l2q_proj.weight": RopeRows(per_head=True),
    L + "attention.q_proj.weight": RopeRows(per_head=True),
    L + "attention.kv2l.weight": RopeRows(per_head=False),
    L + "attention.kv2l.bias": RopeRows(per_head=False),
}
GMM_TRANSFORMS = {f"{L}feed_forward.ffn.{w}": Transpose((0, 2, 1)) for w in ("w1", "w2", "w3")}


@dataclass(frozen=True)
class HeadParts(Transform):
    """Rows ``[part 0 of every head; part 1 of every head]`` (two split tensors concatenated) <-> ours,
    head by head ``[part 0; part 1]``. ``parts``: the HF config keys of the two per-head row counts."""

    parts: tuple

    def _order(self, rows: int, config: dict) -> np.ndarray:
        first, second = (int(config[k]) for k in self.parts)
        heads = rows // (first + second)
        head = np.arange(heads)[:, None]
        return np.concatenate([head * first + np.arange(first), heads * first + head * second + np.arange(second)],
                              axis=1).reshape(-1)

    def to_ours(self, array, config):
        return np.ascontiguousarray(array[self._order(array.shape[0], config)])

    def to_hf(self, array, config):
        return np.ascontiguousarray(array[np.argsort(self._order(array.shape[0], config))])


A = L + "attention."
# upstream's split tensors -> our whole one, and how the concatenated rows are reordered
SPLITS = {
    A + "l2q_proj.weight": ((A + "l2q_nope_proj.weight", A + "l2q_pe_proj.weight"),
                            HeadParts(("qk_nope_head_dim", "qk_rope_head_dim"))),
    A + "kv2l.weight": ((A + "kv2l_latent_kv.weight", A + "kv2l_k_pe.weight"), None),
    A + "lkv2kv.weight": ((A + "lkv2kv_k_nope.weight", A + "lkv2kv_v.weight"), HeadParts(("qk_nope_head_dim",
                                                                                             "v_head_dim"))),
}
SPLIT_CONCATS = tuple(ConcatRule(parts, (whole,), axis=0) for whole, (parts, _) in SPLITS.items())
SPLIT_TRANSFORMS = {whole: t for whole, (_, t) in SPLITS.items() if t is not None}


def _split_shapes(shapes: dict[str, tuple[int, ...]], cfg: dict) -> dict[str, tuple[int, ...]]:
    """``shapes`` with l2q_proj / kv2l / lkv2kv replaced by upstream's split tensors."""
    heads, nope, rope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    rows = {"l2q_nope_proj": heads * nope, "l2q_pe_proj": heads * rope, "kv2l_latent_kv": cfg["kv_lora_rank"],
            "kv2l_k_pe": rope, "lkv2kv_k_nope": heads * nope, "lkv2kv_v": heads * cfg["v_head_dim"]}
    out = {}
    for name, shape in shapes.items():
        for whole, (parts, _) in SPLITS.items():
            prefix, suffix = whole.split("{}")
            if name.startswith(prefix) and name.endswith(suffix):
                layer = name[len(prefix):-len(suffix)]
                for part in parts:
                    out[part.replace("{}", layer)] = (rows[part.split(".")[-2]],) + tuple(shape[1:])
                break
        else:
            out[name] = shape
    return out


# HF name pieces -> upstream's (the renames of upstream's name_replace(), applied in order)
_HF_TO_UPSTREAM = (
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    (".self_attn.q_a_proj.", ".attention.q2l_proj."),
    (".self_attn.q_a_layernorm.", ".attention.lq_norm."),
    (".self_attn.q_b_proj.", ".attention.l2q_proj."),
    (".self_attn.q_proj.", ".attention.q_proj."),
    (".self_attn.kv_a_proj_with_mqa.", ".attention.kv2l."),
    (".self_attn.kv_a_layernorm.", ".attention.lkv_norm."),
    (".self_attn.kv_b_proj.", ".attention.lkv2kv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.shared_experts.gate_proj.", ".feed_forward.shared_experts.w1."),
    (".mlp.shared_experts.down_proj.", ".feed_forward.shared_experts.w2."),
    (".mlp.shared_experts.up_proj.", ".feed_forward.shared_experts.w3."),
    (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".mlp.up_proj.", ".feed_forward.w3."),
    (".mlp.gate.weight", ".feed_forward.routed_experts.router.dense.weight"),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
)
_EXPERT_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _upstream_shapes(cfg: dict, gmm: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of an upstream-converted checkpoint for this HF config dict, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    experts: dict[tuple[str, str], list[tuple[int, ...]]] = {}
    for name, shape in family.hf_shapes(cfg).items():
        if ".mlp.experts." in name:  # model.layers.{i}.mlp.experts.{j}.{proj}.weight
            prefix, rest = name.split(".mlp.experts.", 1)
            proj = rest.split(".")[1]
            experts.setdefault((prefix, _EXPERT_PROJ[proj]), []).append(shape)
            continue
        for old, new in _HF_TO_UPSTREAM:
            name = name.replace(old, new)
        shapes[name] = shape
    for (prefix, w), per_expert in experts.items():
        out, inp = per_expert[0]
        shapes[f"{prefix}.feed_forward.routed_experts.ffn.{w}.weight"] = (
            (len(per_expert), inp, out) if gmm else (len(per_expert), out, inp))
    return shapes


def _ignore_upstream(cfg: dict) -> tuple[str, ...]:
    # training state (optimizer moments, step counters, loss scale) that upstream's Trainer saves alongside
    return MS_TRAINING_STATE + ((r"lm_head\.weight",) if cfg.get("tie_word_embeddings", False) else ())


def _make(gmm: bool, split: bool = False) -> WeightMap:
    names = {k: v for k, v in NAMES.items() if not (split and v in SPLITS)}
    transforms = {**ROPE_TRANSFORMS, **(GMM_TRANSFORMS if gmm else {})}
    if split:  # the split rope rows are in our order already; q_proj (not split) is not
        transforms = {k: v for k, v in transforms.items() if k not in SPLITS}
        transforms.update(SPLIT_TRANSFORMS)
    return WeightMap(
        name="deepseek2_upstream" + ("_gmm" if gmm else "") + ("_mla_split" if split else ""),
        names=names,
        hf_shapes=(lambda cfg: _split_shapes(_upstream_shapes(cfg, gmm), cfg)) if split
        else (lambda cfg: _upstream_shapes(cfg, gmm)),
        hf_config=family.hf_config,
        concats=SPLIT_CONCATS if split else (),
        transforms=transforms,
        hf_ignore=_ignore_upstream,
        ours_ignore=family.WEIGHT_MAP.ours_ignore,
        shape_notes={ROUTER: "[n_routed_experts, hidden_size]",
                     EXPERTS.replace("{w}", "w1"): "[n_routed_experts, moe_intermediate_size, hidden_size]"
                                                      + (" transposed (gmm)" if gmm else ""),
                     L + "attention.l2q_proj.weight": family.SHAPE_NOTES[family.A + "q_b_proj.weight"],
                     L + "attention.kv2l.weight": family.SHAPE_NOTES[family.A + "kv_a_proj_with_mqa.weight"]},
        summary_keys=family.WEIGHT_MAP.summary_keys,
    )


WEIGHT_MAP = _make(gmm=False)
GMM_MAP = _make(gmm=True)
SPLIT_MAP = _make(gmm=False, split=True)
GMM_SPLIT_MAP = _make(gmm=True, split=True)
