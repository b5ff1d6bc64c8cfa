"""Configuration of the Llama-family decoder (DeepSeek-Coder v1 / v1.5 and other Llama-shaped models).

Field names follow MindFormers' ``LlamaConfig`` so that existing YAMLs read the same; the rotary
scaling follows MindFormers' ``extend_method`` / ``scaling_factor`` pair (see ``ROPE_METHODS``).
"""
from __future__ import annotations

from typing import Optional, Union

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.models.base_config import CausalLMConfigBase, rotary_dtype_field

# MindFormers' names for the rotary variants and the HF ``rope_scaling.type`` each one stands for.
ROPE_METHODS = {"None": None, "PI": "linear", "DYNAMIC_NTK": "dynamic", "YARN": "yarn"}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlamaFamilyConfig(CausalLMConfigBase):
    """Config of the shared Llama-family decoder.

    Args mirror MindFormers' LlamaConfig; ``scaling_factor`` is a float for PI / DYNAMIC_NTK and a
    dict (``factor``, ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``,
    ``mscale_all_dim``) for YARN.
    """

    model_type = "llama_family"

    def __init__(self,
                 hidden_size: int = 4096,
                 num_layers: int = 32,
                 num_heads: int = 32,
                 n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None,
                 intermediate_size: int = 11008,
                 vocab_size: int = 32000,
                 rms_norm_eps: float = 1e-6,
                 theta: float = 10000.0,
                 extend_method: str = "None",
                 scaling_factor: Union[float, dict, None] = 1.0,
                 max_position_embedding: Optional[int] = None,
                 hidden_act: str = "silu",
                 qkv_has_bias: bool = False,
                 attn_proj_has_bias: bool = False,
                 mlp_has_bias: bool = False,
                 tie_word_embeddings: bool = False,
                 bos_token_id: int = 1,
                 eos_token_id: Union[int, list] = 2,
                 pad_token_id: int = 0,
                 rotary_dtype: str = "float32",
                 **kwargs):
        super().__init__(**kwargs)
        if extend_method not in ROPE_METHODS:
            raise ValueError(f"extend_method {extend_method!r} is not one of {sorted(ROPE_METHODS)}")
        if n_kv_heads is not None and num_heads % n_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported: the Llama family's MLP is SwiGLU with "
                             "silu (DeepSeek-Coder v1 / v1.5)")
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        self.intermediate_size = intermediate_size
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.theta = theta
        self.extend_method = extend_method
        self.scaling_factor = scaling_factor
        self.max_position_embedding = max_position_embedding or self.seq_length
        self.hidden_act = hidden_act
        self.qkv_has_bias = qkv_has_bias
        self.attn_proj_has_bias = attn_proj_has_bias
        self.mlp_has_bias = mlp_has_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.rotary_dtype = rotary_dtype_field(rotary_dtype)

    def context_length(self) -> int:
        """``max_position_embedding``, which HF's linear (PI) and YaRN configs already give extended; dynamic
        NTK extends the trained table by its factor."""
        if self.extend_method == "DYNAMIC_NTK":
            return int(self.max_position_embedding * float(self.scaling_factor))
        return int(self.max_position_embedding)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (MHA when ``n_kv_heads`` is unset)."""
        return self.n_kv_heads or self.num_heads
