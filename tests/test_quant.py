"""W8A16 weight-only int8 (mindformers_ext/quant.py): exact against float models on the dequantised
weights, a quarter of the bytes, and a small held-out loss change on the trained demo model."""
import inspect
import json
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
    quantize_model keeps in float: the LM head (tied to the embedding in GPT-BigCode) and DeepSeek-V2's
    router (not an nn.Linear in HF). DeepSeek-V2's routed experts are one nn.Linear per expert here,
    so this also checks our stacked experts' per-expert scales."""
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.numpy().astype(np.float32)
                s = np.abs(w).max(-1, keepdims=True) / np.float32(127.0)
                s[s == 0] = 1.0
                module.weight.copy_(torch.tensor(np.clip(np.rint(w / s), -127, 127) * s))
    return hf


# max abs logit error of W8A16 against the float32 model (HF's, not dequantised) on the tiny sharpened
# references (logits up to ~5); measured 0.110 (llama), 0.114 (bigcode), 0.215 (deepseek2, MoE experts
# quantized too): bounds at about twice that
FLOAT_ERROR_BOUND = {"llama": 0.2, "bigcode": 0.2, "deepseek2": 0.4}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w8a16_equals_the_float_model_on_dequantised_weights(tmp_path, family):
    """Our int8 graph computes exactly what a float model with the dequantised weights computes (HF's,
    independent of our code; DeepSeek-V2's routed experts included), stays close to the float model,
    and stores each quantized weight as int8 plus one float32 scale per output feature."""
    build, hf_class = FAMILIES[family]
    path = build(str(tmp_path / family))
    if family == "llama":  # the loader's option (what it does: quantize_model after loading)
        ours = load_hf_model(path, use_past=True, quant="w8a16")
        assert ours.model.layers[0].attention.wq.weight.dtype == ms.int8
        assert ours.lm_head.weight.dtype == ms.float32
    else:
        ours = load_hf_model(path, use_past=True)
        report = quantize_model(ours)
        params = {p.name: p for p in ours.get_parameters()}
        int8 = [p for p in params.values() if p.dtype == ms.int8]
        assert len(int8) > 0 and all(params[p.name + "_scale"].dtype == ms.float32 for p in int8)
        assert all(params[p.name + "_scale"].shape == p.shape[:-1] for p in int8)
        assert report["quant_bytes"] == sum(p.asnumpy().nbytes + params[p.name + "_scale"].asnumpy().nbytes
                                            for p in int8)
        assert report["float_bytes"] == sum(4 * p.asnumpy().size for p in int8)
    if family == "deepseek2":  # the stacked routed experts: int8, one scale per expert and output feature
        experts = [p for n, p in params.items() if n.endswith(("ffn.w1", "ffn.w2", "ffn.w3"))]
        assert experts and all(p.dtype == ms.int8 and p.ndim == 3 for p in experts)
    ids = np.random.RandomState(3).randint(3, 160, size=(2, 21)).astype(np.int32)
    logits = ours(ms.Tensor(ids)).asnumpy()
    with torch.no_grad(), one_torch_thread():
        float_logits = hf_class.from_pretrained(path).eval()(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    float_error = float(np.abs(logits - float_logits).max())
    print(f"{family}: W8A16 vs float32 max abs logit error {float_error:.4g} (logits up to "
          f"{np.abs(float_logits).max():.3g})")
    assert 0 < float_error <= FLOAT_ERROR_BOUND[family]
    hf = _dequantised_hf(hf_class.from_pretrained(path).eval())
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

    from mindformers_ext import load_families
    load_families()  # our classes in MindFormers' registry
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


def _hf_formula(w: np.ndarray):
    """int8 values and scales of one float weight (..., out, in), written out here: s = max|row| / 127."""
    w = w.astype(np.float32)
    s = np.abs(w).max(-1) / np.float32(127.0)
    s[s == 0] = 1.0
    return np.clip(np.rint(w / s[..., None]), -127, 127).astype(np.int8), s


@pytest.mark.parametrize("family", ["llama", "deepseek2"])
def test_converter_writes_int8_that_loads_without_requantising(tmp_path, family, monkeypatch):
    """convert_weight.py --quant w8a16 writes int8 weights + float32 scales (the formula's values, MoE
    experts stacked per expert); the checkpoint loads into the int8 layout without quantizing anything
    and gives exactly the logits of load-time quantization."""
    from safetensors.numpy import load_file

    import mindformers_ext.quant as quant
    from mindformers_ext.convert.ckpt_io import read_ckpt_index
    from mindformers_ext.convert.cli import main as convert_main
    from mindformers_ext.hf_loader import build_from_hf_config, read_hf_config

    path = FAMILIES[family][0](str(tmp_path / family))
    ckpt = str(tmp_path / "w8a16.ckpt")
    model = {"llama": "deepseek", "deepseek2": "deepseek2"}[family]
    assert convert_main(["--model", model, "--input_path", path, "--output_path", ckpt, "--quant", "w8a16",
                         "--no_progress"]) == 0
    dtypes = {e.name: e.dtype for e in read_ckpt_index(ckpt)}
    hf = load_file(os.path.join(path, "model.safetensors"))
    stored = {k: v.asnumpy() for k, v in ms.load_checkpoint(ckpt).items()}
    if family == "llama":
        checks = {"model.layers.1.attention.wo.weight": hf["model.layers.1.self_attn.o_proj.weight"]}
    else:  # the routed experts of the first MoE layer, stacked as ours: w2 (E, hidden, inter)
        layer = next(int(k.split(".")[2]) for k in hf if ".mlp.experts.0.down_proj" in k)
        count = sum(1 for k in hf if k.startswith(f"model.layers.{layer}.mlp.experts.") and "down_proj" in k)
        checks = {f"model.layers.{layer}.feed_forward.ffn.w2": np.stack(
            [hf[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] for e in range(count)])}
    for name, weight in checks.items():
        q, s = _hf_formula(weight)
        assert dtypes[name] == "I8" and dtypes[name + "_scale"] == "F32"
        np.testing.assert_array_equal(stored[name], q)
        np.testing.assert_array_equal(stored[name + "_scale"], s)
    assert dtypes["lm_head.weight"] == "F32" and dtypes["model.layers.0.attention_norm.weight"] == "F32"

    expected = load_hf_model(path, use_past=False, quant="w8a16")
    ours, _ = build_from_hf_config(read_hf_config(path), use_past=False)

    def refuse(*_):
        raise AssertionError("a w8a16 checkpoint was quantized again while loading")

    monkeypatch.setattr(quant, "quantize_per_channel", refuse)
    quant.load_checkpoint_w8a16(ours, ckpt)
    ours.set_train(False)
    params = {p.name: p for p in ours.get_parameters()}
    assert {n for n, p in params.items() if p.dtype == ms.int8} == {n for n, d in dtypes.items() if d == "I8"}
    ids = ms.Tensor(np.random.RandomState(5).randint(3, 160, size=(2, 13)).astype(np.int32))
    np.testing.assert_array_equal(ours(ids).asnumpy(), expected(ids).asnumpy())


def test_w8a16_checkpoint_errors_name_the_tensor(tmp_path):
    """An int8 checkpoint refuses to load into a float model, and a float tensor beside a scale is named."""
    from mindformers_ext.checkpoint import CheckpointError
    from mindformers_ext.convert.cli import main as convert_main
    from mindformers_ext.hf_loader import build_from_hf_config, read_hf_config
    from mindformers_ext.quant import load_checkpoint_w8a16

    path = make_tiny_llama(str(tmp_path / "hf"), seed=43)
    ckpt = str(tmp_path / "w8a16.ckpt")
    assert convert_main(["--model", "deepseek", "--input_path", path, "--output_path", ckpt, "--quant", "w8a16",
                         "--no_progress"]) == 0
    assert convert_main(["--model", "deepseek", "--reversed", "--input_path", ckpt, "--output_path",
                         str(tmp_path / "back"), "--config", path + "/config.json", "--quant", "w8a16"]) == 1
    float_model, _ = build_from_hf_config(read_hf_config(path), use_past=False)
    from mindformers_ext.checkpoint import load_checkpoint_into, set_strict_load

    with pytest.raises(CheckpointError, match="_scale"):
        load_checkpoint_into(float_model, ckpt)
    set_strict_load(False)  # the scales may then be left out, but the int8 weights may not be cast to float
    try:
        with pytest.raises(CheckpointError, match="is Int8.*--quant w8a16"):
            load_checkpoint_into(float_model, ckpt)
    finally:
        set_strict_load(True)
    tensors = ms.load_checkpoint(ckpt)
    name = "model.layers.0.feed_forward.w1.weight"
    tensors[name] = ms.Parameter(tensors[name].astype(ms.float32), name=name)
    bad = str(tmp_path / "bad.ckpt")
    ms.save_checkpoint([{"name": k, "data": v} for k, v in tensors.items()], bad)
    with pytest.raises(CheckpointError, match=f"bad.ckpt: tensor '{name}' is F32"):
        load_checkpoint_w8a16(build_from_hf_config(read_hf_config(path), use_past=False)[0], bad)


@pytest.mark.slow  # two run_mindformer.py subprocesses (20 s); load-time and converter quantisation are tested in process
def test_run_mindformer_quant_w8a16_predicts_the_dequantised_models_tokens(tmp_path):
    """run_mindformer.py --quant w8a16 (KV cache, greedy): with the converter's int8 checkpoint (loaded
    as it is) and with the float checkpoint (quantized after loading), the tokens of HF generate on
    the float model whose linear weights are replaced by their dequantised values; other run modes
    refuse the flag."""
    from mindformers_ext.convert.cli import main as convert_main
    from mindformers_ext.runner.main import main as run_main
    from test_run_mindformer import PREDICT_TINY, _hf_tiny_deepseek, _run

    hf_dir = tmp_path / "hf"
    model, eos, pad = _hf_tiny_deepseek(hf_dir)
    ckpts = {}
    for quant in ("w8a16", None):
        ckpts[quant] = str(tmp_path / f"tiny_{quant}.ckpt")
        assert convert_main(["--model", "deepseek", "--input_path", str(hf_dir), "--output_path", ckpts[quant],
                             "--no_progress"] + (["--quant", quant] if quant else [])) == 0
    reference = _dequantised_hf(model)
    for quant, ckpt in ckpts.items():
        out_dir = tmp_path / f"out_{quant}"
        out = _run("--config", PREDICT_TINY, "--load_checkpoint", ckpt, "--quant", "w8a16", "--predict_data",
             "def quick_sort(arr):", "--predict_length", "12", "--output_dir", str(out_dir), cwd=tmp_path)
        row = json.loads((out_dir / "predict_results.jsonl").read_text().splitlines()[0])
        with torch.no_grad(), one_torch_thread():
            hf = reference.generate(torch.tensor([row["prompt_ids"]]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad)
        assert row["ids"] == hf[0, len(row["prompt_ids"]):].tolist(), quant
        # the tiny model's greedy tokens hardly move under int8; the log says which way the weights came
        assert ("checkpoint loaded as stored" if quant else "quantized to int8 after loading") in out, out[-3000:]
    assert run_main(["--config", PREDICT_TINY, "--run_mode", "finetune", "--quant", "w8a16",
                     "--output_dir", str(tmp_path / "ft")]) == 2


def _quant_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quant_accuracy", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                                       "quant_accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_int8_kv_and_w8a16_change_the_demo_models_cached_heldout_loss_by_under_2_percent():
    """bench/quant_accuracy.py's held-out loss, teacher-forced through the KV cache (so the int8 cache is
    read), for int8 KV and for int8 KV with W8A16, within 2 % of float32's (about 50 s on 2 cores)."""
    bench = _quant_bench()
    chunks = bench.heldout_chunks(256, 2)[:, :256]
    losses = {name: bench.cached_heldout_loss(bench.demo_network(*bench.VARIANTS[name]), chunks)
              for name in ("float32", "kv_int8", "w8a16+kv_int8")}
    assert losses["float32"] < 4.5, losses
    for name in ("kv_int8", "w8a16+kv_int8"):
        assert losses[name] != losses["float32"] and abs(losses[name] / losses["float32"] - 1) <= 0.02, losses


def test_w8a16_weights_take_at_most_027x_their_float32_bytes():
    """The demo model's quantized weights as stored (int8 values + float32 scales, read back from the
    parameters) against their float32 bytes; and the full-size DeepSeek-Coder 7B from a skeleton."""
    bench = _quant_bench()
    network = bench.demo_network(True, False)
    params = {p.name: p for p in network.get_parameters()}
    int8 = [p for p in params.values() if p.dtype == ms.int8]
    stored = sum(p.asnumpy().nbytes + params[p.name + "_scale"].asnumpy().nbytes for p in int8)
    float_bytes = sum(4 * p.asnumpy().size for p in int8)
    assert len(int8) == 4 * 7 and stored <= 0.27 * float_bytes, (stored, float_bytes)
    from mindformers_ext.parallel import build_skeleton
    from research.deepseek1_5 import DeepSeekCoderConfig, DeepSeekCoderForCausalLM

    sizes = bench.weight_bytes(build_skeleton(DeepSeekCoderForCausalLM,
                                              DeepSeekCoderConfig.from_preset("deepseek-coder-7b-v1.5")))
    assert sizes["linear_w8a16_bytes"] <= 0.27 * sizes["linear_float32_bytes"]
    assert sizes["checkpoint_w8a16_bytes"] <= 0.35 * sizes["checkpoint_float32_bytes"], sizes


# --- fused_quant_matmul: Ascend's WeightQuantBatchMatmul, checked without running the kernel ---------------

# WeightQuantBatchMatmul's inputs in order (MindSpore 2.9's primitive; CANN's aclnnWeightQuantBatchMatmulV2):
# y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias, x (m, k) float16 / bfloat16, weight int8
# (k, n) -- given as (n, k) with transpose_weight --, per-channel antiquant_scale (n,) or (1, n) in x's dtype,
# antiquant_offset shaped like the scale, quant_scale / quant_offset only to quantize the output to int8.
WQBMM_INPUTS = ("x", "weight", "antiquant_scale", "antiquant_offset", "quant_scale", "quant_offset", "bias")
WQBMM_ATTRS = ("transpose_x", "transpose_weight", "antiquant_group_size")


def _wqbmm_reference(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                     transpose_x, transpose_weight, antiquant_group_size):
    """The kernel's documented formula in float32 numpy, after asserting its documented input rules for the
    per-channel, non-quantized-output case the fused Linear uses."""
    assert x.ndim == 2 and x.dtype in (ms.float16, ms.bfloat16), (x.shape, x.dtype)
    assert weight.ndim == 2 and weight.dtype == ms.int8, (weight.shape, weight.dtype)
    assert not transpose_x and antiquant_group_size == 0 and quant_scale is None and quant_offset is None
    x_mk = x.asnumpy().astype(np.float32)
    w_kn = weight.asnumpy().astype(np.float32)
    w_kn = w_kn.T if transpose_weight else w_kn
    assert w_kn.shape[0] == x_mk.shape[1], ("k differs", x.shape, weight.shape, transpose_weight)
    n = w_kn.shape[1]
    assert tuple(antiquant_scale.shape) in ((n,), (1, n)) and antiquant_scale.dtype == x.dtype, \
        (antiquant_scale.shape, antiquant_scale.dtype, n)
    offset = 0.0 if antiquant_offset is None else antiquant_offset.asnumpy().astype(np.float32).reshape(-1)
    out = x_mk @ ((w_kn + offset) * antiquant_scale.asnumpy().astype(np.float32).reshape(-1))
    return out if bias is None else out + bias.asnumpy().astype(np.float32)


class _WqbmmStandIn(ms.nn.Cell):
    """The kernel's formula in CPU ops for the per-channel, transpose_weight, no-offset call (its graph-mode slot)."""

    def construct(self, x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias):
        return ms.ops.matmul(x, ms.ops.cast(weight, x.dtype).T * antiquant_scale)


class _TwoLinears(ms.nn.Cell):
    def __init__(self, compute_dtype: str = "float16") -> None:
        super().__init__()
        from mindformers_ext.layers.linear import Linear

        self.up = Linear(8, 12, has_bias=True, compute_dtype=compute_dtype)
        self.down = Linear(12, 8, compute_dtype=compute_dtype)


def test_fused_quant_matmul_is_off_on_cpu_and_forcing_it_names_the_switch():
    """On CPU the switch defaults off (the portable int8 matmul), and forcing it raises before any weight
    changes, naming the switch and the device target."""
    assert ms.get_context("device_target") == "CPU"
    model = _TwoLinears()
    with pytest.raises(ValueError, match=r"fused_quant_matmul=True needs device_target 'Ascend'.*'CPU'"):
        quantize_model(model, fused_quant_matmul=True)
    assert model.up.weight.dtype == ms.float32 and not model.up.quantized  # nothing half-quantized
    with pytest.raises(TypeError, match="fused_quant_matmul must be True, False or None"):
        quantize_model(model, fused_quant_matmul="yes")
    report = quantize_model(model)
    assert report["linears"] == 2 and report["fused"] == 0
    assert model.up.weight.dtype == ms.int8 and not model.up.fused_quant_matmul
    assert not hasattr(model.up, "fused_matmul")


def test_fused_quant_matmul_builds_the_kernel_with_arguments_that_fit_its_signature(monkeypatch):
    """With the device target reported as Ascend (the kernel itself is not run): automatic switch on for a
    float16 Linear, WeightQuantBatchMatmul built with transpose_weight on our [out, in] int8 weight, the
    arguments the layer passes fit the primitive's input order and the documented shapes / dtypes and give
    the portable path's result; the kernel takes the matmul's shard strategy; float32 compute stays
    portable, and forcing it there names the switch."""
    from mindspore.ops.auto_generate import WeightQuantBatchMatmul

    from mindformers_ext import quant

    monkeypatch.setattr(quant, "device_target", lambda: "Ascend")
    assert tuple(inspect.signature(WeightQuantBatchMatmul.__call__).parameters)[1:] == WQBMM_INPUTS
    assert tuple(inspect.signature(WeightQuantBatchMatmul.__init__).parameters)[1:] == WQBMM_ATTRS

    fused, portable = _TwoLinears(), _TwoLinears()
    rng = np.random.default_rng(7)
    for f, p in ((fused.up, portable.up), (fused.down, portable.down)):
        w = ms.Tensor(rng.normal(size=p.weight.shape).astype(np.float32))
        f.weight.set_data(w)
        p.weight.set_data(w)
    bias = ms.Tensor(rng.normal(size=(12,)).astype(np.float32))
    fused.up.bias.set_data(bias)
    portable.up.bias.set_data(bias)
    fused.up.shard_column(2, 4)
    report = quantize_model(fused)  # automatic: on
    quantize_model(portable, fused_quant_matmul=False)
    assert report["fused"] == 2 and portable.up.quantized and not portable.up.fused_quant_matmul

    layer = fused.up
    assert layer.fused_quant_matmul and isinstance(layer.fused_matmul, WeightQuantBatchMatmul)
    attrs = {name: getattr(layer.fused_matmul, name) for name in WQBMM_ATTRS}
    assert attrs == {"transpose_x": False, "transpose_weight": True, "antiquant_group_size": 0}
    assert [(s.op, s.strategy) for s in layer.shard_specs if s.op == "fused_matmul"] == \
        [("fused_matmul", ((2, 1), (4, 1), (4,)))]

    x = ms.Tensor(rng.normal(size=(2, 3, 8)).astype(np.float32))
    args = layer.fused_matmul_args(x)
    assert len(args) == len(WQBMM_INPUTS)
    assert args[0].shape == (6, 8) and args[1].shape == (12, 8) and args[2].shape == (12,)
    expected = portable.up(x).asnumpy().astype(np.float32).reshape(6, 12)
    reference = _wqbmm_reference(*args, **attrs) + bias.asnumpy()
    np.testing.assert_allclose(reference, expected, rtol=1e-2, atol=1e-2)

    # construct (graph mode) routes through the kernel's slot with those arguments, then adds the bias
    monkeypatch.setattr(layer, "fused_matmul", _WqbmmStandIn())
    np.testing.assert_allclose(layer(x).asnumpy().astype(np.float32).reshape(6, 12), expected, rtol=1e-2, atol=1e-2)

    float32 = _TwoLinears("float32")
    assert quantize_model(float32)["fused"] == 0 and not float32.up.fused_quant_matmul
    with pytest.raises(ValueError, match="fused_quant_matmul=True needs a float16 or bfloat16 compute_dtype.*Float32"):
        _TwoLinears("float32").up.quantize_w8a16(fused_quant_matmul=True)
    with pytest.raises(ValueError, match="compute_dtype.*Linear 'up' computes in Float32"):
        quantize_model(_TwoLinears("float32"), fused_quant_matmul=True)
