"""W8A16 weight-only int8 (mindformers_ext/quant.py): exact against float models on the dequantised
weights, a quarter of the bytes, and a small held-out loss change on the trained demo model."""
import math
import os

import numpy as np
import pytest
import torch
import transformers

import mindspore as ms
from conftest import make_tiny_llama
from decode_steps import generate_with_logits, max_step_error
from deepseek2_reference import make_tiny_deepseek2, one_torch_thread
from mindformers_ext import load_hf_model
from mindformers_ext.quant import quantize_model, quantize_per_channel
from wizardcoder_util import make_tiny_bigcode

FAMILIES = {
    "llama": (lambda p: make_tiny_llama(p, seed=40, num_key_value_heads=2), transformers.LlamaForCausalLM),
    "bigcode": (lambda p: make_tiny_bigcode(p, seed=41), transformers.GPTBigCodeForCausalLM),
    "deepseek2": (lambda p: (make_tiny_deepseek2(p, "lite", seed=42), p)[1], transformers.DeepseekV2ForCausalLM),
}


def _dequantised_hf(hf):
    """HF's model with every linear weight replaced by q * s (numpy, the module's formula written out
    here in float32 arithmetic: s = max|row| / 127, q = round(w / s) clipped to +-127), except what
    quantize_model keeps in float: the LM head (tied to the embedding in GPT-BigCode), DeepSeek-V2's
    routed experts (stacked, not quantized yet) and its router (not an nn.Linear in HF)."""
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head" and ".mlp.experts." not in name:
                w = module.weight.numpy().astype(np.float32)
                s = np.abs(w).max(-1, keepdims=True) / np.float32(127.0)
                s[s == 0] = 1.0
                module.weight.copy_(torch.tensor(np.clip(np.rint(w / s), -127, 127) * s))
    return hf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w8a16_equals_the_float_model_on_dequantised_weights(tmp_path, family):
    """Our int8 graph computes exactly what a float model with the dequantised weights computes (HF's,
    independent of our code), and stores the linear weights in <= 0.27x of their float32 bytes."""
    build, hf_class = FAMILIES[family]
    path = build(str(tmp_path / family))
    if family == "llama":  # the loader's option (what it does: quantize_model after loading)
        ours = load_hf_model(path, use_past=True, quant="w8a16")
        assert ours.model.layers[0].attention.wq.weight.dtype == ms.int8
        assert ours.lm_head.weight.dtype == ms.float32
    else:
        ours = load_hf_model(path, use_past=True)
        report = quantize_model(ours)
        assert report["linears"] > 0
        assert report["quant_bytes"] <= 0.27 * report["float_bytes"], report
    hf = _dequantised_hf(hf_class.from_pretrained(path).eval())
    ids = np.random.RandomState(3).randint(3, 160, size=(2, 21)).astype(np.int32)
    logits = ours(ms.Tensor(ids)).asnumpy()
    with torch.no_grad(), one_torch_thread():
        expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4
    # and the cached decode path runs on the int8 weights too: every step's logits, HF teacher-forced
    prompts = [ids[0, :6].tolist(), ids[1, :9].tolist()]
    sequences, step_logits = generate_with_logits(ours, prompts, steps=12)
    with torch.no_grad(), one_torch_thread():
        error = max_step_error(prompts, sequences, step_logits, lambda x: hf(torch.tensor(x)).logits.numpy())
    assert error <= 1e-4


def test_quantize_per_channel_bounds_the_error():
    w = np.random.default_rng(0).normal(size=(8, 33)).astype(np.float32)
    w[3] = 0.0
    q, s = quantize_per_channel(w)
    assert q.dtype == np.int8 and s.shape == (8,) and np.abs(q).max() == 127
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] / 2 + 1e-7)
    assert s[3] == 1.0 and not q[3].any()


def test_w8a16_changes_the_demo_models_heldout_loss_by_under_2_percent():
    """The trained demo checkpoint (configs/deepseek1_5/predict_demo.yaml) on held-out stdlib code."""
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig

    import mindformers_ext  # noqa: F401  registers our classes
    from mindformers_ext.runner.predict import load_weights
    from test_demo_model import CKPT, PREDICT_DEMO, _heldout_chunks

    config = MindFormerConfig(PREDICT_DEMO)
    config.model.model_config.use_past = False
    tokens = ms.Tensor(_heldout_chunks(int(config.model.model_config.seq_length), 8), ms.int32)
    losses = []
    for quant in (False, True):
        network = build_network(config.model)
        load_weights(network, CKPT)
        if quant:
            quantize_model(network)
        network.set_train(True)  # the loss path of construct; no gradients are taken
        losses.append(float(network(tokens).asnumpy()))
    float_loss, quant_loss = losses
    assert float_loss < 4.5 and math.isfinite(quant_loss)
    assert abs(quant_loss - float_loss) <= 0.02 * float_loss, (float_loss, quant_loss)
