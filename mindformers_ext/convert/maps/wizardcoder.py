"""GPT-BigCode family (WizardCoder, StarCoder, SantaCoder): HF ``GPTBigCodeForCausalLM`` <-> our names.

Every tensor keeps its HF layout except the fused attention projection ``c_attn``, whose layout depends on
``multi_query`` (``WEIGHT_MAP.select`` picks the variant): multi-query rows ``[q (n_embd) | k | v (head_dim
each)]`` are split into our ``q_attn`` and ``kv_attn``; multi-head rows (per head ``[q_h | k_h | v_h]``) stay
fused as our ``c_attn``. The LM head is tied to ``wte`` in every released checkpoint, so neither side holds
``lm_head.weight`` (an HF one is ignored).

:data:`UPSTREAM_MAP`: checkpoints written by upstream MindFormers (v1.5.0-beta2): ``backbone.*`` names,
``c_attn`` split into ``attention.dense1/2/3`` (q, k, v), ``attention.projection`` / ``output.mapping`` /
``output.projection`` stored transposed ([in, out]), and ``head.head_weight``, a copy of the tied embedding
(skipped when the config ties the head). Upstream supported multi-query attention only.
"""
from __future__ import annotations

from typing import Any

from mindformers_ext.convert.tensors import ConversionError
from mindformers_ext.convert.weight_map import (MS_TRAINING_STATE, Layout, WeightMap, config_reader, skeleton,
                                                tied_head, upstream_map)

H = "transformer.h.{}."
L = "model.layers.{}."

COMMON = {
    "transformer.wte.weight": "model.tok_embeddings.embedding_weight",
    "transformer.wpe.weight": "model.position_embeddings.embedding_weight",
    "transformer.ln_f.weight": "model.norm_out.weight",
    "transformer.ln_f.bias": "model.norm_out.bias",
    "lm_head.weight": "lm_head.weight",
}
for _kind in ("weight", "bias"):
    COMMON[f"{H}ln_1.{_kind}"] = f"{L}attention_norm.{_kind}"
    COMMON[f"{H}ln_2.{_kind}"] = f"{L}ffn_norm.{_kind}"
    COMMON[f"{H}attn.c_proj.{_kind}"] = f"{L}attention.c_proj.{_kind}"
    COMMON[f"{H}mlp.c_fc.{_kind}"] = f"{L}feed_forward.c_fc.{_kind}"
    COMMON[f"{H}mlp.c_proj.{_kind}"] = f"{L}feed_forward.c_proj.{_kind}"

MULTI_HEAD_NAMES = dict(COMMON)
for _kind in ("weight", "bias"):
    MULTI_HEAD_NAMES[f"{H}attn.c_attn.{_kind}"] = f"{L}attention.c_attn.{_kind}"


MULTI_QUERY_NAMES = dict(COMMON)
for _kind in ("weight", "bias"):  # split into two of ours
    MULTI_QUERY_NAMES[f"{H}attn.c_attn.{_kind}"] = (f"{L}attention.q_attn.{_kind}", f"{L}attention.kv_attn.{_kind}")

SHAPE_NOTES = {
    "transformer.wte.weight": "[vocab_size, n_embd]",
    "transformer.wpe.weight": "[n_positions, n_embd]",
    "lm_head.weight": "[vocab_size, n_embd]",
    "transformer.ln_f.weight": "[n_embd]",
    H + "ln_1.weight": "[n_embd]",
    H + "ln_2.weight": "[n_embd]",
    H + "attn.c_attn.weight": "[n_embd + 2 * head_dim, n_embd] (multi_query) or [3 * n_embd, n_embd], "
                              "head_dim = n_embd / n_head",
    H + "attn.c_attn.bias": "[n_embd + 2 * head_dim] (multi_query) or [3 * n_embd]",
    H + "attn.c_proj.weight": "[n_embd, n_embd]",
    H + "mlp.c_fc.weight": "[n_inner, n_embd] (n_inner defaults to 4 * n_embd)",
    H + "mlp.c_proj.weight": "[n_embd, n_inner]",
}


