"""Multi-head latent attention (MLA, DeepSeek-V2) with a latent KV cache.

Keys and values are decompressed from a per-token latent ``c_kv`` (``kv_lora_rank`` wide, after its
RMSNorm) plus one shared rotary key ``k_pe`` (``qk_rope_head_dim`` wide). The cache holds exactly
those, ``kv_lora_rank + qk_rope_head_dim`` values per token and layer, as one (batch, 1, tokens,
kv_lora_rank + qk_rope_head_dim) tensor, instead of 2 x heads x head_dim for full keys and values.

Two computations of the same attention, chosen by ``decode``:

* over the new tokens (training, prefill, the uncached path): decompress per-head keys / values from
  the latent and attend normally (cheapest when queries are many);
* ``decode`` (new tokens against the whole cache): the "absorbed" form. With ``W_UK`` / ``W_UV`` the
  per-head blocks of ``kv_b_proj``, ``q_nope . (W_UK c) = (W_UK^T q_nope) . c``, so each query is
  mapped into latent space and attends over the cached latents directly as multi-query attention
  (one shared "head" of width kv_lora_rank + rope); the latent output is mapped out through
  ``W_UV``. Nothing per head is ever materialised for the cached tokens.

Rotary embeddings use the rotate-half layout of :class:`ApplyRotary`. DeepSeek's checkpoints hold
the rope rows of ``q_b_proj`` / ``kv_a_proj_with_mqa`` in the interleaved (complex-pair) layout;
the weight converter permutes those rows once (``mindformers_ext.convert.maps.deepseek2``), which
leaves q . k, and so the model, unchanged.
"""
from __future__ import annotations

from typing import Optional

from mindspore import ops

from mindformers_ext.cache import CachedTensor
from mindformers_ext.layers.attention import GroupedAttentionCore
from mindformers_ext.layers.linear import Linear
from mindformers_ext.layers.norm import RMSNorm
from mindformers_ext.layers.rotary import ApplyRotary
from mindformers_ext.parallel.shard import ShardedCell

