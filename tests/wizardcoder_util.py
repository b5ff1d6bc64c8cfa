"""Tiny random HF GPT-BigCode checkpoints for the WizardCoder tests (not a test module)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=128, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)


def make_tiny_bigcode(path: str, seed: int = 0, multi_query: bool = True, activation_function: str = "gelu",
                      **overrides) -> str:
    """Save a tiny random HF GPTBigCodeForCausalLM (safetensors + config.json) under ``path``,
    re-initialised by :func:`sharp_models.sharpen` (peaked attention, unit scale activations,
    LayerNorm weights and biases away from 1 / 0, so a swapped or dropped one shows in the logits)."""
    import torch
    import transformers

    from sharp_models import sharpen

    torch.manual_seed(seed)
    kwargs = dict(TINY, multi_query=multi_query, activation_function=activation_function)
    kwargs.update(overrides)
    model = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(**kwargs)).eval()
    sharpen(model)
    model.save_pretrained(path, safe_serialization=True)
    return path
