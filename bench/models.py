"""Model shapes the benches share (``bench/decode.py``, ``bench/train.py``) and the random HF models
built from them; our MindSpore side loads the very file the HF model is saved to.

Shapes are Hugging Face config fields. ``tiny`` is ``configs/deepseek1_5/finetune_tiny.yaml``'s
shape with a 512-token vocabulary; the ``-150m`` models have about 150M parameters each.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["LLAMA_CONFIGS", "BIGCODE_CONFIGS", "DS2_CONFIGS", "CONFIGS", "family", "build_hf"]

# Llama (DeepSeek-Coder architecture)
LLAMA_CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "llama-150m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16),
}
# GPT-BigCode (WizardCoder / StarCoder architecture): multi-query attention, learned positions, tied LM head
BIGCODE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "bigcode-tiny": dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4),
    "bigcode-150m": dict(vocab_size=49152, n_embd=1024, n_layer=10, n_head=16),  # 158M parameters
}
# DeepSeek-V2 (MLA + DeepSeekMoE). "ds2-tiny" has the tests' "full" structure (low-rank q, a dense layer then MoE
# layers, group-limited routing); "ds2-moe-150m": 153M parameters (16 routed experts of which 4 per token + 1
# shared, so ~65M active per token)
DS2_CONFIGS: Dict[str, Dict[str, Any]] = {
    "ds2-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=24,
                     first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                     routed_scaling_factor=2.5),
    "ds2-moe-150m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                         num_attention_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                         qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
                         num_experts_per_tok=4, moe_intermediate_size=448, first_k_dense_replace=1,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.0),
}
CONFIGS: Dict[str, Dict[str, Any]] = {**LLAMA_CONFIGS, **BIGCODE_CONFIGS, **DS2_CONFIGS}


def family(name: str) -> str:
    """``"llama"``, ``"bigcode"`` or ``"deepseek2"`` for a model of :data:`CONFIGS`."""
    if name in BIGCODE_CONFIGS:
        return "bigcode"
    if name in DS2_CONFIGS:
        return "deepseek2"
    if name in LLAMA_CONFIGS:
        return "llama"
    raise KeyError(f"unknown bench model {name!r}; available: {', '.join(CONFIGS)}")


def build_hf(name: str, path: str, train: bool = False, overrides: Optional[Dict[str, Any]] = None):
    """A random HF model of shape ``name`` (seed 0), saved to ``path`` as safetensors and loaded back
    (sdpa attention) in train or eval mode; ``overrides`` replace config fields (e.g. ``n_routed_experts``).

    No dropout and, for DeepSeek-V2, no balance loss (HF 4.57's has none; both sides then compute the
    same loss); the DeepSeek-V2 router is re-drawn from N(0, 1) (HF's N(0, 0.02) routes near uniformly).
    """
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    kind = family(name)
    fields = {**CONFIGS[name], **(overrides or {})}
    torch.manual_seed(0)
    if kind == "bigcode":
        config = transformers.GPTBigCodeConfig(n_positions=2048, multi_query=True, activation_function="gelu",
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                               eos_token_id=0, pad_token_id=0, **fields)
        cls = transformers.GPTBigCodeForCausalLM
    elif kind == "deepseek2":
        config = transformers.DeepseekV2Config(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0, tie_word_embeddings=False, aux_loss_alpha=0.0,
                                               **fields)
        cls = transformers.DeepseekV2ForCausalLM
    else:
        config = transformers.LlamaConfig(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0, tie_word_embeddings=False, **fields)
        cls = transformers.LlamaForCausalLM
    model = cls(config)
    if kind == "deepseek2":
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    model = cls.from_pretrained(path, attn_implementation="sdpa")
    return model.train() if train else model.eval()
