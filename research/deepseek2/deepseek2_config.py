"""DeepSeek-V2 configuration: MLA, DeepSeekMoE and YaRN fields on MindFormers' config conventions.

Field names follow upstream MindFormers' ``DeepseekV2Config`` YAMLs (``num_layers``, ``num_heads``,
``theta``, ``extend_method`` / ``scaling_factor``, ``max_position_embeddings``); the MoE fields use
the names of DeepSeek's own ``config.json`` (``n_routed_experts``, ``num_experts_per_tok`` ...). An
upstream-style ``moe_config`` section (``expert_num``, ``num_experts_chosen``, ``shared_expert_num``
...) is accepted too and fills the MoE fields that the model config leaves unset.

Defaults are DeepSeek-V2 (236B); :meth:`DeepseekV2Config.from_preset` gives V2-Lite (16B).
"""
from __future__ import annotations

from typing import Any, Optional, Union

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.layers.rotary import yarn_get_mscale
from mindformers_ext.models.base_config import CausalLMConfigBase, canonical_dtype, rotary_dtype_field
from mindformers_ext.upstream import MOE_CONFIG_FIELDS

TOPK_METHODS = ("greedy", "group_limited_greedy")
EXTEND_METHODS = ("None", "YARN")

# MoE fields and their DeepSeek-V2 (236B) defaults (MOE_CONFIG_FIELDS: the upstream moe_config key of each).
MOE_DEFAULTS: dict[str, Any] = dict(
    n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1536,
    first_k_dense_replace=1, moe_layer_freq=1, topk_method="group_limited_greedy", n_group=8, topk_group=3,
    routed_scaling_factor=16.0, norm_topk_prob=False, aux_loss_alpha=0.003, seq_aux=True,
)

_YARN_236B = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                  mscale=0.707, mscale_all_dim=0.707)

