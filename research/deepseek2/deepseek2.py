"""DeepSeek-V2 / V2-Lite, top to bottom: multi-head latent attention (MLA), DeepSeekMoE, the decoder
layer and stack, and the causal LM (YAML ``model.arch.type: DeepseekV2ForCausalLM``). Upstream
MindFormers' module name ``deepseek2_model`` re-exports these classes (see that file).

**MLA.** Keys and values are decompressed from a per-token latent ``c_kv`` (``kv_lora_rank`` wide,
after its RMSNorm) plus one shared rotary key ``k_pe`` (``qk_rope_head_dim`` wide). The cache holds exactly
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

**DeepSeekMoE.** Routing follows DeepSeek-V2's own ``MoEGate``: softmax scores in float32, ``greedy`` top-k or
``group_limited_greedy`` (keep the ``topk_group`` groups with the highest best-expert score, zero
the rest, then top-k), then either normalise the k weights to sum 1 (``norm_topk_prob`` with k > 1;
DeepSeek-V2 then applies no ``routed_scaling_factor``) or multiply them by ``routed_scaling_factor``.
The sequence-level balance loss (``seq_aux``) is ``alpha * mean_b sum_e f_be P_be`` with
``f_be = count_be * E / (S * k)`` and ``P_be`` the mean score of expert e over sequence b;
without ``seq_aux`` the same over all tokens at once.

Expert weights are stacked, one tensor per projection: w1 / w3 (E, inter, hidden), w2 (E, hidden,
inter) in HF's [out, in] layout per expert. Three exact computations (no token is ever dropped), and
a capacity-limited one for training:

* training, prefill (token dispatch): with ``A = N * k`` assignments and ``c = ceil(A / E)``, each
  expert's first ``c`` assignments go to its row block of an (E, c, hidden) layout multiplied by the
  stacked weights in place (one batched matmul, no weight copy); an expert's further assignments go
  to spill blocks of ``c`` rows, each multiplied by its expert's weights gathered for it. The spill
  needs at most ``floor((A - 1) / c) < E`` blocks: an expert with ``n_e > c`` assignments needs
  ``ceil((n_e - c) / c) <= (n_e - 1) / c`` of them and those ``n_e`` sum to at most ``A``; one more
  block is kept so the spill is never empty. Static shapes for a given N (graph mode, dynamic N); the
  compute grows with N * k (at most about 2 N k rows), not with E, and at most E expert weight sets
  are copied (the spill), half of what padding every expert to whole blocks would copy;
* the same with expert parallel or model parallel (a semi-auto-parallel layout on Ascend): every
  expert on every token as batched matmuls over the expert axis with the routing weights (mostly
  zero) multiplied in. E / k times the routed FLOPs, but it splits over experts like MindFormers'
  MoE and its strategies are the recorded ones;
* ``decode`` (one token per row): on CPU with float32 weights (or their W8A16 int8 values and scales)
  each assignment is multiplied by its expert's weights where they lie
  (:func:`mindformers_ext.cpu_kernels.indexed_matmul_op`, a small C++ operator: each chosen expert read once;
  ds2-moe-150m at batch 1: 37 -> 50 tokens/s). Otherwise (no compiler, bf16 / fp16, Ascend), with
  fewer assignments than experts (N * k < E) the k chosen experts' weights are gathered per token and
  applied as a batched matmul, so a decode step reads k experts per token instead of all E; with
  N * k >= E gathering would copy at least E experts' weights, so every expert runs on the N tokens
  reading its weights in place (the all-experts form above; ds2-moe-150m at batch 8, E 16, k 4: 123 ->
  50 ms per step). That last choice is made when the graph is compiled, so only in static-shape decode
  graphs (``cache_implementation="static"``, the serving engine's buckets); a dynamic-shape graph
  gathers;
* training with ``capacity_factor`` (upstream MindFormers' ``moe_config.capacity_factor``): each expert
  takes at most ``cap = min(N, ceil(capacity_factor * N * k / E))`` assignments, first choices of all
  tokens before second choices, each group in token order (upstream's priority); the rest are
  dropped: they add nothing, the token keeps its shared experts and the residual. One (E, cap, hidden)
  layout times the stacked weights in place, ``E * cap`` rows and no weight copy. It runs when that is
  fewer rows than the exact dispatch above computes (about ``2 N k``), i.e. for factors below about
  2; otherwise the exact dispatch runs, which drops nothing. The dropped and routed assignment counts
  go to a counter (:mod:`mindformers_ext.counters`) that training logs. Inference never drops.

W8A16 (:meth:`RoutedExperts.quantize_w8a16`) stores the stacked weights as int8 with one float32
scale per expert and output feature (``w1_scale`` / ``w3_scale`` (E, inter), ``w2_scale`` (E, hidden));
the batched matmuls run on the int8 values and their outputs are multiplied by the scales (the
decode path gathers the chosen experts' scales with their weights).

**Decoder.** Each layer caches one tensor, the MLA latent (batch, 1, tokens, kv_lora_rank +
qk_rope_head_dim); the first ``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) have
a dense SwiGLU, the others DeepSeekMoE. In training the loss is the token cross-entropy plus the MoE
layers' sequence-level balance loss (``aux_loss_alpha``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import mindspore as ms
from mindspore import Parameter, ops
from mindspore.ops import functional as F
from mindspore.common.initializer import Normal, initializer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.cache import CacheSpec, CachedTensor
from mindformers_ext.counters import COUNTERS, MOE_DROPPED, new_counter
from mindformers_ext.layers import (GroupedAttentionCore, Linear, RMSNorm, RotaryDecoderModel, RotaryEmbedding, SwiGLU,
                                    ms_dtype)
from mindformers_ext.cpu_kernels import indexed_matmul_op
from mindformers_ext.layers.rotary import ApplyRotary
from mindformers_ext.models.causal_lm import CausalLMBase
from mindformers_ext.parallel.check import ParallelCheckError
from mindformers_ext.parallel.shard import ShardedCell, parallel_sizes
from research.deepseek2.deepseek2_config import DeepseekV2Config

__all__ = ["MultiLatentAttention", "TopKRouter", "RoutedExperts", "DeepSeekMoE", "DeepseekV2Model",
           "DeepseekV2ForCausalLM", "DeepseekV2Config", "TOPK_METHODS"]

TOPK_METHODS = ("greedy", "group_limited_greedy")


# ---------------------------------------------------------------- multi-head latent attention
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


# ---------------------------------------------------------------- DeepSeekMoE


class TopKRouter(ShardedCell):
    """Scores (N, E) and the chosen experts (N, k) with their weights (N, k) for tokens x (N, hidden)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, topk_method: str = "greedy",
                 n_group: Optional[int] = None, topk_group: Optional[int] = None,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = False,
                 router_dense_type: str = "float32", param_init_type: str = "float32", init_std: float = 0.02) -> None:
        super().__init__()
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {topk_method!r} is not one of {TOPK_METHODS}")
        self.num_experts, self.top_k, self.topk_method = num_experts, top_k, topk_method
        self.n_group = n_group or 1
        self.topk_group = topk_group or 1
        if topk_method == "group_limited_greedy" and num_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({num_experts}) must be divisible by n_group ({self.n_group})")
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.normalize = bool(norm_topk_prob) and top_k > 1
        self.router_dtype = ms_dtype(router_dense_type)
        self.dense = Linear(hidden_size, num_experts, False, router_dense_type, param_init_type, init_std)
        self.softmax = ops.Softmax(-1)
        self.topk = ops.TopK(sorted=True)
        self.group_topk = ops.TopK(sorted=True)
        self.group_max = ops.ReduceMax(keep_dims=False)
        self.mul_mask = ops.Mul()
        self.cast = ops.Cast()

    def shard(self, dp: int, mp: int = 1) -> None:  # pylint: disable=unused-argument
        """Routing is per token: split tokens over data parallel, keep the expert axis whole."""
        self.dense.shard_column(dp, 1)
        scores = ("B*S", self.num_experts)
        self.shard_op("softmax", self.softmax, ((dp, 1),), (scores,))
        self.shard_op("topk", self.topk, ((dp, 1),), (scores,))
        self.shard_op("mul_mask", self.mul_mask, ((dp, 1), (dp, 1)), (scores, scores))
        if self.topk_method == "group_limited_greedy":
            self.shard_op("group_max", self.group_max, ((dp, 1, 1),),
                          (("B*S", self.n_group, self.num_experts // self.n_group),))
            self.shard_op("group_topk", self.group_topk, ((dp, 1),), (("B*S", self.n_group),))

    def construct(self, x):
        """x (N, hidden) -> scores (N, E) float32, indices (N, k) int32, weights (N, k) float32."""
        n = x.shape[0]
        logits = self.cast(self.dense(ops.expand_dims(self.cast(x, self.router_dtype), 0))[0], ms.float32)
        scores = self.softmax(logits)
        choice = scores
        if self.topk_method == "group_limited_greedy":
            per_group = self.num_experts // self.n_group
            group_scores = self.group_max(ops.reshape(scores, (n, self.n_group, per_group)), -1)
            _, group_idx = self.group_topk(group_scores, self.topk_group)
            group_mask = ops.one_hot(group_idx, self.n_group, 1.0, 0.0).sum(1)  # (N, G), 1 for kept groups
            expert_mask = ops.reshape(ops.broadcast_to(ops.expand_dims(group_mask, -1),
                                                       (n, self.n_group, per_group)), (n, self.num_experts))
            choice = self.mul_mask(scores, expert_mask)
        weights, indices = self.topk(choice, self.top_k)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return scores, self.cast(indices, ms.int32), weights


def sequence_aux_loss(scores, indices, batch: int, num_experts: int, top_k: int, alpha: float, seq_aux: bool):
    """DeepSeek-V2's expert-balance loss from router ``scores`` (N, E) and chosen ``indices`` (N, k)."""
    n = scores.shape[0]
    chosen = ops.one_hot(indices, num_experts, 1.0, 0.0)  # (N, k, E)
    if seq_aux:
        seq = n // batch
        counts = ops.reshape(chosen, (batch, seq * top_k, num_experts)).sum(1)  # (B, E)
        f = counts / (seq * top_k / num_experts)
        p = ops.reshape(scores, (batch, seq, num_experts)).mean(1)
        return (f * p).sum(1).mean() * alpha
    f = ops.reshape(chosen, (n * top_k, num_experts)).mean(0) * num_experts
    return (scores.mean(0) * f).sum() * alpha


class RoutedExperts(ShardedCell):
    """E SwiGLU experts with stacked weights ``ffn.w1`` / ``ffn.w3`` (E, inter, hidden), ``ffn.w2``
    (E, hidden, inter) — the parameter names are ``w1``, ``w2``, ``w3`` of this cell."""

    W8A16_WEIGHTS = ("w1", "w2", "w3")  # what quantize_w8a16 turns into int8 (+ "<name>_scale")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, compute_dtype: str = "float32",
                 param_init_type: str = "float32", init_std: float = 0.02, top_k: int = 1,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.top_k = top_k  # experts per token
        self.capacity_factor = capacity_factor  # training only (module docstring); None: never drop
        # (dropped, routed) assignments of the capacity-limited dispatch
        self.dropped_key = new_counter(MOE_DROPPED, 2) if capacity_factor is not None else None
        dtype = ms_dtype(param_init_type)
        self.compute_dtype = ms_dtype(compute_dtype)
        self.w1 = Parameter(initializer(Normal(sigma=init_std), [num_experts, intermediate_size, hidden_size], dtype),
                            name="w1")
        self.w3 = Parameter(initializer(Normal(sigma=init_std), [num_experts, intermediate_size, hidden_size], dtype),
                            name="w3")
        self.w2 = Parameter(initializer(Normal(sigma=init_std), [num_experts, hidden_size, intermediate_size], dtype),
                            name="w2")
        self.up_all = ops.BatchMatMul(transpose_b=True)
        self.gate_all = ops.BatchMatMul(transpose_b=True)
        self.down_all = ops.BatchMatMul(transpose_b=True)
        self.sigmoid = ops.Sigmoid()
        self.mul_act = ops.Mul()
        self.mul_up = ops.Mul()
        self.mul_route = ops.Mul()
        self.sum_experts = ops.ReduceSum(keep_dims=False)
        self.gather = ops.Gather()
        self.up_k = ops.BatchMatMul(transpose_b=True)
        self.gate_k = ops.BatchMatMul(transpose_b=True)
        self.down_k = ops.BatchMatMul(transpose_b=True)
        self.cast = ops.Cast()
        self.quantized = False
        self.token_dispatch = True  # False once shard() sets an expert / model parallel layout
        # decode on CPU: the chosen experts' weights read in place (module docstring); None: gathered
        float32 = self.compute_dtype == ms.float32 and dtype == ms.float32
        self.indexed_matmul = indexed_matmul_op() if float32 else None
        self.cpu_kernels_enabled = True  # mindformers_ext.cpu_kernels.use_cpu_kernels

    def quantize_w8a16(self, from_weights: bool = True) -> None:
        """int8 w1 / w2 / w3 with per-expert, per-output-feature scales (weight-only);
        ``from_weights=False``: int8 zeros and unit scales, a layout to load an int8 checkpoint into."""
        from mindformers_ext.quant import int8_parameters  # pylint: disable=import-outside-toplevel

        self.w1, self.w1_scale = int8_parameters(self.w1, from_weights)
        self.w3, self.w3_scale = int8_parameters(self.w3, from_weights)
        self.w2, self.w2_scale = int8_parameters(self.w2, from_weights)
        self.quantized = True
        if self.indexed_matmul is not None:  # the decode's in-place product, on int8 values and scales
            self.indexed_matmul_int8 = indexed_matmul_op(int8=True)

    def _scaled(self, out, scale):
        """``out`` (experts or tokens, rows, features) times ``scale`` (experts or tokens, features)."""
        return out * ops.expand_dims(self.cast(scale, self.compute_dtype), 1)

    def shard(self, dp: int, mp: int, ep: int = 1) -> None:
        """Experts split over expert parallel, tokens over the rest of data parallel, the intermediate
        features over model parallel (MindFormers' MoE layout: ep must divide dp)."""
        problems = []
        if dp % ep:
            problems.append(f"expert_parallel ({ep}) must divide data_parallel ({dp}): the routed experts take "
                            "their expert-parallel devices from data parallel")
        if self.num_experts % ep:
            problems.append(f"expert_parallel ({ep}) must divide n_routed_experts ({self.num_experts})")
        if problems:
            raise ParallelCheckError(problems)
        self.token_dispatch = ep == 1 and mp == 1 and ms.get_auto_parallel_context("parallel_mode") not in (
            "semi_auto_parallel", "auto_parallel")
        if not self.token_dispatch and self.capacity_factor is not None:
            warnings.warn(f"capacity_factor {self.capacity_factor}: with expert / model parallel (ep {ep}, mp {mp}) "
                          "every expert runs on every token, so no token is dropped", stacklevel=2)
        tokens_dp = dp // ep
        e, h, f = self.num_experts, self.hidden_size, self.intermediate_size
        x_all = (e, "B*S", h)
        w_in = (e, f, h)
        act = (e, "B*S", f)
        for name in ("gate_all", "up_all"):
            self.shard_op(name, getattr(self, name), ((ep, tokens_dp, 1), (ep, mp, 1)), (x_all, w_in),
                          tied=(((0, 2), (1, 2)),))
        self.shard_op("sigmoid", self.sigmoid, ((ep, tokens_dp, mp),), (act,))
        self.shard_op("mul_act", self.mul_act, ((ep, tokens_dp, mp), (ep, tokens_dp, mp)), (act, act))
        self.shard_op("mul_up", self.mul_up, ((ep, tokens_dp, mp), (ep, tokens_dp, mp)), (act, act))
        self.shard_op("mul_route", self.mul_route, ((ep, tokens_dp, mp), (ep, tokens_dp, 1)), (act, (e, "B*S", 1)))
        self.shard_op("down_all", self.down_all, ((ep, tokens_dp, mp), (ep, 1, mp)), (act, (e, h, f)),
                      tied=(((0, 2), (1, 2)),))
        self.shard_op("sum_experts", self.sum_experts, ((ep, tokens_dp, 1),), ((e, "B*S", h),))
        # decode: the chosen experts' weights are gathered (replicated over experts, split on features)
        self.shard_op("gather", self.gather, ((1, mp, 1), (dp,)), (w_in, (f"B*S*{self.top_k}",)))

    def construct(self, x, indices, weights):
        """x (N, hidden), chosen experts ``indices`` (N, k) with their ``weights`` (N, k) -> (N, hidden)."""
        if self.token_dispatch:
            cap = self._capacity(*indices.shape) if self.training else None
            if cap is not None:
                return self._capacity_limited(x, indices, weights, cap)
            return self._dispatched(x, indices, weights)
        chosen = ops.one_hot(indices, self.num_experts, 1.0, 0.0)  # (N, k, E)
        return self._all_experts(x, (chosen * ops.expand_dims(weights, -1)).sum(1))

    def _dispatched(self, x, indices, weights):
        """Token dispatch: each expert's first ``cap`` assignments in place, the rest in spill blocks
        (see the module docstring)."""
        n, k = indices.shape
        e = self.num_experts
        assignments = n * k
        cap = (assignments + e - 1) // e  # rows per expert in place, and per spill block
        spill = (assignments - 1) // cap + 1  # >= the spill blocks any routing needs (module docstring)
        flat = ops.reshape(indices, (assignments,))
        onehot = ops.one_hot(flat, e, ops.ones((), ms.int32), ops.zeros((), ms.int32))  # (A, E)
        rank = (ops.cumsum(onehot, 0) * onehot).sum(-1) - 1  # the assignment's place among its expert's
        over = (ops.maximum(onehot.sum(0) - cap, 0) + cap - 1) // cap  # spill blocks of each expert
        end = ops.cumsum(over, 0)
        spill_row = (e + ops.gather(end - over, flat, 0)) * cap + rank - cap
        dest = ops.select(rank < cap, flat * cap + rank, spill_row)  # (A,) row in the layout
        token = ops.floor_divide(ops.arange(assignments, dtype=ms.int32), k)
        x = self.cast(x, self.compute_dtype)
        layout = ops.tensor_scatter_update(ops.zeros(((e + spill) * cap, self.hidden_size), x.dtype),
                                           ops.expand_dims(dest, -1), ops.gather(x, token, 0))
        layout = ops.reshape(layout, (e + spill, cap, self.hidden_size))
        # in place: expert j's rows times its own weights, no copy
        main = self._swiglu(layout[:e], (self.gate_all, self.up_all, self.down_all), self.w1, self.w3, self.w2)
        # spill block j belongs to the expert whose blocks end after it (unused blocks: the last expert)
        owner = (ops.expand_dims(end, 0) <= ops.expand_dims(ops.arange(spill, dtype=ms.int32), -1)).astype(
            ms.int32).sum(-1)
        owner = ops.minimum(owner, e - 1)
        extra = self._swiglu(layout[e:], (self.gate_k, self.up_k, self.down_k), self.gather(self.w1, owner, 0),
                             self.gather(self.w3, owner, 0), self.gather(self.w2, owner, 0), owner)
        out = ops.reshape(ops.concat((main, extra), 0), ((e + spill) * cap, self.hidden_size))
        out = ops.gather(out, dest, 0) * self.cast(ops.reshape(weights, (assignments, 1)), self.compute_dtype)
        return ops.reshape(out, (n, k, self.hidden_size)).sum(1)

    def _capacity(self, n, k):
        """Rows per expert of the capacity-limited dispatch for ``n`` tokens, or None where it does not
        apply (no ``capacity_factor``, shapes unknown at compile time, or no fewer rows than the exact
        dispatch)."""
        if self.capacity_factor is None or F.is_sequence_value_unknown((n, k)):
            return None
        e, assignments = self.num_experts, n * k
        cap = min(n, int(-(-self.capacity_factor * assignments // e)))
        block = (assignments + e - 1) // e
        exact_rows = (e + (assignments - 1) // block + 1) * block
        return cap if e * cap < exact_rows else None

    def _capacity_limited(self, x, indices, weights, cap):
        """Each expert's first ``cap`` assignments (first choices first), the rest dropped and counted."""
        n, k = indices.shape
        e = self.num_experts
        assignments = n * k
        flat = ops.reshape(ops.transpose(indices, (1, 0)), (assignments,))  # choice-major: (k, n)
        onehot = ops.one_hot(flat, e, ops.ones((), ms.int32), ops.zeros((), ms.int32))  # (A, E)
        rank = (ops.cumsum(onehot, 0) * onehot).sum(-1) - 1
        kept = rank < cap
        dest = ops.select(kept, flat * cap + rank, ops.full_like(flat, e * cap))  # dropped: one spare row
        x = self.cast(x, self.compute_dtype)
        layout = ops.tensor_scatter_update(ops.zeros((e * cap + 1, self.hidden_size), x.dtype),
                                           ops.expand_dims(dest, -1), ops.tile(x, (k, 1)))
        out = self._swiglu(ops.reshape(layout[:e * cap], (e, cap, self.hidden_size)),
                           (self.gate_all, self.up_all, self.down_all), self.w1, self.w3, self.w2)
        out = ops.concat((ops.reshape(out, (e * cap, self.hidden_size)), ops.zeros((1, self.hidden_size), x.dtype)))
        routing = ops.reshape(ops.transpose(weights, (1, 0)), (assignments, 1))
        out = ops.gather(out, dest, 0) * self.cast(routing, self.compute_dtype)
        dropped = assignments - kept.astype(ms.int64).sum()
        ops.assign_add(COUNTERS[self.dropped_key], ops.stack((dropped, dropped * 0 + assignments)))
        return ops.reshape(out, (k, n, self.hidden_size)).sum(0)

    def _swiglu(self, xb, matmuls, w1, w3, w2, owner=None):
        """Blocks ``xb`` (blocks, rows, hidden) through SwiGLU experts whose weights w1, w3, w2 line up
        with the blocks: the stacked ones (``owner`` None) or those gathered for experts ``owner``."""
        gate_mm, up_mm, down_mm = matmuls
        gate = gate_mm(xb, self.cast(w1, self.compute_dtype))
        up = up_mm(xb, self.cast(w3, self.compute_dtype))
        if self.quantized:
            gate = self._scaled(gate, self._scale(self.w1_scale, owner))
            up = self._scaled(up, self._scale(self.w3_scale, owner))
        out = down_mm(gate * ops.sigmoid(gate) * up, self.cast(w2, self.compute_dtype))
        if self.quantized:
            out = self._scaled(out, self._scale(self.w2_scale, owner))
        return out

    def _scale(self, scale, owner):
        """W8A16 scales lined up with the blocks: all experts' (``owner`` None) or experts ``owner``'s."""
        return scale if owner is None else self.gather(scale, owner, 0)

    def _in_place(self, x, weight: str, flat):
        """Rows ``x`` times the experts ``flat`` of stacked weight ``weight`` (its int8 values and scales
        once quantized), read where they lie."""
        if self.quantized:
            return self.indexed_matmul_int8(x, getattr(self, weight), getattr(self, weight + "_scale"), flat)
        return self.indexed_matmul(x, getattr(self, weight), flat)

    def _all_experts(self, x, routing):
        """x (N, hidden), routing (N, E) weights (zero for experts not chosen) -> (N, hidden)."""
        n = x.shape[0]
        x_all = ops.broadcast_to(ops.expand_dims(self.cast(x, self.compute_dtype), 0),
                                 (self.num_experts, n, self.hidden_size))
        gate = self.gate_all(x_all, self.cast(self.w1, self.compute_dtype))
        up = self.up_all(x_all, self.cast(self.w3, self.compute_dtype))
        if self.quantized:
            gate, up = self._scaled(gate, self.w1_scale), self._scaled(up, self.w3_scale)
        act = self.mul_up(self.mul_act(gate, self.sigmoid(gate)), up)
        route = self.cast(ops.expand_dims(ops.transpose(routing, (1, 0)), -1), self.compute_dtype)  # (E, N, 1)
        act = self.mul_route(act, route)
        out = self.down_all(act, self.cast(self.w2, self.compute_dtype))
        if self.quantized:
            out = self._scaled(out, self.w2_scale)
        return self.sum_experts(out, 0)

    def decode(self, x, indices, weights):
        """x (N, hidden), indices / weights (N, k) -> (N, hidden), reading only the chosen experts (or,
        in a static-shape graph with N * k >= E, every expert once in place)."""
        n, k = indices.shape
        flat = ops.reshape(indices, (n * k,))
        if self.indexed_matmul is not None and self.cpu_kernels_enabled:  # each chosen expert read once, in place
            xk = ops.reshape(ops.broadcast_to(ops.expand_dims(x, 1), (n, k, self.hidden_size)),
                             (n * k, self.hidden_size))
            gate = self._in_place(xk, "w1", flat)
            act = gate * ops.sigmoid(gate) * self._in_place(xk, "w3", flat)
            out = self._in_place(act, "w2", flat) * ops.reshape(weights, (n * k, 1))
            return ops.reshape(out, (n, k, self.hidden_size)).sum(1)
        if not F.is_sequence_value_unknown(indices.shape):  # N known when compiling: no run-time branch
            if n * k >= self.num_experts:
                chosen = ops.one_hot(indices, self.num_experts, 1.0, 0.0)  # (N, k, E)
                return self._all_experts(x, (chosen * ops.expand_dims(weights, -1)).sum(1))
        xk = ops.reshape(ops.broadcast_to(ops.expand_dims(self.cast(x, self.compute_dtype), 1),
                                          (n, k, self.hidden_size)), (n * k, 1, self.hidden_size))
        # each (token, expert) pair a block of one row, with that expert's weights gathered for it
        out = self._swiglu(xk, (self.gate_k, self.up_k, self.down_k), self.gather(self.w1, flat, 0),
                           self.gather(self.w3, flat, 0), self.gather(self.w2, flat, 0), flat)  # (N*k, 1, hidden)
        out = out * self.cast(ops.reshape(weights, (n * k, 1, 1)), self.compute_dtype)
        return ops.reshape(out, (n, k, self.hidden_size)).sum(1)


class DeepSeekMoE(ShardedCell):
    """Shared experts (always on) + routed experts: ``shared(x) + sum_k w_k expert_k(x)``.

    ``construct`` returns (output (B, S, hidden), aux loss); the aux loss is computed only in
    training with ``aux_loss_alpha > 0`` (else 0).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, moe_intermediate_size: int,
                 n_shared_experts: Optional[int], topk_method: str = "greedy", n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, routed_scaling_factor: float = 1.0, norm_topk_prob: bool = False,
                 aux_loss_alpha: float = 0.0, seq_aux: bool = True, compute_dtype: str = "float32",
                 param_init_type: str = "float32", router_dense_type: str = "float32", init_std: float = 0.02,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__()
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.aux_loss_alpha, self.seq_aux = float(aux_loss_alpha), bool(seq_aux)
        common = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        self.router = TopKRouter(hidden_size, num_experts, top_k, topk_method, n_group, topk_group,
                                 routed_scaling_factor, norm_topk_prob, router_dense_type, param_init_type, init_std)
        self.ffn = RoutedExperts(num_experts, hidden_size, moe_intermediate_size, top_k=top_k,
                                 capacity_factor=capacity_factor, **common)
        self.has_shared = bool(n_shared_experts)
        if self.has_shared:
            self.shared_experts = SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts, False, **common)
        self.cast = ops.Cast()

    def shard(self, dp: int, mp: int, ep: int = 1) -> None:
        """Router per token, experts over expert parallel, shared experts like a dense MLP."""
        self.router.shard(dp, mp)
        self.ffn.shard(dp, mp, ep)
        if self.has_shared:
            self.shared_experts.shard(dp, mp)

    def construct(self, x, decode=False):
        """x (B, S, hidden) -> (output, aux loss). ``decode`` (a few tokens, inference) reads only the
        chosen experts' weights; otherwise every expert runs on the tokens routed to it."""
        bs, seq, _ = x.shape
        tokens = ops.reshape(x, (bs * seq, self.hidden_size))
        scores, indices, weights = self.router(tokens)
        if decode:
            routed = self.ffn.decode(tokens, indices, weights)
        else:
            routed = self.ffn(tokens, indices, weights)
        out = ops.reshape(self.cast(routed, x.dtype), (bs, seq, self.hidden_size))
        if self.has_shared:
            out = out + self.shared_experts(x)
        aux = ops.zeros((), ms.float32)
        if self.training and self.aux_loss_alpha > 0:
            aux = sequence_aux_loss(scores, indices, bs, self.num_experts, self.top_k, self.aux_loss_alpha,
                                    self.seq_aux)
        return out, aux


# ---------------------------------------------------------------- decoder
class DeepseekV2MLP(SwiGLU):
    """Dense SwiGLU of the first ``first_k_dense_replace`` layers (``feed_forward.w1/w2/w3``; with
    ``qkv_concat`` ``feed_forward.w_gate_hidden`` and ``w2``, as upstream's ``ffn_concat``)."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, False, compute_dtype=config.compute_dtype,
                         param_init_type=config.param_init_type, init_std=config.initializer_range,
                         concat=config.qkv_concat)


class DeepseekV2MoE(DeepSeekMoE):
    """Shared + routed experts (``feed_forward.router`` / ``.ffn`` / ``.shared_experts``)."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__(config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, config.n_shared_experts, config.topk_method, config.n_group,
                         config.topk_group, config.routed_scaling_factor, config.norm_topk_prob,
                         config.aux_loss_alpha, config.seq_aux, compute_dtype=config.compute_dtype,
                         param_init_type=config.param_init_type, router_dense_type=config.router_dense_type,
                         init_std=config.initializer_range, capacity_factor=config.capacity_factor)


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

    def construct(self, x, rope, mask, cache=None, slot=None, decode=False):
        """-> (output, this layer's updated cache or (), aux loss of this layer (0 for dense layers));
        ``rope`` is (cos, sin); ``decode`` selects MLA's absorbed attention and the MoE's expert gather."""
        attn, cache = self.attention(self.attention_norm(x), *rope, mask, cache, slot, decode)
        x = x + attn
        if self.is_moe:
            ff, aux = self.feed_forward(self.ffn_norm(x), decode)
        else:
            ff, aux = self.feed_forward(self.ffn_norm(x)), ops.zeros((), ms.float32)
        return x + ff, cache, aux


class DeepseekV2Model(RotaryDecoderModel):
    """Embedding, decoder layers and final norm; one latent cache tensor per layer; the summed MoE balance
    loss (training) as the auxiliary loss."""

    def __init__(self, config: DeepseekV2Config) -> None:
        dp, mp, _, ep = parallel_sizes(config.parallel_config)
        method = "YARN" if config.extend_method == "YARN" else "None"
        super().__init__(config, CacheSpec(((1, config.kv_lora_rank + config.qk_rope_head_dim),), config.num_layers,
                                           config.kv_cache_dtype == "int8"),
                         RotaryEmbedding(config.qk_rope_head_dim, config.theta, method, config.rotary_scaling(),
                                         config.max_position_embeddings),
                         DeepseekV2DecoderLayer, (dp, mp, ep))


# ---------------------------------------------------------------- causal LM
@MindFormerRegister.register(MindFormerModuleType.MODELS)
class DeepseekV2ForCausalLM(CausalLMBase):
    """DeepSeek-V2 / V2-Lite. In training the loss is the token cross-entropy plus the MoE layers'
    sequence-level balance loss (``aux_loss_alpha``), which DeepSeek adds to the gradient."""

    config_class = DeepseekV2Config

    def __init__(self, config: Optional[DeepseekV2Config] = None) -> None:
        config = config if config is not None else DeepseekV2Config()
        # MindFormers' Trainer may set ``config.moe_config`` after the config was built
        config.apply_moe_config(getattr(config, "moe_config", None))
        super().__init__(config, DeepseekV2Model(config))
