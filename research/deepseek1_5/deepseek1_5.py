"""DeepSeek-Coder v1 / v1.5: the Llama-family decoder (RMSNorm, rotary attention with MHA / GQA and a KV
cache, SwiGLU) and its causal LM, top to bottom: attention, decoder layer, model, causal LM.

Parameter names follow MindFormers' Llama (``model.layers.N.attention.wq.weight`` ...), so upstream
DeepSeek-Coder checkpoints load as they are. ``LlamaFamilyForCausalLM`` serves any Llama-shaped HF
checkpoint (``load_hf_model``); ``DeepSeekCoderForCausalLM`` is the same model under DeepSeek's names.
"""
from __future__ import annotations

import math
from typing import Optional

from mindspore import ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.cache import CacheSpec
from mindformers_ext.layers import (CachedSelfAttention, FusedLinear, GroupedAttentionCore, Linear,
                                    PreNormDecoderLayer, RMSNorm, RotaryDecoderModel, RotaryEmbedding, SwiGLU)
from mindformers_ext.layers.rotary import ApplyRotary
from mindformers_ext.models.causal_lm import CausalLMBase
from mindformers_ext.models.llama_config import LlamaFamilyConfig
from mindformers_ext.parallel.shard import parallel_sizes
from research.deepseek1_5.deepseek1_5_config import DeepSeekCoderConfig


