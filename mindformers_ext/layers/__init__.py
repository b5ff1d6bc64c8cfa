"""Portable MindSpore layers shared by every model (graph mode on CPU and Ascend)."""
from mindformers_ext.layers.attention import CachedSelfAttention, GroupedAttentionCore, MASK_VALUE
from mindformers_ext.layers.block import PreNormDecoderLayer, RotaryDecoderModel
from mindformers_ext.layers.embedding import VocabEmbedding
from mindformers_ext.layers.linear import FusedLinear, Linear, ms_dtype
from mindformers_ext.layers.mlp import GeluMLP, SwiGLU
from mindformers_ext.layers.norm import LayerNorm, RMSNorm
from mindformers_ext.layers.rotary import ApplyRotary, RotaryEmbedding, yarn_get_mscale

__all__ = ["CachedSelfAttention", "GroupedAttentionCore", "MASK_VALUE", "VocabEmbedding", "FusedLinear", "Linear",
           "ms_dtype", "GeluMLP", "SwiGLU", "LayerNorm", "RMSNorm", "PreNormDecoderLayer", "RotaryDecoderModel",
           "ApplyRotary", "RotaryEmbedding", "yarn_get_mscale"]
