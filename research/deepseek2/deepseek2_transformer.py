"""DeepSeek-V2 decoder: MLA attention, dense or MoE feed-forward, and the decoder stack.

Each layer caches one tensor, the MLA latent (batch, 1, tokens, kv_lora_rank + qk_rope_head_dim)
(see ``mindformers_ext/layers/mla.py``).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mindformers_ext.cache import CacheSpec
from mindformers_ext.layers import RMSNorm, RotaryEmbedding, VocabEmbedding, ms_dtype
from mindformers_ext.layers.mla import MultiLatentAttention
from mindformers_ext.parallel.shard import ShardedCell, parallel_sizes, pipeline_layers, vocab_emb_dp
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.deepseek2_layer import DeepseekV2MLP, DeepseekV2MoE


class DeepseekV2Attention(MultiLatentAttention):
    """MLA with DeepSeek-V2's sizes and softmax scale (YaRN's ``mscale_all_dim`` correction included)."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__(config.hidden_size, config.num_heads, config.q_lora_rank, config.kv_lora_rank,
                         config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.softmax_scale(),
                         attention_bias=config.attention_bias, compute_dtype=config.compute_dtype,
                         param_init_type=config.param_init_type, softmax_compute_type=config.softmax_compute_type,
                         layernorm_compute_type=config.layernorm_compute_type, init_std=config.initializer_range,
                         kv_cache_int8=config.kv_cache_dtype == "int8")


class DeepseekV2DecoderLayer(ShardedCell):
    """Pre-norm block: ``x + attention(norm(x))`` then ``x + feed_forward(norm(x))``; the feed-forward
    is DeepSeekMoE where ``config.is_moe_layer(layer_id)``, the dense MLP elsewhere."""

    def __init__(self, config: DeepseekV2Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        norm = dict(eps=config.rms_norm_eps, compute_type=config.layernorm_compute_type,
                    param_init_type=config.param_init_type)
        self.attention_norm = RMSNorm(config.hidden_size, **norm)
        self.attention = DeepseekV2Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, **norm)
        self.is_moe = config.is_moe_layer(layer_id)
        self.feed_forward = DeepseekV2MoE(config) if self.is_moe else DeepseekV2MLP(config)

    def shard(self, dp: int, mp: int, ep: int = 1) -> None:
        """Strategies for every sub-layer (experts over ``ep``)."""
        self.attention_norm.shard(dp, mp)
        self.attention.shard(dp, mp)
        self.ffn_norm.shard(dp, mp)
        if self.is_moe:
            self.feed_forward.shard(dp, mp, ep)
        else:
            self.feed_forward.shard(dp, mp)

    def construct(self, x, cos, sin, mask, cache=None, slot=None, decode=False):
        """-> (output, this layer's updated cache or (), aux loss of this layer (0 for dense layers));
        ``decode`` selects MLA's absorbed attention and the MoE's expert gather."""
        attn, cache = self.attention(self.attention_norm(x), cos, sin, mask, cache, slot, decode)
        x = x + attn
        if self.is_moe:
            ff, aux = self.feed_forward(self.ffn_norm(x), decode)
        else:
            ff, aux = self.feed_forward(self.ffn_norm(x)), ops.zeros((), ms.float32)
        return x + ff, cache, aux


class DeepseekV2Model(ShardedCell):
    """Embedding, decoder layers and final norm; one latent cache tensor per layer."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.cache_spec = CacheSpec(((1, config.kv_lora_rank + config.qk_rope_head_dim),), config.num_layers,
                                    config.kv_cache_dtype == "int8")
        dp, mp, pp, ep = parallel_sizes(config.parallel_config)
        self.tok_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size, config.param_init_type,
                                             config.initializer_range)
        self.tok_embeddings.shard(dp, mp, vocab_emb_dp(config.parallel_config))
        self.cast = ops.Cast()
        self.compute_dtype = ms_dtype(config.compute_dtype)
        method = "YARN" if config.extend_method == "YARN" else "None"
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.theta, method, config.rotary_scaling(),
                                      config.max_position_embeddings)
        self.rotary.shard(dp, mp)
        self.layers = pipeline_layers(DeepseekV2DecoderLayer, config, (dp, mp, ep), pp)
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, config.layernorm_compute_type,
                                config.param_init_type)
        self.norm_out.shard(dp, mp)
        if pp > 1:
            self.tok_embeddings.pipeline_stage = 0
            self.norm_out.pipeline_stage = pp - 1

    def construct(self, input_ids, position_ids, mask, cache=None, slot=None, decode=False):
        """-> (hidden, updated cache tuple or (), summed MoE balance loss (training)); as
        :class:`research.deepseek1_5.deepseek1_5.LlamaModel`."""
        # the residual stream runs in compute_dtype (as MindFormers' Llama), also with float32 parameters
        x = self.cast(self.tok_embeddings(input_ids), self.compute_dtype)
        cos, sin = self.rotary(position_ids)
        new_cache = ()
        aux = ops.zeros((), ms.float32)
        for i in range(self.num_layers):
            x, layer_cache, layer_aux = self.layers[i](x, cos, sin, mask, self.cache_spec.layer(cache, i), slot,
                                                       decode)
            new_cache = new_cache + layer_cache
            aux = aux + layer_aux
        return self.norm_out(x), new_cache, aux
