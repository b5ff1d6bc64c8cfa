"""Causal self-attention with separate q/k/v/o projections, rotary positions and a static KV cache
(this layer's K and V tensors of :class:`mindformers_ext.cache.KVCache`)."""
from __future__ import annotations

import math

from mindspore import ops

from mindformers_ext.cache import CachedKV
from mindformers_ext.layers.attention import GroupedAttentionCore
from mindformers_ext.layers.linear import Linear
from mindformers_ext.layers.rotary import ApplyRotary
from mindformers_ext.parallel.shard import ShardedCell


class CausalSelfAttention(ShardedCell):
    """MHA (kv_heads == heads), GQA (1 < kv_heads < heads) or MQA (kv_heads == 1)."""

    def __init__(self, hidden_size: int, heads: int, kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, out_bias: bool = False, compute_dtype: str = "float32",
                 param_init_type: str = "float32", softmax_compute_type: str = "float32",
                 init_std: float = 0.02, kv_cache_int8: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        linear = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        self.wq = Linear(hidden_size, heads * head_dim, qkv_bias, **linear)
        self.wk = Linear(hidden_size, kv_heads * head_dim, qkv_bias, **linear)
        self.wv = Linear(hidden_size, kv_heads * head_dim, qkv_bias, **linear)
        self.wo = Linear(heads * head_dim, hidden_size, out_bias, **linear)
        self.rotary_q = ApplyRotary(heads, head_dim)
        self.rotary_k = ApplyRotary(kv_heads, head_dim)
        self.core = GroupedAttentionCore(heads, kv_heads, head_dim, head_dim, 1.0 / math.sqrt(head_dim),
                                         softmax_compute_type)
        self.kv_cache = CachedKV(kv_cache_int8)
        self.reshape = ops.Reshape()
        self.transpose_k = ops.Transpose()
        self.transpose_v = ops.Transpose()

    def shard(self, dp: int, mp: int) -> None:
        """Heads split over model parallel (column-parallel q/k/v, row-parallel output)."""
        for proj in (self.wq, self.wk, self.wv):
            proj.shard_column(dp, mp)
        self.wo.shard_row(dp, mp)
        self.rotary_q.shard(dp, mp)
        self.rotary_k.shard(dp, mp)
        self.core.shard(dp, mp)

    def _project(self, x, cos, sin):
        bs, seq, _ = x.shape
        q = self.rotary_q(self.reshape(self.wq(x), (bs, seq, self.heads, self.head_dim)), cos, sin)
        k = self.rotary_k(self.reshape(self.wk(x), (bs, seq, self.kv_heads, self.head_dim)), cos, sin)
        v = self.reshape(self.wv(x), (bs, seq, self.kv_heads, self.head_dim))
        return q, self.transpose_k(k, (0, 2, 1, 3)), self.transpose_v(v, (0, 2, 1, 3))

    def construct(self, x, cos, sin, mask, cache=None, slot=None, decode=False):
        """x (B, S, hidden) -> (output (B, S, hidden), this layer's updated (k, v) cache or ()).

        Without ``cache``: attention over the S tokens, mask (B, 1, S, S). With ``cache`` (k, v)
        (B, kv_heads, capacity, dim): the new keys / values are written at ``slot``; ``decode``
        attends over the whole cache (mask (B, 1, S, capacity)), else (prefill into an empty cache)
        over the new tokens only.
        """
        q, k, v = self._project(x, cos, sin)
        if cache is None:
            return self.wo(self.core(q, k, v, mask)), ()
        entries, k_all, v_all = self.kv_cache(cache, k, v, slot)
        if decode:
            k, v = k_all, v_all
        return self.wo(self.core(q, k, v, mask)), entries
