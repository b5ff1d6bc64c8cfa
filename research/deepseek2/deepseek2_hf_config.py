"""Translation between DeepSeek-V2's HF ``config.json`` and :class:`DeepseekV2Config` keywords."""
from __future__ import annotations

from typing import Any

from mindformers_ext.models.llama_hf_config import decoder_hf_fields
from research.deepseek2.deepseek2_config import MOE_DEFAULTS, DeepseekV2Config

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# HF config.json keys copied under the same name (MoE fields; DeepSeek's defaults where absent).
_SAME_NAME = tuple(MOE_DEFAULTS) + ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                    "v_head_dim", "intermediate_size", "vocab_size", "hidden_size",
                                    "rms_norm_eps", "tie_word_embeddings", "initializer_range", "attention_bias",
                                    "hidden_act", "bos_token_id", "eos_token_id")

_NULL_MEANS = {"n_shared_experts": 0, "n_group": 1, "topk_group": 1, "moe_layer_freq": 1}
# DeepSeek's own configuration defaults for MoE keys a config.json leaves out.
_HF_DEFAULTS = dict(n_shared_experts=0, first_k_dense_replace=0, moe_layer_freq=1, topk_method="greedy",
                    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    aux_loss_alpha=0.001, seq_aux=True)


def deepseek2_kwargs_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Keyword arguments for :class:`DeepseekV2Config` from an HF DeepSeek-V2 ``config.json`` dict."""
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise KeyError(f"{source}: missing keys {missing} needed for a DeepSeek-V2 model")
    if hf.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"{source}: scoring_func {hf['scoring_func']!r} is not supported (DeepSeek-V2 uses softmax)")
    kwargs: dict[str, Any] = {k: hf[k] for k in _SAME_NAME if k in hf}
    kwargs.update(
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        theta=hf.get("rope_theta", 10000.0),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        seq_length=hf.get("max_position_embeddings", 2048),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else hf.get("eos_token_id", 0),
        n_routed_experts=hf.get("n_routed_experts"),
    )
    # DeepSeek's config.json writes null for "none" / "one": our fields use None for "unset"
    for key, none_means in _NULL_MEANS.items():
        if key in hf and hf[key] is None:
            kwargs[key] = none_means
    for key, value in _HF_DEFAULTS.items():
        kwargs.setdefault(key, value)
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "yarn":
            raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported for DeepSeek-V2 (only 'yarn')")
        kwargs["extend_method"] = "YARN"
        kwargs["scaling_factor"] = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
    else:
        kwargs["extend_method"] = "None"
        kwargs["scaling_factor"] = None
    return kwargs


def deepseek2_config_to_hf(config: DeepseekV2Config) -> dict[str, Any]:
    """An HF DeepSeek-V2 config dict (for config.json) describing ``config``."""
    hf = decoder_hf_fields(config, "DeepseekV2ForCausalLM", "deepseek_v2")
    hf.update(num_key_value_heads=config.num_heads, q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
              qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
              v_head_dim=config.v_head_dim, max_position_embeddings=config.max_position_embeddings,
              attention_bias=config.attention_bias, scoring_func="softmax")
    for key in MOE_DEFAULTS:
        hf[key] = getattr(config, key)
    hf["n_routed_experts"] = config.n_routed_experts
    hf["n_shared_experts"] = config.n_shared_experts or None  # DeepSeek writes null for none
    if config.extend_method == "YARN":
        hf["rope_scaling"] = {"type": "yarn", **dict(config.scaling_factor)}
    return hf