def _our_config(fields: dict):
    """Our config object for a YAML ``model_config`` dict (its ``type`` when registered, else the
    family config)."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.models.gpt_bigcode_config import GPTBigCodeFamilyConfig

    cls = GPTBigCodeFamilyConfig
    kind = fields.get("type")
    if kind and kind != cls.__name__:
        from mindformers_ext.families import load_families
        load_families()  # the research packages' classes in MindFormers' registry
        from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

        if MindFormerRegister.is_exist(MindFormerModuleType.CONFIG, kind):
            found = MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, kind)
            if issubclass(found, GPTBigCodeFamilyConfig):
                cls = found
    return cls(**{k: v for k, v in fields.items() if k not in ("type", "parallel_config")})


def _to_hf(config: Any) -> dict:
    from mindformers_ext.models.gpt_bigcode_config import gpt_bigcode_config_to_hf  # pylint: disable=C0415
    return gpt_bigcode_config_to_hf(config)


# our YAML's model_config dict is built with the registered config class its ``type`` names
hf_config = config_reader("GPT-BigCode", "n_embd", "HF GPT-BigCode", _our_config,
                          lambda c: hasattr(c, "num_layers") and hasattr(c, "multi_query"), _to_hf, "gpt_bigcode")


_COMMON = dict(shapes=skeleton("gpt_bigcode"), hf_config=hf_config, shape_notes=SHAPE_NOTES,
               model_types=("gpt_bigcode",),
               # attention-mask buffers some older exports carry
               hf_ignore=tied_head(r"lm_head\.weight", True, (r"transformer\.bias", r"transformer\.masked_bias",
                                                               r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")),
               ours_ignore=tied_head(r"lm_head\.weight", True, MS_TRAINING_STATE),
               summary_keys=("n_embd", "n_layer", "n_head", "n_inner", "n_positions", "vocab_size", "multi_query",
                             "tie_word_embeddings"))

MULTI_HEAD_MAP = WeightMap(name="wizardcoder", names=MULTI_HEAD_NAMES, **_COMMON)
MULTI_QUERY_MAP = WeightMap(name="wizardcoder", names=MULTI_QUERY_NAMES, **_COMMON)


def select(cfg: dict) -> WeightMap:
    """The variant for ``cfg``: multi-query (HF default) or multi-head."""
    return MULTI_QUERY_MAP if cfg.get("multi_query", True) else MULTI_HEAD_MAP


WEIGHT_MAP = WeightMap(name="wizardcoder", names=MULTI_QUERY_NAMES, select=select, **_COMMON)

# ------------------------------------------------------------------------------- upstream MindFormers
B = "backbone.blocks.{}."
# upstream template -> our template
UPSTREAM_NAMES = {
    "backbone.embedding.word_embedding.embedding_table": "model.tok_embeddings.embedding_weight",
    "backbone.embedding.position_embedding.embedding_table": "model.position_embeddings.embedding_weight",
    "backbone.layernorm.gamma": "model.norm_out.weight",
    "backbone.layernorm.beta": "model.norm_out.bias",
    "head.head_weight": "lm_head.weight",
}
for _ln, _ours in (("layernorm1", "attention_norm"), ("layernorm2", "ffn_norm")):
    UPSTREAM_NAMES[f"{B}{_ln}.gamma"] = f"{L}{_ours}.weight"
    UPSTREAM_NAMES[f"{B}{_ln}.beta"] = f"{L}{_ours}.bias"
for _kind in ("weight", "bias"):
    UPSTREAM_NAMES[f"{B}attention.dense1.{_kind}"] = f"{L}attention.q_attn.{_kind}"
    UPSTREAM_NAMES[f"{B}attention.dense2.{_kind}"] = f"{L}attention.kv_attn.{_kind}"  # k and v: concatenated
    UPSTREAM_NAMES[f"{B}attention.dense3.{_kind}"] = f"{L}attention.kv_attn.{_kind}"
    UPSTREAM_NAMES[f"{B}attention.projection.{_kind}"] = f"{L}attention.c_proj.{_kind}"
    UPSTREAM_NAMES[f"{B}output.mapping.{_kind}"] = f"{L}feed_forward.c_fc.{_kind}"
    UPSTREAM_NAMES[f"{B}output.projection.{_kind}"] = f"{L}feed_forward.c_proj.{_kind}"
TRANSPOSED = {f"{L}{name}.weight": Layout(axes=(1, 0))
              for name in ("attention.c_proj", "feed_forward.c_fc", "feed_forward.c_proj")}

UPSTREAM_SHAPE_NOTES = {
    "backbone.embedding.word_embedding.embedding_table": "[vocab_size, n_embd]",
    "backbone.embedding.position_embedding.embedding_table": "[n_positions, n_embd]",
    B + "attention.dense1.weight": "[n_embd, n_embd]",
    B + "attention.dense2.weight": "[head_dim, n_embd] (multi-query), head_dim = n_embd / n_head",
    B + "attention.dense3.weight": "[head_dim, n_embd] (multi-query), head_dim = n_embd / n_head",
    B + "attention.projection.weight": "[n_embd, n_embd] (stored [in, out])",
    B + "output.mapping.weight": "[n_embd, n_inner] (stored [in, out])",
    B + "output.projection.weight": "[n_inner, n_embd] (stored [in, out])",
}


def _multi_query_only(cfg: dict) -> WeightMap:
    if not cfg.get("multi_query", True):
        raise ConversionError("upstream MindFormers' WizardCoder checkpoints are multi-query only (its converter "
                              "split c_attn into q / k / v of one head); the config says multi_query: False")
    return UPSTREAM_MAP


UPSTREAM_MAP = upstream_map(MULTI_QUERY_MAP, names=UPSTREAM_NAMES, layouts=TRANSPOSED, select=_multi_query_only,
                            part_rows=lambda template, shape, cfg: [shape[0] // 2] * 2,  # k, v of one head
                            hf_ignore=tied_head(r"head\.head_weight", True, MS_TRAINING_STATE),
                            shape_notes=UPSTREAM_SHAPE_NOTES)