# Shapes of the released checkpoints (their HF config.json files); Chat variants share them.
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v2": dict(hidden_size=5120, num_layers=60, num_heads=128, intermediate_size=12288,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, vocab_size=102400, max_position_embeddings=163840, rms_norm_eps=1e-6,
                        theta=10000.0, extend_method="YARN", scaling_factor=dict(_YARN_236B),
                        bos_token_id=100000, eos_token_id=100001, pad_token_id=100001, **MOE_DEFAULTS),
    "deepseek-v2-lite": dict(hidden_size=2048, num_layers=27, num_heads=16, intermediate_size=10944,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, vocab_size=102400, max_position_embeddings=163840,
                             rms_norm_eps=1e-6, theta=10000.0, extend_method="YARN",
                             scaling_factor=dict(_YARN_236B), bos_token_id=100000, eos_token_id=100001,
                             pad_token_id=100001,
                             **{**MOE_DEFAULTS, "n_routed_experts": 64, "num_experts_per_tok": 6,
                                "moe_intermediate_size": 1408, "topk_method": "greedy", "n_group": 1,
                                "topk_group": 1, "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001}),
}
PRESETS["deepseek-v2-chat"] = PRESETS["deepseek-v2"]
PRESETS["deepseek-v2-lite-chat"] = PRESETS["deepseek-v2-lite"]


def _moe_source(moe_config: Any) -> dict[str, Any]:
    """Our MoE fields from an upstream ``moe_config`` (dict or MindFormers MoEConfig); {} for none.

    MindFormers' Trainer passes its default ``MoEConfig()`` (one expert) when a YAML has no
    ``moe_config`` section: that one carries no information and is ignored.
    """
    if moe_config is None:
        return {}
    get = moe_config.get if isinstance(moe_config, dict) else lambda k, d=None: getattr(moe_config, k, d)
    if int(get("expert_num", 1) or 1) <= 1:
        return {}
    out = {ours: get(theirs) for theirs, ours in MOE_CONFIG_FIELDS.items() if get(theirs) is not None}
    if "capacity_factor" not in out:  # a section without it has upstream MoEConfig's default (ours: no drops)
        out["capacity_factor"] = _as_moe_config({}).capacity_factor
    if isinstance(out.get("first_k_dense_replace"), bool):  # upstream's MoEConfig default is True
        out.pop("first_k_dense_replace")
    types, factors = list(get("aux_loss_types") or []), list(get("aux_loss_factors") or [])
    if "expert" in types and len(factors) > types.index("expert"):
        out["aux_loss_alpha"] = float(factors[types.index("expert")])
    elif types == [] and factors == [] and get("aux_loss_types") is not None:
        out["aux_loss_alpha"] = 0.0
    return out


def _as_moe_config(moe_config: dict) -> Any:
    """A MindFormers ``MoEConfig`` from an upstream ``moe_config`` dict (keys it does not know dropped)."""
    import inspect  # pylint: disable=import-outside-toplevel
    from mindformers.modules.transformer.moe import MoEConfig  # pylint: disable=import-outside-toplevel

    known = set(inspect.signature(MoEConfig.__init__).parameters)
    return MoEConfig(**{k: v for k, v in dict(moe_config).items() if k in known})


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class DeepseekV2Config(CausalLMConfigBase):
    """DeepSeek-V2 config (YAML ``model.model_config.type: DeepseekV2Config``).

    Attention (MLA): ``q_lora_rank`` (None: a plain query projection, as V2-Lite), ``kv_lora_rank``,
    ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``. Positions: ``theta`` and
    ``extend_method`` "None" or "YARN" with ``scaling_factor`` = {factor,
    original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim} (DeepSeek's
    ``rope_scaling``). MoE: see ``MOE_DEFAULTS``; ``n_routed_experts=None`` makes every layer dense.
    ``capacity_factor`` (training only): each expert takes at most ``ceil(capacity_factor * tokens * k /
    E)`` assignments of a step's tokens and the rest are dropped and logged, as upstream MindFormers'
    MoE does; unset, nothing is dropped. A ``moe_config`` section without it gets upstream's 1.1.
    """

    model_type = "deepseek_v2_ms"

    def __init__(self,
                 seq_length: int = 4096,
                 hidden_size: int = 5120,
                 num_layers: int = 60,
                 num_heads: int = 128,
                 n_kv_heads: Optional[int] = None,
                 intermediate_size: int = 12288,
                 q_lora_rank: Optional[int] = 1536,
                 kv_lora_rank: int = 512,
                 qk_nope_head_dim: int = 128,
                 qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128,
                 vocab_size: int = 102400,
                 rms_norm_eps: float = 1e-6,
                 theta: float = 10000.0,
                 extend_method: str = "YARN",
                 scaling_factor: Union[dict, float, None] = None,
                 max_position_embeddings: Optional[int] = None,
                 max_position_embedding: Optional[int] = None,
                 hidden_act: str = "silu",
                 attention_bias: bool = False,
                 tie_word_embeddings: bool = False,
                 n_routed_experts: Optional[int] = -1,
                 n_shared_experts: Optional[int] = None,
                 num_experts_per_tok: Optional[int] = None,
                 moe_intermediate_size: Optional[int] = None,
                 first_k_dense_replace: Optional[int] = None,
                 moe_layer_freq: Optional[int] = None,
                 topk_method: Optional[str] = None,
                 n_group: Optional[int] = None,
                 topk_group: Optional[int] = None,
                 routed_scaling_factor: Optional[float] = None,
                 norm_topk_prob: Optional[bool] = None,
                 aux_loss_alpha: Optional[float] = None,
                 seq_aux: Optional[bool] = None,
                 capacity_factor: Optional[float] = None,
                 scoring_func: str = "softmax",
                 moe_config: Any = None,
                 bos_token_id: int = 100000,
                 eos_token_id: Union[int, list] = 100001,
                 pad_token_id: int = 100001,
                 rotary_dtype: str = "float32",
                 router_dense_type: str = "float32",
                 multiple_of: Optional[int] = None,
                 **kwargs):
        super().__init__(seq_length=seq_length, **kwargs)
        del multiple_of, n_kv_heads  # upstream YAML keys with no meaning for MLA
        if extend_method not in EXTEND_METHODS:
            raise ValueError(f"extend_method {extend_method!r} is not supported for DeepSeek-V2; expected one of "
                             f"{EXTEND_METHODS}")
        if scoring_func != "softmax":
            raise ValueError(f"scoring_func {scoring_func!r} is not supported; DeepSeek-V2 uses 'softmax'")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({qk_rope_head_dim}) must be even")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.q_lora_rank = q_lora_rank or None
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.theta = theta
        self.extend_method = extend_method
        if extend_method == "YARN":
            if scaling_factor is None:
                scaling_factor = dict(_YARN_236B)
            if not isinstance(scaling_factor, dict) or "factor" not in scaling_factor:
                raise ValueError("extend_method YARN needs scaling_factor: {factor, original_max_position_embeddings, "
                                 f"beta_fast, beta_slow, mscale, mscale_all_dim}}; got {scaling_factor!r}")
            scaling_factor = dict(scaling_factor)
        self.scaling_factor = scaling_factor
        self.max_position_embeddings = int(max_position_embeddings or max_position_embedding or seq_length)
        self.max_position_embedding = self.max_position_embeddings  # the name our generate() reads
        self.hidden_act = hidden_act
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; DeepSeek-V2 uses 'silu'")
        self.attention_bias = attention_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.scoring_func = scoring_func
        explicit = dict(n_shared_experts=n_shared_experts, num_experts_per_tok=num_experts_per_tok,
                        moe_intermediate_size=moe_intermediate_size, first_k_dense_replace=first_k_dense_replace,
                        moe_layer_freq=moe_layer_freq, topk_method=topk_method, n_group=n_group,
                        topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                        norm_topk_prob=norm_topk_prob, aux_loss_alpha=aux_loss_alpha, seq_aux=seq_aux,
                        capacity_factor=capacity_factor)
        if n_routed_experts != -1:  # -1: not given (None means a dense model)
            explicit["n_routed_experts"] = n_routed_experts
        self._explicit_moe = {k: v for k, v in explicit.items() if v is not None or k == "n_routed_experts"}
        self.apply_moe_config(moe_config)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.rotary_dtype = rotary_dtype_field(rotary_dtype)
        self.router_dense_type = canonical_dtype(router_dense_type)

    def apply_moe_config(self, moe_config: Any = None) -> None:
        """Resolve the MoE fields: explicit model_config values, then ``moe_config``, then the defaults.

        Called again by the model when MindFormers' Trainer sets ``config.moe_config`` after the
        config was built.
        """
        resolved = dict(MOE_DEFAULTS, capacity_factor=None)
        resolved.update(_moe_source(moe_config))
        resolved.update(getattr(self, "_explicit_moe", {}))
        for key, value in resolved.items():
            setattr(self, key, value)
        if moe_config is None:
            self.__dict__.pop("moe_config", None)
        else:  # MindFormers serialises ``moe_config`` with its to_dict()
            self.moe_config = moe_config if hasattr(moe_config, "to_dict") else _as_moe_config(moe_config)
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.n_routed_experts is None:
            return
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not one of {TOPK_METHODS}")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                             f"({self.n_routed_experts})")
        if self.capacity_factor is not None and not float(self.capacity_factor) > 0:
            raise ValueError(f"capacity_factor ({self.capacity_factor}) must be > 0 (or unset: no token dropped)")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq ({self.moe_layer_freq}) must be >= 1")
        if self.topk_method == "group_limited_greedy":
            groups, chosen = self.n_group or 1, self.topk_group or 1
            if self.n_routed_experts % groups:
                raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({groups})")
            if not 1 <= chosen <= groups:
                raise ValueError(f"topk_group ({chosen}) must be in 1..n_group ({groups})")
            if chosen * (self.n_routed_experts // groups) < self.num_experts_per_tok:
                raise ValueError(f"topk_group ({chosen}) groups of {self.n_routed_experts // groups} experts hold "
                                 f"fewer than num_experts_per_tok ({self.num_experts_per_tok})")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DeepseekV2Config":
        """Config of a released model by name (see ``PRESETS``), with keyword overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown DeepSeek-V2 preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: nope part + rope part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeek's rule: routed experts from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th."""
        return (self.n_routed_experts is not None and layer_id >= self.first_k_dense_replace
                and layer_id % self.moe_layer_freq == 0)

    def rope_scaling_dict(self) -> Optional[dict]:
        """DeepSeek's ``rope_scaling`` with its defaults filled (mscale 1, mscale_all_dim 0, original 4096)."""
        if self.extend_method != "YARN":
            return None
        cfg = dict(self.scaling_factor)
        return dict(factor=float(cfg["factor"]),
                    original_max_position_embeddings=int(cfg.get("original_max_position_embeddings") or 4096),
                    beta_fast=float(cfg.get("beta_fast") or 32), beta_slow=float(cfg.get("beta_slow") or 1),
                    mscale=float(cfg["mscale"] if cfg.get("mscale") is not None else 1),
                    mscale_all_dim=float(cfg.get("mscale_all_dim") or 0))

    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``yarn_get_mscale(factor, mscale_all_dim) ** 2`` under YaRN with
        a non-zero ``mscale_all_dim``, as DeepSeek-V2's own modeling code does."""
        scale = self.qk_head_dim ** -0.5
        rope = self.rope_scaling_dict()
        if rope and rope["mscale_all_dim"]:
            mscale = yarn_get_mscale(rope["factor"], rope["mscale_all_dim"])
            scale = scale * mscale * mscale
        return scale

    def rotary_scaling(self) -> Optional[dict]:
        """The ``RotaryEmbedding`` YARN dict: DeepSeek's cos/sin factor
        ``yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)`` given explicitly
        (HF's rule differs when ``mscale_all_dim`` is 0 or unset)."""
        rope = self.rope_scaling_dict()
        if rope is None:
            return None
        factor = rope["factor"]
        attention = yarn_get_mscale(factor, rope["mscale"]) / yarn_get_mscale(factor, rope["mscale_all_dim"])
        return dict(rope, attention_factor=attention)
