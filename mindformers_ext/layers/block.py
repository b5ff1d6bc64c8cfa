"""What the families' decoders share: the pre-norm decoder layer (Llama / DeepSeek-Coder, GPT-BigCode) and
the rotary decoder stack (Llama / DeepSeek-Coder, DeepSeek-V2)."""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mindformers_ext.cache import CacheSpec
from mindformers_ext.layers.embedding import VocabEmbedding
from mindformers_ext.layers.linear import ms_dtype
from mindformers_ext.layers.norm import RMSNorm
from mindformers_ext.layers.rotary import RotaryEmbedding
from mindformers_ext.parallel.shard import (ShardedCell, fuse_outer_gradients, parallel_sizes, pin_stages,
                                           pipeline_layers, vocab_emb_dp)


class PreNormDecoderLayer(ShardedCell):
    """``x + attention(attention_norm(x))`` then ``x + feed_forward(ffn_norm(x))``.

    A family's layer builds the four parts in its ``__init__``. ``rope`` is what its attention takes
    between the hidden states and the mask: ``(cos, sin)`` for rotary attention, ``()`` for none.
    """

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id

    def shard(self, dp: int, mp: int) -> None:
        """Strategies for every sub-layer."""
        for part in (self.attention_norm, self.attention, self.ffn_norm, self.feed_forward):
            part.shard(dp, mp)

    def construct(self, x, rope, mask, cache=None, slot=None, decode=False):
        """-> (output, this layer's updated cache or ())."""
        attn, cache = self.attention(self.attention_norm(x), *rope, mask, cache, slot, decode)
        x = x + attn
        return x + self.feed_forward(self.ffn_norm(x)), cache


class RotaryDecoderModel(ShardedCell):
    """Token embedding, rotary (cos, sin) of the positions, the decoder layers and the final RMSNorm.

    ``layer_class(config, layer_id)`` builds each layer (``layer_sizes``: the parallel sizes its ``shard``
    takes); a layer is called as ``layer(x, (cos, sin), mask, its cache, slot, decode)`` and returns
    ``(x, its updated cache or ())``, or also its auxiliary loss (DeepSeek-V2's MoE), which the stack sums.
    """

    def __init__(self, config, cache_spec: CacheSpec, rotary: RotaryEmbedding, layer_class: type,
                 layer_sizes: tuple) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.cache_spec = cache_spec
        dp, mp, pp, _ = parallel_sizes(config.parallel_config)
        self.tok_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size, config.param_init_type,
                                             config.initializer_range)
        self.tok_embeddings.shard(dp, mp, vocab_emb_dp(config.parallel_config))
        self.cast = ops.Cast()
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.rotary = rotary
        self.rotary.shard(dp, mp)
        self.layers = pipeline_layers(layer_class, config, layer_sizes, pp)
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, config.layernorm_compute_type,
                                config.param_init_type)
        self.norm_out.shard(dp, mp)
        pin_stages(pp, first=(self.tok_embeddings,), last=(self.norm_out,))
        fuse_outer_gradients(config, pp, self.tok_embeddings, self.norm_out)

    def construct(self, input_ids, position_ids, mask, cache=None, slot=None, decode=False):
        """-> (hidden, updated cache tuple or (), summed auxiliary loss). Without ``cache``: the S tokens,
        mask (B, 1, S, S). With ``cache`` (the flat tuple of :class:`mindformers_ext.cache.KVCache`): the new
        tokens are written at ``slot``; ``decode`` attends over the whole cache (mask (B, 1, S, capacity)),
        else (prefill into an empty cache) over the new tokens only."""
        # the residual stream runs in compute_dtype (as MindFormers' Llama), also with float32 parameters
        x = self.cast(self.tok_embeddings(input_ids), self.compute_dtype)
        rope = self.rotary(position_ids)
        new_cache = ()
        aux = ops.zeros((), ms.float32)
        for i in range(self.num_layers):
            out = self.layers[i](x, rope, mask, self.cache_spec.layer(cache, i), slot, decode)
            x, new_cache = out[0], new_cache + out[1]
            if len(out) > 2:
                aux = aux + out[2]
        return self.norm_out(x), new_cache, aux
