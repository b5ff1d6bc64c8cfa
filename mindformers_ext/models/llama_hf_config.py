"""Translation between an HF ``LlamaConfig`` (config.json) and :class:`LlamaFamilyConfig` keywords."""
from __future__ import annotations

from typing import Any

from mindformers_ext.models.llama_config import ROPE_METHODS, LlamaFamilyConfig

_HF_TO_METHOD = {hf: ms for ms, hf in ROPE_METHODS.items() if hf}


def llama_kwargs_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Keyword arguments for :class:`LlamaFamilyConfig` from an HF Llama ``config.json`` dict."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in hf]
    if missing:
        raise KeyError(f"{source}: missing keys {missing} needed for a Llama-family model")
    kwargs: dict[str, Any] = dict(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        theta=hf.get("rope_theta", 10000.0),
        max_position_embedding=hf.get("max_position_embeddings", 2048),
        seq_length=hf.get("max_position_embeddings", 2048),
        hidden_act=hf.get("hidden_act", "silu"),
        qkv_has_bias=hf.get("attention_bias", False),
        attn_proj_has_bias=hf.get("attention_bias", False),
        mlp_has_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else hf.get("eos_token_id", 0),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    if kwargs["n_kv_heads"] == kwargs["num_heads"]:
        kwargs["n_kv_heads"] = None
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in _HF_TO_METHOD:
            raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; "
                             f"expected one of {sorted(_HF_TO_METHOD)}")
        kwargs["extend_method"] = _HF_TO_METHOD[kind]
        if kind == "yarn":
            kwargs["scaling_factor"] = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
        else:
            kwargs["scaling_factor"] = float(scaling["factor"])
    return kwargs


def decoder_hf_fields(config: Any, architecture: str, model_type: str) -> dict[str, Any]:
    """The HF config.json fields that RMSNorm rotary decoders (Llama, DeepSeek-V2) name alike, from ours."""
    return {
        "architectures": [architecture], "model_type": model_type, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.theta, "hidden_act": config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range, "torch_dtype": config.param_init_type, "rope_scaling": None,
    }


def llama_config_to_hf(config: LlamaFamilyConfig) -> dict[str, Any]:
    """An HF ``LlamaConfig`` dict (for config.json) describing ``config``."""
    hf = decoder_hf_fields(config, "LlamaForCausalLM", "llama")
    hf.update(num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
              max_position_embeddings=config.max_position_embedding, attention_bias=config.qkv_has_bias,
              mlp_bias=config.mlp_has_bias)
    kind = ROPE_METHODS[config.extend_method]
    if kind == "yarn":
        hf["rope_scaling"] = {"type": "yarn", **dict(config.scaling_factor)}
    elif kind:
        hf["rope_scaling"] = {"type": kind, "factor": float(config.scaling_factor)}
    return hf
