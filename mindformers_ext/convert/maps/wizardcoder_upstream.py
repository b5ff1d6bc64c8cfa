"""WizardCoder checkpoints written by upstream MindFormers (``research/wizardcoder/convert_weight.py`` of
tag v1.5.0-beta2, or saved by its training) <-> ours.

The "hf" side of this map is upstream's layout (its ``WizardCoderLMHeadModel``):

* ``backbone.embedding.word_embedding.embedding_table`` / ``position_embedding.embedding_table``,
  ``backbone.layernorm.gamma|beta`` (final norm), ``backbone.blocks.N.layernorm1|2.gamma|beta``;
* the multi-query ``c_attn`` split into ``attention.dense1`` (q, n_embd rows), ``dense2`` (k) and
  ``dense3`` (v, head_dim rows each), [out, in]; ours keeps q as ``q_attn`` and k, v joined as
  ``kv_attn`` (2 * head_dim rows);
* ``attention.projection``, ``output.mapping`` and ``output.projection`` (HF ``attn.c_proj``,
  ``mlp.c_fc``, ``mlp.c_proj``) stored **transposed**, [in, out] (upstream's converter transposed every
  ``c_proj`` / ``c_fc`` weight); ours are [out, in];
* ``head.head_weight``: a copy of the tied word embedding that upstream's model never reads (its head
  multiplies by the embedding table). It is skipped when the config ties the head (every released
  WizardCoder) and becomes our ``lm_head.weight`` when it does not.

Upstream only supported multi-query attention (its converter split ``c_attn`` at the 15B's q / k / v
offsets), so this map has no multi-head variant.
"""
from __future__ import annotations

from mindformers_ext.convert.errors import ConversionError
from mindformers_ext.convert.maps import wizardcoder as family
from mindformers_ext.convert.weight_map import MS_TRAINING_STATE, ConcatRule, Transpose, WeightMap

B = "backbone.blocks.{}."
L = "model.layers.{}."

# upstream template -> our template
NAMES = {
    "backbone.embedding.word_embedding.embedding_table": "model.tok_embeddings.embedding_weight",
    "backbone.embedding.position_embedding.embedding_table": "model.position_embeddings.embedding_weight",
    "backbone.layernorm.gamma": "model.norm_out.weight",
    "backbone.layernorm.beta": "model.norm_out.bias",
    "head.head_weight": "lm_head.weight",
}
for _ln, _ours in (("layernorm1", "attention_norm"), ("layernorm2", "ffn_norm")):
    NAMES[f"{B}{_ln}.gamma"] = f"{L}{_ours}.weight"
    NAMES[f"{B}{_ln}.beta"] = f"{L}{_ours}.bias"
for _kind in ("weight", "bias"):
    NAMES[f"{B}attention.dense1.{_kind}"] = f"{L}attention.q_attn.{_kind}"
    NAMES[f"{B}attention.projection.{_kind}"] = f"{L}attention.c_proj.{_kind}"
    NAMES[f"{B}output.mapping.{_kind}"] = f"{L}feed_forward.c_fc.{_kind}"
    NAMES[f"{B}output.projection.{_kind}"] = f"{L}feed_forward.c_proj.{_kind}"
CONCATS = tuple(ConcatRule((f"{B}attention.dense2.{kind}", f"{B}attention.dense3.{kind}"),
                           (f"{L}attention.kv_attn.{kind}",), axis=0) for kind in ("weight", "bias"))
TRANSFORMS = {f"{L}{name}.weight": Transpose((1, 0))
              for name in ("attention.c_proj", "feed_forward.c_fc", "feed_forward.c_proj")}

SHAPE_NOTES = {
    "backbone.embedding.word_embedding.embedding_table": "[vocab_size, n_embd]",
    "backbone.embedding.position_embedding.embedding_table": "[n_positions, n_embd]",
    B + "attention.dense1.weight": "[n_embd, n_embd]",
    B + "attention.dense2.weight": "[head_dim, n_embd] (multi-query), head_dim = n_embd / n_head",
    B + "attention.dense3.weight": "[head_dim, n_embd] (multi-query), head_dim = n_embd / n_head",
    B + "attention.projection.weight": "[n_embd, n_embd] (stored [in, out])",
    B + "output.mapping.weight": "[n_embd, n_inner] (stored [in, out])",
    B + "output.projection.weight": "[n_inner, n_embd] (stored [in, out])",
}


def _upstream_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an upstream-converted WizardCoder checkpoint for this HF config dict."""
    if not cfg.get("multi_query", True):
        raise ConversionError("upstream MindFormers' WizardCoder checkpoints are multi-query only (its converter "
                              "split c_attn into q / k / v of one head); the config says multi_query: False")
    hf = family.hf_shapes(cfg)
    embd = family._embd(cfg)  # pylint: disable=protected-access
    head_dim = family._head_dim(cfg)  # pylint: disable=protected-access
    shapes = {
        "backbone.embedding.word_embedding.embedding_table": hf["transformer.wte.weight"],
        "backbone.embedding.position_embedding.embedding_table": hf["transformer.wpe.weight"],
        "backbone.layernorm.gamma": (embd,),
        "backbone.layernorm.beta": (embd,),
    }
    if not cfg.get("tie_word_embeddings", True):
        shapes["head.head_weight"] = hf["transformer.wte.weight"]
    layers = int(cfg.get("n_layer") or cfg["num_hidden_layers"])
    for i in range(layers):
        h, b = f"transformer.h.{i}.", f"backbone.blocks.{i}."
        for ln in ("layernorm1", "layernorm2"):
            shapes[f"{b}{ln}.gamma"] = (embd,)
            shapes[f"{b}{ln}.beta"] = (embd,)
        for dense, rows in (("dense1", embd), ("dense2", head_dim), ("dense3", head_dim)):
            shapes[f"{b}attention.{dense}.weight"] = (rows, embd)
            shapes[f"{b}attention.{dense}.bias"] = (rows,)
        for ours, hf_name in (("attention.projection", "attn.c_proj"), ("output.mapping", "mlp.c_fc"),
                              ("output.projection", "mlp.c_proj")):
            out, inp = hf[f"{h}{hf_name}.weight"]
            shapes[f"{b}{ours}.weight"] = (inp, out)
            shapes[f"{b}{ours}.bias"] = (out,)
    return shapes


def _ignore_upstream(cfg: dict) -> tuple[str, ...]:
    tied = (r"head\.head_weight",) if cfg.get("tie_word_embeddings", True) else ()
    return MS_TRAINING_STATE + tied


WEIGHT_MAP = WeightMap(
    name="wizardcoder_upstream",
    names=NAMES,
    hf_shapes=_upstream_shapes,
    hf_config=family.hf_config,
    concats=CONCATS,
    transforms=TRANSFORMS,
    hf_ignore=_ignore_upstream,
    ours_ignore=family.WEIGHT_MAP.ours_ignore,
    shape_notes=SHAPE_NOTES,
    summary_keys=family.WEIGHT_MAP.summary_keys,
)
