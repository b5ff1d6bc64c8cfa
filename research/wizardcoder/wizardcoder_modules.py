"""WizardCoder's building blocks under the seed's names: GPT-BigCode's, defined in ``wizardcoder.py``.

The seed kept its own copies of MindFormers' transformer layers here; ours are the shared portable
ones (graph mode on CPU and Ascend, static KV cache, recorded shard strategies):

* :class:`WizardCoderAttention` - multi-query attention (``q_attn`` + one-head ``kv_attn``) or multi-head
  (fused per-head ``c_attn``), with the cached ``decode`` path;
* :class:`WizardCoderDecoderLayer` - LayerNorm, attention, LayerNorm, GELU MLP (``c_fc`` / ``c_proj``);
* :class:`WizardCoderModel` - token + learned position embeddings, the layers, final LayerNorm.
"""
from research.wizardcoder.wizardcoder import (GPTBigCodeAttention, GPTBigCodeAttentionCore, GPTBigCodeDecoderLayer,
                                             GPTBigCodeModel)

WizardCoderAttention = GPTBigCodeAttention
WizardCoderAttentionCore = GPTBigCodeAttentionCore
WizardCoderDecoderLayer = GPTBigCodeDecoderLayer
WizardCoderModel = GPTBigCodeModel

__all__ = ["WizardCoderAttention", "WizardCoderAttentionCore", "WizardCoderDecoderLayer", "WizardCoderModel"]
