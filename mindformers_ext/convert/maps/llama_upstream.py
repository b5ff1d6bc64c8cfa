"""DeepSeek-Coder (Llama) checkpoints written by upstream MindFormers (``research/deepseek1_5/convert_weight.py``
of tags v1.3.2 - v1.5.0, or saved by MindFormers' Llama) <-> ours.

Upstream's converter renamed HF's tensors exactly as we do (``model.tok_embeddings.embedding_weight``,
``model.layers.N.attention.wq.weight``, ..., ``lm_head.weight``), and MindFormers' Llama keeps HF's
rotate-half RoPE layout, so every tensor is a plain copy: this map is the identity on our names. It
exists so that ``--upstream`` works the same way for all three families (and checks every shape).
"""
from __future__ import annotations

from mindformers_ext.convert.maps import llama as family
from mindformers_ext.convert.plan import expected_shapes
from mindformers_ext.convert.weight_map import WeightMap

NAMES = {ours: ours for ours in family.NAMES.values()}


def _upstream_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    return expected_shapes(family.WEIGHT_MAP, cfg, "ours")


WEIGHT_MAP = WeightMap(
    name="llama_upstream",
    names=NAMES,
    hf_shapes=_upstream_shapes,
    hf_config=family.hf_config,
    hf_ignore=family.WEIGHT_MAP.ours_ignore,
    ours_ignore=family.WEIGHT_MAP.ours_ignore,
    summary_keys=family.WEIGHT_MAP.summary_keys,
)