class CausalSelfAttention(CachedSelfAttention):
    """MHA (kv_heads == heads), GQA (1 < kv_heads < heads) or MQA (kv_heads == 1)."""

    def __init__(self, hidden_size: int, heads: int, kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, out_bias: bool = False, compute_dtype: str = "float32",
                 param_init_type: str = "float32", softmax_compute_type: str = "float32",
                 init_std: float = 0.02, kv_cache_int8: bool = False, qkv_concat: bool = False) -> None:
        super().__init__(GroupedAttentionCore(heads, kv_heads, head_dim, head_dim, 1.0 / math.sqrt(head_dim),
                                              softmax_compute_type), kv_cache_int8)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv_concat = qkv_concat
        linear = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        if qkv_concat:  # one matmul; rows grouped by key/value head: [its queries, its key, its value]
            self.w_qkv = FusedLinear(hidden_size, (("wq", heads * head_dim), ("wk", kv_heads * head_dim),
                                                   ("wv", kv_heads * head_dim)), kv_heads, qkv_bias, **linear)
            self.rep = heads // kv_heads
            self.split_qkv = ops.Split(3, self.rep + 2)  # per key/value head: its rep queries, key, value
            self.join_q = ops.Concat(3)
        else:
            self.wq = Linear(hidden_size, heads * head_dim, qkv_bias, **linear)
            self.wk = Linear(hidden_size, kv_heads * head_dim, qkv_bias, **linear)
            self.wv = Linear(hidden_size, kv_heads * head_dim, qkv_bias, **linear)
        self.wo = Linear(heads * head_dim, hidden_size, out_bias, **linear)
        self.rotary_q = ApplyRotary(heads, head_dim)
        self.rotary_k = ApplyRotary(kv_heads, head_dim)

    def shard(self, dp: int, mp: int) -> None:
        """Heads split over model parallel (column-parallel q/k/v, row-parallel output)."""
        if self.qkv_concat:
            self.w_qkv.shard_column(dp, mp)
            self.shard_op("split_qkv", self.split_qkv, ((dp, 1, mp, 1, 1),),
                          (("B", "S", self.kv_heads, self.rep + 2, self.head_dim),))
            self.shard_op("join_q", self.join_q, ((dp, 1, mp, 1, 1),) * self.rep,
                          (("B", "S", self.kv_heads, 1, self.head_dim),) * self.rep)
        else:
            for proj in (self.wq, self.wk, self.wv):
                proj.shard_column(dp, mp)
        self.wo.shard_row(dp, mp)
        self.rotary_q.shard(dp, mp)
        self.rotary_k.shard(dp, mp)
        self.core.shard(dp, mp)

    def _project(self, x, cos, sin):
        bs, seq, _ = x.shape
        kv_shape = (bs, seq, self.kv_heads, self.head_dim)
        if self.qkv_concat:
            parts = self.split_qkv(self.reshape(self.w_qkv(x), (bs, seq, self.kv_heads, self.rep + 2, self.head_dim)))
            q = self.join_q(parts[:self.rep]) if self.rep > 1 else parts[0]
            k, v = self.reshape(parts[self.rep], kv_shape), self.reshape(parts[self.rep + 1], kv_shape)
        else:
            q, k, v = self.wq(x), self.reshape(self.wk(x), kv_shape), self.reshape(self.wv(x), kv_shape)
        q = self.rotary_q(self.reshape(q, (bs, seq, self.heads, self.head_dim)), cos, sin)
        k = self.rotary_k(k, cos, sin)
        return q, self.transpose_k(k, (0, 2, 1, 3)), self.transpose_v(v, (0, 2, 1, 3))

    def construct(self, x, cos, sin, mask, cache=None, slot=None, decode=False):
        """x (B, S, hidden) -> (output (B, S, hidden), this layer's updated (k, v) cache or ()).

        Without ``cache``: attention over the S tokens, mask (B, 1, S, S). With ``cache`` (k, v)
        (B, kv_heads, capacity, dim): the new keys / values are written at ``slot``; ``decode``
        attends over the whole cache (mask (B, 1, S, capacity)), else (prefill into an empty cache)
        over the new tokens only.
        """
        q, k, v = self._project(x, cos, sin)
        entries, k, v = self.kv_cache(cache, k, v, slot, decode)
        return self.wo(self.core(q, k, v, mask)), entries


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block of RMSNorm, rotary attention and SwiGLU."""

    def __init__(self, config: LlamaFamilyConfig, layer_id: int) -> None:
        super().__init__(layer_id)
        common = dict(compute_dtype=config.compute_dtype, param_init_type=config.param_init_type,
                      init_std=config.initializer_range)
        norm = dict(eps=config.rms_norm_eps, compute_type=config.layernorm_compute_type,
                    param_init_type=config.param_init_type)
        self.attention_norm = RMSNorm(config.hidden_size, **norm)
        self.attention = CausalSelfAttention(config.hidden_size, config.num_heads, config.kv_heads, config.head_dim,
                                             qkv_bias=config.qkv_has_bias, out_bias=config.attn_proj_has_bias,
                                             softmax_compute_type=config.softmax_compute_type,
                                             kv_cache_int8=config.kv_cache_dtype == "int8",
                                             qkv_concat=config.qkv_concat, **common)
        self.ffn_norm = RMSNorm(config.hidden_size, **norm)
        self.feed_forward = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_has_bias,
                                   concat=config.qkv_concat, **common)


class LlamaModel(RotaryDecoderModel):
    """Embedding, decoder layers and final norm. Cache: (k, v) per layer, (B, kv_heads, T, head_dim)."""

    def __init__(self, config: LlamaFamilyConfig) -> None:
        dp, mp, _, _ = parallel_sizes(config.parallel_config)
        super().__init__(config, CacheSpec(((config.kv_heads, config.head_dim),) * 2, config.num_layers,
                                           config.kv_cache_dtype == "int8"),
                         RotaryEmbedding(config.head_dim, config.theta, config.extend_method, config.scaling_factor,
                                         config.max_position_embedding),
                         LlamaDecoderLayer, (dp, mp))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlamaFamilyForCausalLM(CausalLMBase):
    """Llama-family causal LM (DeepSeek-Coder and friends)."""

    config_class = LlamaFamilyConfig

    def __init__(self, config: LlamaFamilyConfig = None) -> None:
        config = config if config is not None else LlamaFamilyConfig()
        super().__init__(config, LlamaModel(config))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class DeepSeekCoderForCausalLM(LlamaFamilyForCausalLM):
    """DeepSeek-Coder v1 / v1.5 (YAML ``model.arch.type: DeepSeekCoderForCausalLM``)."""

    config_class = DeepSeekCoderConfig

    def __init__(self, config: Optional[DeepSeekCoderConfig] = None) -> None:
        super().__init__(config if config is not None else DeepSeekCoderConfig())