# DeepSeek's q_a_layernorm / kv_a_layernorm are built with the default eps, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class MultiLatentAttention(ShardedCell):
    """MLA with low-rank (``q_lora_rank``) or plain query projection and a compressed KV latent.

    Parameter names follow upstream MindFormers' DeepSeek-V2: ``q2l_proj`` / ``lq_norm`` /
    ``l2q_proj`` (or ``q_proj`` without q_lora), ``kv2l`` / ``lkv_norm`` / ``lkv2kv``, ``wo``.
    """

    def __init__(self, hidden_size: int, heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, scale: float,
                 attention_bias: bool = False, compute_dtype: str = "float32", param_init_type: str = "float32",
                 softmax_compute_type: str = "float32", layernorm_compute_type: str = "float32",
                 init_std: float = 0.02, kv_cache_int8: bool = False) -> None:
        super().__init__()
        self.heads, self.q_lora_rank, self.kv_lora_rank = heads, q_lora_rank, kv_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.latent_dim = kv_lora_rank + qk_rope_head_dim
        linear = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        norm = dict(eps=LATENT_NORM_EPS, compute_type=layernorm_compute_type, param_init_type=param_init_type)
        if q_lora_rank:
            self.q2l_proj = Linear(hidden_size, q_lora_rank, attention_bias, **linear)
            self.lq_norm = RMSNorm(q_lora_rank, **norm)
            self.l2q_proj = Linear(q_lora_rank, heads * self.qk_dim, False, **linear)
        else:
            self.q_proj = Linear(hidden_size, heads * self.qk_dim, False, **linear)
        self.kv2l = Linear(hidden_size, self.latent_dim, attention_bias, **linear)
        self.lkv_norm = RMSNorm(kv_lora_rank, **norm)
        self.lkv2kv = Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), False, **linear)
        self.wo = Linear(heads * v_head_dim, hidden_size, attention_bias, **linear)
        self.rotary_q = ApplyRotary(heads, qk_rope_head_dim)
        self.rotary_k = ApplyRotary(1, qk_rope_head_dim)
        self.core = GroupedAttentionCore(heads, heads, self.qk_dim, v_head_dim, scale, softmax_compute_type)
        # decode: multi-query attention over the cached latents; the "values" are the whole cache entry
        # (latent + rope) and the rope part of the output is dropped, so the cache is never sliced.
        self.latent_core = GroupedAttentionCore(heads, 1, self.latent_dim, self.latent_dim, scale,
                                                softmax_compute_type)
        self.cache_latent = CachedTensor(kv_cache_int8)
        self.reshape = ops.Reshape()
        self.transpose = ops.Transpose()
        self.concat = ops.Concat(-1)
        self.absorb_q = ops.BatchMatMul()                 # (H, N, nope) @ (H, nope, kv_lora)
        self.expand_out = ops.BatchMatMul(transpose_b=True)  # (H, N, kv_lora) @ (H, v, kv_lora)^T

    def shard(self, dp: int, mp: int) -> None:
        """Heads split over model parallel; the latent projection (shared by all heads) replicated."""
        if self.q_lora_rank:
            self.q2l_proj.shard_column(dp, 1)
            self.lq_norm.shard(dp, 1)
            self.l2q_proj.shard_column(dp, mp)
        else:
            self.q_proj.shard_column(dp, mp)
        self.kv2l.shard_column(dp, 1)
        self.lkv_norm.shard(dp, 1)
        self.lkv2kv.shard_column(dp, mp)
        self.wo.shard_row(dp, mp)
        self.rotary_q.shard(dp, mp)
        self.rotary_k.shard(dp, 1)
        self.core.shard(dp, mp)
        self.latent_core.shard(dp, 1)
        per_head_q = (self.heads, "B*S", self.nope)
        w_uk = (self.heads, self.nope, self.kv_lora_rank)
        self.shard_op("absorb_q", self.absorb_q, ((mp, dp, 1), (mp, 1, 1)), (per_head_q, w_uk),
                      tied=(((0, 2), (1, 1)),))
        per_head_lat = (self.heads, "B*S", self.kv_lora_rank)
        w_uv = (self.heads, self.v_dim, self.kv_lora_rank)
        self.shard_op("expand_out", self.expand_out, ((mp, dp, 1), (mp, 1, 1)), (per_head_lat, w_uv),
                      tied=(((0, 2), (1, 2)),))

    def _query(self, x, cos, sin):
        """(B, S, H, nope) and rotated (B, S, H, rope) query parts."""
        bs, seq, _ = x.shape
        if self.q_lora_rank:
            q = self.l2q_proj(self.lq_norm(self.q2l_proj(x)))
        else:
            q = self.q_proj(x)
        q = self.reshape(q, (bs, seq, self.heads, self.qk_dim))
        q_nope, q_pe = q[..., :self.nope], q[..., self.nope:]
        return q_nope, self.rotary_q(q_pe, cos, sin)

    def _latent(self, x, cos, sin):
        """Normalised latent (B, S, kv_lora) and rotated shared key (B, S, 1, rope)."""
        bs, seq, _ = x.shape
        latent = self.kv2l(x)
        c_kv = self.lkv_norm(latent[..., :self.kv_lora_rank])
        k_pe = self.reshape(latent[..., self.kv_lora_rank:], (bs, seq, 1, self.rope))
        return c_kv, self.rotary_k(k_pe, cos, sin)

    def _cache_entry(self, c_kv, k_pe):
        bs, seq, _ = c_kv.shape
        entry = self.concat((c_kv, self.reshape(k_pe, (bs, seq, self.rope))))
        return self.reshape(entry, (bs, 1, seq, self.latent_dim))

    def construct(self, x, cos, sin, mask, cache=None, slot=None, decode=False):
        """x (B, S, hidden) -> (output (B, S, hidden), updated (latent,) cache or ()).

        ``cache`` is this layer's (B, 1, capacity, kv_lora + rope) latent; the new entries are written
        at ``slot``. ``decode`` attends over the whole cache in the absorbed form (mask (B, 1, S,
        capacity)); otherwise over the new tokens, decompressed (mask (B, 1, S, S)).
        """
        q_nope, q_pe = self._query(x, cos, sin)
        c_kv, k_pe = self._latent(x, cos, sin)
        if decode:
            new_cache, latent = self.cache_latent(cache, self._cache_entry(c_kv, k_pe), slot)
            return self._absorbed(q_nope, q_pe, latent, mask), new_cache
        new_cache = ()
        if cache is not None:
            new_cache, _ = self.cache_latent(cache, self._cache_entry(c_kv, k_pe), slot)
        bs, seq, _ = x.shape
        kv = self.reshape(self.lkv2kv(c_kv), (bs, seq, self.heads, self.nope + self.v_dim))
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        k = self.concat((k_nope, ops.broadcast_to(k_pe, (bs, seq, self.heads, self.rope))))
        q = self.concat((q_nope, q_pe))
        out = self.core(q, self.transpose(k, (0, 2, 1, 3)), self.transpose(v, (0, 2, 1, 3)), mask)
        return self.wo(out), new_cache

    def _absorbed(self, q_nope, q_pe, cache, mask):
        """Attention of the new queries over the cached latents without decompressing them."""
        bs, seq, _, _ = q_nope.shape
        weight = self.reshape(self.lkv2kv.float_weight(q_nope.dtype),
                              (self.heads, self.nope + self.v_dim, self.kv_lora_rank))
        w_uk, w_uv = weight[:, :self.nope, :], weight[:, self.nope:, :]
        # (B, S, H, nope) -> (H, B*S, nope) -> latent space (H, B*S, kv_lora) -> (B, S, H, kv_lora)
        q_h = self.reshape(self.transpose(q_nope, (2, 0, 1, 3)), (self.heads, bs * seq, self.nope))
        q_lat = self.reshape(self.absorb_q(q_h, w_uk), (self.heads, bs, seq, self.kv_lora_rank))
        q_lat = self.transpose(q_lat, (1, 2, 0, 3))
        out = self.latent_core(self.concat((q_lat, q_pe)), cache, cache, mask)  # (B, S, H * latent_dim)
        out = self.reshape(out, (bs, seq, self.heads, self.latent_dim))[..., :self.kv_lora_rank]
        out_h = self.reshape(self.transpose(out, (2, 0, 1, 3)), (self.heads, bs * seq, self.kv_lora_rank))
        out_v = self.reshape(self.expand_out(out_h, w_uv), (self.heads, bs, seq, self.v_dim))
        out_v = self.reshape(self.transpose(out_v, (1, 2, 0, 3)), (bs, seq, self.heads * self.v_dim))
        return self.wo(out_v)
