"""Scaled dot-product attention over grouped heads (MHA, GQA, MQA) with an additive mask.

Shared by every attention variant: the projections and the cache layout differ per model, the
score / softmax / weighted-sum core does not. Queries are grouped as (batch, kv_heads,
group * seq, dim) so that key/value heads are never repeated in memory (HF's ``repeat_kv``
order: query head ``h`` reads kv head ``h // group``).
"""
from __future__ import annotations

from mindspore import ops

from mindformers_ext.cache import MASK_VALUE, CachedKV
from mindformers_ext.layers.linear import ms_dtype
from mindformers_ext.parallel.shard import ShardedCell

__all__ = ["GroupedAttentionCore", "CachedSelfAttention", "MASK_VALUE"]


class GroupedAttentionCore(ShardedCell):
    """softmax(q k^T * scale + mask) v.

    Inputs: q (batch, seq, heads, qk_dim); k (batch, kv_heads, kv_len, qk_dim); v (batch, kv_heads,
    kv_len, v_dim); mask (batch, 1, seq, kv_len) additive (0 or MASK_VALUE). Output: (batch, seq,
    heads * v_dim).
    """

    def __init__(self, heads: int, kv_heads: int, qk_dim: int, v_dim: int, scale: float,
                 softmax_compute_type: str = "float32") -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.group = heads, kv_heads, heads // kv_heads
        self.qk_dim, self.v_dim, self.scale = qk_dim, v_dim, scale
        self.softmax_dtype = ms_dtype(softmax_compute_type)
        # MASK_VALUE (-1e9) is -inf in float16, and a fully masked row (the padding of a left-padded
        # prompt) would turn into NaN that reaches the real rows through their keys / values: a
        # float16 softmax takes the mask clipped to -32768 (finite, with room left for the scores).
        self.mask_floor = -32768.0 if softmax_compute_type == "float16" else None
        self.transpose_q = ops.Transpose()
        self.transpose_out = ops.Transpose()
        self.reshape = ops.Reshape()
        self.qk = ops.BatchMatMul(transpose_b=True)
        self.pv = ops.BatchMatMul()
        self.mul_scale = ops.Mul()
        self.add_mask = ops.Add()
        self.softmax = ops.Softmax(-1)
        self.cast = ops.Cast()
        self.expand = ops.ExpandDims()

    def shard(self, dp: int, mp: int) -> None:
        """Split batch and kv heads (each device keeps whole query groups)."""
        gs = ("B", self.kv_heads, f"{self.group}*S", self.qk_dim)
        k = ("B", self.kv_heads, "T", self.qk_dim)
        v = ("B", self.kv_heads, "T", self.v_dim)
        scores = ("B", self.kv_heads, f"{self.group}*S", "T")
        self.shard_op("qk", self.qk, ((dp, mp, 1, 1), (dp, mp, 1, 1)), (gs, k), tied=(((0, 3), (1, 3)),))
        self.shard_op("mul_scale", self.mul_scale, ((dp, mp, 1, 1), ()), (scores, ()))
        self.shard_op("softmax", self.softmax, ((dp, mp, 1, 1),), (scores,))
        self.shard_op("pv", self.pv, ((dp, mp, 1, 1), (dp, mp, 1, 1)), (scores, v), tied=(((0, 3), (1, 2)),))

    def construct(self, q, k, v, mask):
        bs, seq, _, _ = q.shape
        kv_len = k.shape[2]
        # (B, S, kvH, G, D) -> (B, kvH, G, S, D) -> (B, kvH, G*S, D)
        q = self.reshape(q, (bs, seq, self.kv_heads, self.group, self.qk_dim))
        q = self.reshape(self.transpose_q(q, (0, 2, 3, 1, 4)), (bs, self.kv_heads, self.group * seq, self.qk_dim))
        scores = self.mul_scale(self.qk(q, k), self.scale)
        scores = self.cast(scores, self.softmax_dtype)
        scores = self.reshape(scores, (bs, self.kv_heads, self.group, seq, kv_len))
        if self.mask_floor is not None:
            mask = ops.maximum(mask, self.mask_floor)
        scores = self.add_mask(scores, self.expand(self.cast(mask, self.softmax_dtype), 1))
        probs = self.softmax(scores)
        probs = self.cast(self.reshape(probs, (bs, self.kv_heads, self.group * seq, kv_len)), v.dtype)
        out = self.pv(probs, v)
        out = self.reshape(out, (bs, self.kv_heads, self.group, seq, self.v_dim))
        out = self.transpose_out(out, (0, 3, 1, 2, 4))
        return self.reshape(out, (bs, seq, self.heads * self.v_dim))


class CachedSelfAttention(ShardedCell):
    """What the Llama and GPT-BigCode self-attentions share: the attention ``core`` over the KV cache
    (:class:`CachedKV`) and the reshape / transposes that take projections to its layout. A subclass
    passes its core to ``__init__`` first, then builds its projections."""

    def __init__(self, core: GroupedAttentionCore, kv_cache_int8: bool = False) -> None:
        super().__init__()
        self.core = core
        self.kv_cache = CachedKV(kv_cache_int8)
        self.reshape = ops.Reshape()
        self.transpose_k = ops.Transpose()
        self.transpose_v = ops.Transpose()
