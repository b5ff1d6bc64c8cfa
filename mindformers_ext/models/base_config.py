"""Fields every causal LM config of ours shares: run shape, dtypes, decoding defaults, parallel layout.

Names follow MindFormers' model configs (``LlamaConfig``), so YAMLs read the same across families;
each family's config adds its architecture fields on top.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.modules.transformer.transformer import TransformerOpParallelConfig, default_transformer_config
from mindformers.tools.logger import logger

DTYPES = ("float32", "float16", "bfloat16")


def canonical_dtype(value: Any) -> str:
    """'float32' / 'fp16' / 'bf16' / a MindSpore dtype object -> 'float32' / 'float16' / 'bfloat16'."""
    name = str(value).lower().replace("mindspore.", "")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {value!r} is not one of {DTYPES}")
    return name


class CausalLMConfigBase(PretrainedConfig):
    """Shared config fields (see MindFormers' LlamaConfig for their meaning).

    ``qkv_concat`` (upstream's name): the query / key / value projections run as one matmul (``w_qkv``;
    GPT-BigCode's multi-query ``c_attn``) and so do the SwiGLU gate / up (``w_gate_hidden``; DeepSeek-V2:
    its dense layers' only, as upstream), fewer and larger matmuls. Checkpoints with the separate weights
    load into such a model, upstream's ``qkv_concat`` checkpoints as they are
    (:class:`mindformers_ext.layers.FusedLinear`).
    """

    def __init__(self,
                 batch_size: int = 1,
                 seq_length: int = 2048,
                 ignore_token_id: int = -100,
                 compute_dtype: str = "float32",
                 layernorm_compute_type: str = "float32",
                 softmax_compute_type: str = "float32",
                 param_init_type: str = "float32",
                 initializer_range: float = 0.02,
                 use_past: bool = False,
                 use_flash_attention: bool = False,
                 kv_cache_dtype: Optional[str] = None,
                 qkv_concat: bool = False,
                 parallel_config: Union[dict, TransformerOpParallelConfig] = default_transformer_config,
                 offset: Union[int, list] = 0,
                 checkpoint_name_or_path: str = "",
                 repetition_penalty: float = 1.0,
                 max_decode_length: int = 1024,
                 top_k: int = 50,
                 top_p: float = 1.0,
                 do_sample: bool = False,
                 cache_implementation: str = "dynamic",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(parallel_config, dict):
            parallel_config = TransformerOpParallelConfig(**parallel_config)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.ignore_token_id = ignore_token_id
        self.compute_dtype = canonical_dtype(compute_dtype)
        self.layernorm_compute_type = canonical_dtype(layernorm_compute_type)
        self.softmax_compute_type = canonical_dtype(softmax_compute_type)
        self.param_init_type = canonical_dtype(param_init_type)
        self.initializer_range = initializer_range
        self.use_past = use_past
        if use_flash_attention:
            logger.warning("model_config.use_flash_attention: True has no effect: mindformers-ext models run their "
                           "portable attention core (softmax(q k^T * scale + mask) v) on every backend; there is "
                           "no flash-attention kernel path yet")
        self.use_flash_attention = use_flash_attention
        if kv_cache_dtype not in (None, "int8"):
            raise ValueError(f"kv_cache_dtype must be int8 or unset (the cache then keeps compute_dtype), "
                             f"got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        if not isinstance(qkv_concat, bool):
            raise ValueError(f"qkv_concat must be True or False, got {qkv_concat!r}")
        self.qkv_concat = qkv_concat
        self.parallel_config = parallel_config
        self.offset = offset
        self.checkpoint_name_or_path = checkpoint_name_or_path
        self.repetition_penalty = repetition_penalty
        self.max_decode_length = max_decode_length
        self.top_k = top_k
        self.top_p = top_p
        self.do_sample = do_sample
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' (one dynamic-shape decode graph) or 'static' "
                             f"(one static graph per batch and cache size: faster steps), got {cache_implementation!r}")
        self.cache_implementation = cache_implementation

    def context_length(self) -> int:
        """The most positions (prompt + new tokens) the model is meant to handle."""
        return int(getattr(self, "max_position_embedding", None) or self.seq_length)


def rotary_dtype_field(value: Any) -> str:
    """``rotary_dtype`` as given (upstream YAMLs set it); anything but float32 is reported as unused."""
    name = canonical_dtype(value)
    if name != "float32":
        logger.warning("model_config.rotary_dtype: %s is not used: rotary cos / sin tables are computed in float32 "
                       "on every backend and applied in compute_dtype", name)
    return name
