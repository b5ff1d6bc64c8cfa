"""WizardCoder-15B: GPT-BigCode decoder (StarCoder / SantaCoder / WizardCoder) and its causal LM.

Architecture (HF ``GPTBigCodeForCausalLM``): token + learned absolute position embeddings, pre-norm
blocks with LayerNorm, biased projections, a GELU MLP (``c_fc`` / ``c_proj``; exact or tanh GELU per
``hidden_act``), final LayerNorm and an LM head tied to the token embedding.

Attention comes in HF's two layouts of the fused ``c_attn`` projection:

* multi-query (``multi_query: True``, every released checkpoint): the output is
  ``[q (hidden) | k (head_dim) | v (head_dim)]``. We keep it as two projections, ``q_attn`` (split
  over model parallel by heads) and ``kv_attn`` (the one key/value head, replicated), so tensor
  parallelism needs no re-layout; the KV cache holds that one head, (batch, 1, tokens, head_dim).
  With ``qkv_concat`` the two are one ``c_attn`` matmul again (checkpoints may keep them apart, see
  :class:`mindformers_ext.layers.FusedLinear`); it cannot split over model parallel.
* multi-head (``multi_query: False``): the output is per head ``(heads, 3 * head_dim)`` =
  ``[q_h | k_h | v_h]`` for each head; kept fused as ``c_attn``, which splits over model parallel by
  whole heads as it is.

The weight map (``mindformers_ext/convert/maps/wizardcoder.py``) splits / joins ``c_attn`` accordingly.

Top to bottom: attention core and attention, decoder layer, model, the family's causal LM, then
WizardCoder's registered names: YAML ``model.arch.type: WizardCoderForCausalLM``
(``WizardCoderLMHeadModel``, the seed's name, is the same class) with ``model.model_config.type:
WizardCoderConfig``; ``processor.type: WizardCoderProcessor``.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import ops

from mindformers.models.llama.llama_processor import LlamaProcessor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.cache import CacheSpec
from mindformers_ext.layers import (CachedSelfAttention, FusedLinear, GeluMLP, GroupedAttentionCore, LayerNorm, Linear,
                                    PreNormDecoderLayer, VocabEmbedding, ms_dtype)
from mindformers_ext.models.causal_lm import CausalLMBase
from mindformers_ext.models.gpt_bigcode_config import GPTBigCodeFamilyConfig
from mindformers_ext.parallel.shard import (ShardedCell, fuse_outer_gradients, parallel_sizes, pin_stages,
                                           pipeline_layers, vocab_emb_dp)
from research.wizardcoder.wizardcoder_config import WizardCoderConfig

__all__ = ["GPTBigCodeFamilyForCausalLM", "WizardCoderForCausalLM", "WizardCoderLMHeadModel", "WizardCoderProcessor"]


class GPTBigCodeAttentionCore(GroupedAttentionCore):
    """The shared attention core, sharded for multi-query too: with fewer key/value heads than model
    parallel ranks (one, for multi-query) the query heads are split and the key/value head replicated."""

    def shard(self, dp: int, mp: int) -> None:
        if self.kv_heads % mp == 0:
            super().shard(dp, mp)
            return
        gs = ("B", self.kv_heads, f"{self.group}*S", self.qk_dim)
        k = ("B", self.kv_heads, "T", self.qk_dim)
        v = ("B", self.kv_heads, "T", self.v_dim)
        scores = ("B", self.kv_heads, f"{self.group}*S", "T")
        self.shard_op("qk", self.qk, ((dp, 1, mp, 1), (dp, 1, 1, 1)), (gs, k), tied=(((0, 3), (1, 3)),))
        self.shard_op("mul_scale", self.mul_scale, ((dp, 1, mp, 1), ()), (scores, ()))
        self.shard_op("softmax", self.softmax, ((dp, 1, mp, 1),), (scores,))
        self.shard_op("pv", self.pv, ((dp, 1, mp, 1), (dp, 1, 1, 1)), (scores, v), tied=(((0, 3), (1, 2)),))


class GPTBigCodeAttention(CachedSelfAttention):
    """Self-attention with GPT-BigCode's projections (see the module docstring) and a static KV cache
    (K and V of ``kv_heads`` heads: one for multi-query)."""

    def __init__(self, hidden_size: int, heads: int, multi_query: bool = True, scale_attn_weights: bool = True,
                 compute_dtype: str = "float32", param_init_type: str = "float32",
                 softmax_compute_type: str = "float32", init_std: float = 0.02, kv_cache_int8: bool = False,
                 qkv_concat: bool = False) -> None:
        if hidden_size % heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by heads ({heads})")
        head_dim, kv_heads = hidden_size // heads, 1 if multi_query else heads
        scale = head_dim ** -0.5 if scale_attn_weights else 1.0
        super().__init__(GPTBigCodeAttentionCore(heads, kv_heads, head_dim, head_dim, scale, softmax_compute_type),
                         kv_cache_int8)
        self.hidden_size, self.heads, self.multi_query = hidden_size, heads, multi_query
        self.head_dim, self.kv_heads = head_dim, kv_heads
        self.fused_mqa = multi_query and qkv_concat
        linear = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        if self.fused_mqa:
            self.c_attn = FusedLinear(hidden_size, (("q_attn", hidden_size), ("kv_attn", 2 * self.head_dim)), 1,
                                      True, **linear)
        elif multi_query:
            self.q_attn = Linear(hidden_size, hidden_size, True, **linear)
            self.kv_attn = Linear(hidden_size, 2 * self.head_dim, True, **linear)
            self.split = ops.Split(-1, 2)
        else:
            self.c_attn = Linear(hidden_size, 3 * hidden_size, True, **linear)
            self.split = ops.Split(3, 3)
        self.c_proj = Linear(hidden_size, hidden_size, True, **linear)

    def shard(self, dp: int, mp: int) -> None:
        """Query heads split over model parallel; the multi-query key/value head is replicated."""
        if self.fused_mqa:
            if mp > 1:
                raise ValueError(f"qkv_concat: True with multi_query: True keeps the query and the one key/value "
                                 f"head in one c_attn matmul, which cannot split over model_parallel {mp}; "
                                 "set qkv_concat: False for tensor parallelism")
            self.c_attn.shard_column(dp, 1)
        elif self.multi_query:
            self.q_attn.shard_column(dp, mp)
            self.kv_attn.shard_column(dp, 1)
            self.shard_op("split", self.split, ((dp, 1, 1),), (("B", "S", 2 * self.head_dim),))
        else:
            self.c_attn.shard_column(dp, mp)
            self.shard_op("split", self.split, ((dp, 1, mp, 1, 1),), (("B", "S", self.heads, 3, self.head_dim),))
        self.c_proj.shard_row(dp, mp)
        self.core.shard(dp, mp)

    def _project(self, x):
        """q (B, S, heads, head_dim); k, v (B, kv_heads, S, head_dim)."""
        bs, seq, _ = x.shape
        if self.multi_query:
            if self.fused_mqa:
                qkv = self.c_attn(x)
                q, k, v = (qkv[:, :, :self.hidden_size], qkv[:, :, self.hidden_size:self.hidden_size + self.head_dim],
                           qkv[:, :, self.hidden_size + self.head_dim:])
            else:
                q = self.q_attn(x)
                k, v = self.split(self.kv_attn(x))
            q = self.reshape(q, (bs, seq, self.heads, self.head_dim))
            # one head: (B, S, D) -> (B, 1, S, D) keeps the memory order
            return q, self.reshape(k, (bs, 1, seq, self.head_dim)), self.reshape(v, (bs, 1, seq, self.head_dim))
        qkv = self.reshape(self.c_attn(x), (bs, seq, self.heads, 3, self.head_dim))
        q, k, v = self.split(qkv)
        shape = (bs, seq, self.heads, self.head_dim)
        q, k, v = self.reshape(q, shape), self.reshape(k, shape), self.reshape(v, shape)
        return q, self.transpose_k(k, (0, 2, 1, 3)), self.transpose_v(v, (0, 2, 1, 3))

    def construct(self, x, mask, cache=None, slot=None, decode=False):
        """x (B, S, hidden) -> (output (B, S, hidden), updated (k, v) cache or ()); the cache and mask
        conventions are the Llama family's (``research.deepseek1_5.deepseek1_5.CausalSelfAttention``)."""
        q, k, v = self._project(x)
        entries, k, v = self.kv_cache(cache, k, v, slot, decode)
        return self.c_proj(self.core(q, k, v, mask)), entries


class GPTBigCodeDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block of LayerNorm (HF's ``ln_1`` / ``ln_2``), attention and the GELU MLP; no rotary
    embedding (its model passes ``rope=()``)."""

    def __init__(self, config: GPTBigCodeFamilyConfig, layer_id: int) -> None:
        super().__init__(layer_id)
        common = dict(compute_dtype=config.compute_dtype, param_init_type=config.param_init_type,
                      init_std=config.initializer_range)
        norm = dict(eps=config.layer_norm_epsilon, compute_type=config.layernorm_compute_type,
                    param_init_type=config.param_init_type)
        self.attention_norm = LayerNorm(config.hidden_size, **norm)
        self.attention = GPTBigCodeAttention(config.hidden_size, config.num_heads, config.multi_query,
                                             config.scale_attn_weights,
                                             softmax_compute_type=config.softmax_compute_type,
                                             kv_cache_int8=config.kv_cache_dtype == "int8",
                                             qkv_concat=config.qkv_concat, **common)
        self.ffn_norm = LayerNorm(config.hidden_size, **norm)
        self.feed_forward = GeluMLP(config.hidden_size, config.intermediate_size, config.gelu_approximate,
                                    True, **common)


class GPTBigCodeModel(ShardedCell):
    """Token + position embeddings, decoder layers, final LayerNorm.

    Cache: (k, v) per layer, each (B, kv_heads, T, head_dim) with kv_heads = 1 for multi-query.
    """

    def __init__(self, config: GPTBigCodeFamilyConfig) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.cache_spec = CacheSpec(((config.kv_heads, config.hidden_size // config.num_heads),) * 2,
                                    config.num_layers, config.kv_cache_dtype == "int8")
        dp, mp, pp, _ = parallel_sizes(config.parallel_config)
        self.tok_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size, config.param_init_type,
                                             config.initializer_range)
        self.tok_embeddings.shard(dp, mp, vocab_emb_dp(config.parallel_config))
        self.position_embeddings = VocabEmbedding(config.n_position, config.hidden_size, config.param_init_type,
                                                  config.initializer_range)
        self.position_embeddings.shard(dp, mp, True)  # a small table: always replicated
        self.add_positions = ops.Add()
        self.shard_op("add_positions", self.add_positions, ((dp, 1, 1), (dp, 1, 1)),
                      (("B", "S", config.hidden_size), ("B", "S", config.hidden_size)))
        self.cast = ops.Cast()
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.layers = pipeline_layers(GPTBigCodeDecoderLayer, config, (dp, mp), pp)
        self.norm_out = LayerNorm(config.hidden_size, config.layer_norm_epsilon, config.layernorm_compute_type,
                                  config.param_init_type)
        self.norm_out.shard(dp, mp)
        pin_stages(pp, first=(self.tok_embeddings, self.position_embeddings), last=(self.norm_out,))
        fuse_outer_gradients(config, pp, self.tok_embeddings, self.position_embeddings, self.norm_out)

    def embed(self, input_ids, position_ids):
        """Token plus position embeddings, in the compute dtype."""
        x = self.add_positions(self.tok_embeddings(input_ids), self.position_embeddings(position_ids))
        return self.cast(x, self.compute_dtype)

    def construct(self, input_ids, position_ids, mask, cache=None, slot=None, decode=False):
        """-> (hidden, updated cache tuple or (), aux loss 0); as :class:`research.deepseek1_5.deepseek1_5.LlamaModel`."""
        x = self.embed(input_ids, position_ids)
        new_cache = ()
        for i in range(self.num_layers):
            x, layer_cache = self.layers[i](x, (), mask, self.cache_spec.layer(cache, i), slot, decode)
            new_cache = new_cache + layer_cache
        return self.norm_out(x), new_cache, ops.zeros((), ms.float32)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPTBigCodeFamilyForCausalLM(CausalLMBase):
    """GPT-BigCode causal LM (StarCoder-family; WizardCoder subclasses it). The LM head is the token
    embedding when ``tie_word_embeddings`` (as in every released GPT-BigCode checkpoint)."""

    config_class = GPTBigCodeFamilyConfig

    def __init__(self, config: GPTBigCodeFamilyConfig = None) -> None:
        config = config if config is not None else GPTBigCodeFamilyConfig()
        super().__init__(config, GPTBigCodeModel(config))


__all__ = ["WizardCoderForCausalLM", "WizardCoderLMHeadModel", "WizardCoderProcessor"]


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class WizardCoderForCausalLM(GPTBigCodeFamilyForCausalLM):
    """WizardCoder-15B (GPT-BigCode); any GPT-BigCode checkpoint loads with a matching config."""

    config_class = WizardCoderConfig

    def __init__(self, config: Optional[WizardCoderConfig] = None) -> None:
        super().__init__(config if config is not None else WizardCoderConfig())


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class WizardCoderLMHeadModel(WizardCoderForCausalLM):
    """The seed's name for :class:`WizardCoderForCausalLM` (same parameters and behaviour)."""


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class WizardCoderProcessor(LlamaProcessor):
    """Text processor around :class:`WizardCoderTokenizer` (MindFormers' pipelines build it from YAML)."""

    tokenizer_class = ("WizardCoderTokenizer",)
