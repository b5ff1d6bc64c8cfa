"""Weight conversion: HF safetensors <-> MindSpore checkpoints, streaming, bit exact, atomic, clear errors."""
import glob
import json
import os
import runpy
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from mindformers_ext.convert import (CkptWriter, ConversionError, Layout, SafetensorsWriter, TensorInfo, WeightMap,
                                     bf16_to_f32, cast, convert, f32_to_bf16, get_weight_map, iter_hf_weights,
                                     read_ckpt_index, read_safetensors_header)
from mindformers_ext.convert.cli import main as cli_main
from mindformers_ext.convert.maps.llama import NAMES
from mindformers_ext.convert.weight_map import fill, hf_shapes, split_name
from rss_util import RSS_SCRIPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _ours(hf_name):
    """Our name for an HF Llama name, straight from the map's data."""
    template, idx = split_name(hf_name)
    return fill(NAMES[template], idx)


def _save_llama(path, seed, dtype="float32", shard=None, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model


def _load_hf_dir(path):
    """{name: array} of every tensor in an HF dir, read by the safetensors package itself (bf16 -> uint16 bits)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = _torch_bits(t)
    return out


def _torch_bits(t):
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _ms_bits(tensor):
    import mindspore as ms
    if tensor.dtype == ms.bfloat16:
        return tensor.asnumpy().view(np.uint16)
    return tensor.asnumpy()


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _no_stray(folder):
    return [f for f in os.listdir(folder) if ".tmp-" in f]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny random HF Llama checkpoints: plain (GQA), the same sharded, tied+biases, and a bf16 one."""
    root = tmp_path_factory.mktemp("convert_hf")
    dirs = {name: str(root / name) for name in ("plain", "sharded", "tied_bias", "bf16")}
    model = _save_llama(dirs["plain"], 0)
    model.save_pretrained(dirs["sharded"], safe_serialization=True, max_shard_size="20KB")
    _save_llama(dirs["tied_bias"], 1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    _save_llama(dirs["bf16"], 2, dtype="bfloat16")
    return dirs


@pytest.mark.parametrize("variant", ["plain", "sharded", "tied_bias"])
def test_roundtrip_fp32_bit_exact(hf, variant, tmp_path):
    import mindspore as ms

    src = _load_hf_dir(hf[variant])
    ckpt = str(tmp_path / "model.ckpt")
    res = convert(hf[variant], ckpt, "deepseek", progress=False)
    assert res.files == [ckpt] and res.tensors == len(src) - ("lm_head.weight" in src and variant == "tied_bias")
    loaded = ms.load_checkpoint(ckpt)
    assert set(loaded) == {_ours(k) for k in src}
    for k, v in src.items():
        assert _same_bits(_ms_bits(loaded[_ours(k)]), v), k
    if variant == "tied_bias":
        assert "lm_head.weight" not in loaded and "model.layers.1.attention.wo.bias" in loaded

    back = str(tmp_path / "hf_back")
    shard = "30KB" if variant == "sharded" else "5GB"
    convert(ckpt, back, "deepseek", reverse=True, config=os.path.join(hf[variant], "config.json"),
            max_shard_size=shard, progress=False)
    out = _load_hf_dir(back)
    assert set(out) == set(src)
    for k, v in src.items():
        assert _same_bits(out[k], v), k
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json")) == (variant == "sharded")
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["num_key_value_heads"] == 2 and cfg["torch_dtype"] == "float32"
    assert not _no_stray(str(tmp_path))


def test_reversed_dir_loads_in_transformers(hf, tmp_path):
    import torch
    import transformers

    ckpt = str(tmp_path / "m.ckpt")
    convert(hf["plain"], ckpt, "llama", progress=False)
    back = str(tmp_path / "back")
    os.makedirs(back)
    with open(os.path.join(back, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write("{}")  # an existing dir keeps its other files
    convert(ckpt, back, "llama", reverse=True, config=hf["plain"], max_shard_size="40KB", progress=False)
    assert os.path.isfile(os.path.join(back, "tokenizer_config.json"))
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    ref = transformers.LlamaForCausalLM.from_pretrained(hf["plain"]).eval()
    got = transformers.LlamaForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
    # converting again into the same dir with one shard replaces the shards and the index
    convert(ckpt, back, "llama", reverse=True, config=hf["plain"], progress=False)
    assert sorted(f for f in os.listdir(back) if "safetensors" in f) == ["model.safetensors"]


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"), ("bf16", "bfloat16")])
def test_cast_on_conversion_matches_torch(hf, tmp_path, dtype, torch_dtype):
    import mindspore as ms
    import torch
    from safetensors.torch import load_file

    ref = load_file(os.path.join(hf["plain"], "model.safetensors"))
    ckpt = str(tmp_path / "m.ckpt")
    convert(hf["plain"], ckpt, "deepseek", dtype=dtype, progress=False)
    loaded = ms.load_checkpoint(ckpt)
    want_ms = {"bfloat16": ms.bfloat16, "float16": ms.float16}[torch_dtype]
    for k, t in ref.items():
        assert loaded[_ours(k)].dtype == want_ms
        assert _same_bits(_ms_bits(loaded[_ours(k)]), _torch_bits(t.to(getattr(torch, torch_dtype)))), k
    # and back to float32 HF: exactly torch's widening of the narrow values
    back = str(tmp_path / "back")
    convert(ckpt, back, "deepseek", dtype="float32", reverse=True, config=hf["plain"], progress=False)
    out = _load_hf_dir(back)
    for k, t in ref.items():
        assert _same_bits(out[k], t.to(getattr(torch, torch_dtype)).float().numpy()), k


def test_bf16_checkpoint_keeps_bf16(hf, tmp_path):
    import mindspore as ms

    src = _load_hf_dir(hf["bf16"])
    ckpt = str(tmp_path / "m.ckpt")
    convert(hf["bf16"], ckpt, "deepseek", progress=False)
    loaded = ms.load_checkpoint(ckpt)
    for k, v in src.items():
        assert loaded[_ours(k)].dtype == ms.bfloat16 and _same_bits(_ms_bits(loaded[_ours(k)]), v), k
    back = str(tmp_path / "back")
    convert(ckpt, back, "deepseek", reverse=True, config=hf["bf16"], progress=False)
    assert all(_same_bits(_load_hf_dir(back)[k], v) for k, v in src.items())
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_float_casts_match_torch_on_every_pattern():
    import torch

    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-40, 3.4028235e38,
                         -3.4028235e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, 65504.0, 65520.0, 1e-8],
                        dtype=np.float32)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    # ties: lower 16 bits exactly 0x8000, both parities
    ties = (rng.integers(0, 2 ** 16, 1000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    f32 = np.concatenate([specials, bits.view(np.float32), ties.view(np.float32)])
    want = torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16(f32)
    nan = np.isnan(f32)  # torch's NaN bits differ between its scalar (0x7FC0) and vector (0xFFFF) paths
    assert np.array_equal(got[~nan], want[~nan]) and np.isnan(bf16_to_f32(got[nan])).all()
    assert np.array_equal(cast(f32, "F32", "BF16"), got)

    every = np.arange(2 ** 16, dtype=np.uint16)
    t_bf16 = torch.from_numpy(every.view(np.int16).copy()).view(torch.bfloat16)
    assert np.array_equal(bf16_to_f32(every).view(np.uint32), t_bf16.float().numpy().view(np.uint32))
    _same_floats(cast(every, "BF16", "F16"), t_bf16.to(torch.float16).numpy())
    t_f16 = torch.from_numpy(every.view(np.float16).copy())
    _same_floats(bf16_to_f32(cast(every.view(np.float16), "F16", "BF16")), t_f16.to(torch.bfloat16).float().numpy())
    _same_floats(cast(f32, "F32", "F16"), torch.from_numpy(f32.copy()).to(torch.float16).numpy())


def _same_floats(got, want):
    """Bit-identical, except that any NaN matches any NaN (torch's NaN payloads vary by code path)."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert got.dtype == want.dtype and got[~nan].tobytes() == want[~nan].tobytes()


# ------------------------------------------------------------------------------- MindSpore ckpt format
def _sample_arrays():
    rng = np.random.default_rng(0)
    return {"a.weight": ("F32", rng.standard_normal((3, 5)).astype(np.float32)),
            "b.weight": ("F16", rng.standard_normal((7,)).astype(np.float16)),
            "c.weight": ("BF16", rng.integers(0, 2 ** 16, (4, 6), dtype=np.uint16)),
            "d.step": ("I32", np.arange(6, dtype=np.int32).reshape(2, 3)),
            "e.scalar": ("I64", np.array(5, dtype=np.int64)),
            "f.mask": ("BOOL", np.array([True, False, True]))}


def _ms_param(name, code, array):
    import mindspore as ms
    from mindspore.common import np_dtype
    data = ms.Tensor(array.view(np_dtype.bfloat16)) if code == "BF16" else ms.Tensor(array)
    return {"name": name, "data": ms.Parameter(data, name=name)}


@pytest.mark.parametrize("slice_bytes", [512 * 1024 * 1024, 8])
def test_ckpt_writer_is_mindspore_compatible(tmp_path, slice_bytes):
    import mindspore as ms

    arrays = _sample_arrays()
    ours = str(tmp_path / "ours.ckpt")
    with open(ours, "wb") as f:
        writer = CkptWriter(f, slice_bytes=slice_bytes)
        for name, (code, array) in arrays.items():
            writer.write(name, array, code)
    loaded = ms.load_checkpoint(ours)
    assert list(loaded) == list(arrays)
    for name, (code, array) in arrays.items():
        assert _same_bits(_ms_bits(loaded[name]), array), name
    entries = read_ckpt_index(ours)  # slices (when split) are joined again
    assert [(e.name, e.dtype, e.shape) for e in entries] == [(n, c, a.shape) for n, (c, a) in arrays.items()]
    assert all(_same_bits(e.read(), arrays[e.name][1]) for e in entries)
    if slice_bytes > 1000:  # unsplit: byte for byte what mindspore.save_checkpoint writes
        theirs = str(tmp_path / "theirs.ckpt")
        ms.save_checkpoint([_ms_param(n, c, a) for n, (c, a) in arrays.items()], theirs)
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read()


def test_ckpt_reader_reads_mindspore_files(tmp_path):
    import mindspore as ms

    arrays = _sample_arrays()
    for crc in (False, True):
        path = str(tmp_path / f"ms_{crc}.ckpt")
        ms.save_checkpoint([_ms_param(n, c, a) for n, (c, a) in arrays.items()], path, crc_check=crc)
        entries = {e.name: e for e in read_ckpt_index(path)}
        assert list(entries) == list(arrays)
        for name, (code, array) in arrays.items():
            assert entries[name].dtype == code and _same_bits(entries[name].read(), array), name
        f32 = entries["c.weight"].read("F32")  # bf16 -> f32 while reading
        assert np.array_equal(f32, bf16_to_f32(arrays["c.weight"][1]))


# ----------------------------------------------------------------------------------- errors, atomicity
def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(path, mutate):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path)
    mutate(tensors)
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})


def _expect_failure(src, out_dir, *needles, **kwargs):
    out = os.path.join(out_dir, "out.ckpt")
    with pytest.raises(ConversionError) as info:
        convert(src, out, "deepseek", progress=False, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not os.path.exists(out) and not _no_stray(out_dir)
    return message


def test_truncated_safetensors(hf, tmp_path):
    src = _copy_dir(hf["plain"], tmp_path / "src")
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    msg = _expect_failure(src, str(tmp_path), path, "truncated")
    assert "tensor '" in msg  # the tensor whose data is cut off


@pytest.mark.parametrize("corruption", ["length", "json", "offsets"])
def test_corrupt_safetensors_header(hf, tmp_path, corruption):
    src = _copy_dir(hf["plain"], tmp_path / "src")
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        if corruption == "length":
            f.seek(0)
            f.write(struct.pack("<Q", 10 ** 12))
        elif corruption == "json":
            f.seek(8)
            f.write(b"{\"x\": [" + header[7:])
        else:  # a shape that no longer matches its data_offsets, same header length
            fixed = header.replace(b'"shape":[128,64]', b'"shape":[128,32]', 1)
            assert fixed != header
            f.seek(8)
            f.write(fixed)
    needle = {"length": "header length", "json": "not valid JSON", "offsets": "data_offsets"}[corruption]
    _expect_failure(src, str(tmp_path), path, needle)


def test_missing_tensor(hf, tmp_path):
    src = _copy_dir(hf["plain"], tmp_path / "src")
    _rewrite(os.path.join(src, "model.safetensors"), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _expect_failure(src, str(tmp_path), "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(hf, tmp_path):
    src = _copy_dir(hf["plain"], tmp_path / "src")
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(os.path.join(src, "model.safetensors"), lambda t: t.__setitem__(key, np.zeros((64, 64), np.float32)))
    msg = _expect_failure(src, str(tmp_path), key, "[64, 64]", "[32, 64]", "num_key_value_heads*head_dim")
    assert os.path.join(src, "model.safetensors") in msg


def test_unknown_and_unexpected_names(hf, tmp_path):
    src = _copy_dir(hf["plain"], tmp_path / "src")
    path = os.path.join(src, "model.safetensors")
    _rewrite(path, lambda t: t.__setitem__("model.vision.proj", np.zeros(3, np.float32)))
    _expect_failure(src, str(tmp_path), "model.vision.proj", "not a llama weight")
    _rewrite(path, lambda t: (t.pop("model.vision.proj"),
                              t.__setitem__("model.layers.2.input_layernorm.weight", np.zeros(64, np.float32))))
    _expect_failure(src, str(tmp_path), "model.layers.2.input_layernorm.weight", "num_hidden_layers=2")


def test_truncated_ckpt_and_no_partial_output(hf, tmp_path):
    ckpt = str(tmp_path / "m.ckpt")
    convert(hf["plain"], ckpt, "deepseek", progress=False)
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) - 7)
    out = str(tmp_path / "back")
    with pytest.raises(ConversionError, match="truncated") as info:
        convert(ckpt, out, "deepseek", reverse=True, config=hf["plain"], progress=False)
    assert ckpt in str(info.value)
    assert not os.path.exists(out) and not _no_stray(str(tmp_path))


def test_failure_mid_write_leaves_previous_output(hf, tmp_path, monkeypatch):
    from mindformers_ext.convert import tensors

    ckpt = str(tmp_path / "good.ckpt")
    convert(hf["plain"], ckpt, "deepseek", progress=False)
    out = str(tmp_path / "m.ckpt")
    with open(out, "w", encoding="utf-8") as f:
        f.write("previous")
    calls = {"n": 0}
    real = tensors.read_ranges

    def flaky(*args, **kwargs):  # the 5th tensor read fails, after 4 were written
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(tensors, "read_ranges", flaky)  # the reads of both safetensors and .ckpt files
    with pytest.raises(OSError, match="disk went away"):
        convert(hf["plain"], out, "deepseek", progress=False)
    with open(out, encoding="utf-8") as f:
        assert f.read() == "previous"
    calls["n"] = 0
    with pytest.raises(OSError, match="disk went away"):  # a directory output likewise
        convert(ckpt, str(tmp_path / "hf_out"), "deepseek", reverse=True, config=hf["plain"], progress=False)
    assert sorted(os.listdir(tmp_path)) == ["good.ckpt", "m.ckpt"]


def test_bin_state_dicts_convert_and_other_pickles_need_allow_pickle(hf, tmp_path, capsys):
    """HF's pytorch_model.bin (torch's zip format, a dict of tensors) converts without --allow-pickle
    through the restricted unpickler, bit-exactly as the safetensors; a .pt pickle needs the flag."""
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "pt"
    src.mkdir()
    shutil.copy(os.path.join(hf["plain"], "config.json"), src)
    state = load_file(os.path.join(hf["plain"], "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old HF checkpoints have these
    torch.save(state, str(src / "pytorch_model.bin"))
    out = str(tmp_path / "out.ckpt")
    assert cli_main(["--model", "deepseek", "--input_path", str(src), "--output_path", out, "--no_progress"]) == 0
    ref = str(tmp_path / "ref.ckpt")
    convert(hf["plain"], ref, "deepseek", progress=False)
    with open(out, "rb") as a, open(ref, "rb") as b:
        assert a.read() == b.read()
    os.rename(src / "pytorch_model.bin", src / "model.pt")
    (tmp_path / "refused").mkdir()
    _expect_failure(str(src / "model.pt"), str(tmp_path / "refused"), "model.pt", "--allow-pickle",
                    config=str(src / "config.json"))
    pt_out = str(tmp_path / "pt_out.ckpt")
    assert cli_main(["--model", "deepseek", "--input_path", str(src / "model.pt"), "--config",
                     str(src / "config.json"), "--output_path", pt_out, "--no_progress"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err and not os.path.exists(pt_out)
    assert cli_main(["--model", "deepseek", "--input_path", str(src / "model.pt"), "--config",
                     str(src / "config.json"), "--output_path", pt_out, "--no_progress", "--allow-pickle"]) == 0
    with open(pt_out, "rb") as a, open(ref, "rb") as b:
        assert a.read() == b.read()


def test_unknown_model_and_missing_map():
    import importlib.util

    with pytest.raises(ConversionError, match="available"):
        get_weight_map("gpt5")
    if importlib.util.find_spec("mindformers_ext.convert.maps.deepseek2") is None:
        with pytest.raises(ConversionError, match="no weight map yet"):
            get_weight_map("deepseek2")
    assert get_weight_map("deepseek") is get_weight_map("llama") is get_weight_map("deepseek1_5")


# ------------------------------------------------------------------------------ iter_hf_weights, configs
def test_iter_hf_weights(hf, tmp_path):
    import mindspore as ms

    src = _load_hf_dir(hf["sharded"])
    got = dict(iter_hf_weights(hf["sharded"], "deepseek"))
    assert set(got) == {_ours(k) for k in src}
    assert all(_same_bits(got[_ours(k)], v) for k, v in src.items())
    bf16_src = _load_hf_dir(hf["bf16"])
    as_f32 = dict(iter_hf_weights(hf["bf16"]))  # model from config.json's model_type, float32 by default
    assert all(np.array_equal(as_f32[_ours(k)], bf16_to_f32(v)) and as_f32[_ours(k)].dtype == np.float32
               for k, v in bf16_src.items())
    as_bf16 = dict(iter_hf_weights(hf["bf16"], "llama", dtype=None))
    name = "model.layers.0.attention.wq.weight"
    assert ms.Tensor(as_bf16[name]).dtype == ms.bfloat16
    assert np.array_equal(as_bf16[name].view(np.uint16), bf16_src["model.layers.0.self_attn.q_proj.weight"])
    # validation happens before the first tensor is yielded
    bad = _copy_dir(hf["plain"], tmp_path / "bad")
    _rewrite(os.path.join(bad, "model.safetensors"), lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ConversionError, match="model.norm.weight"):
        iter_hf_weights(bad, "deepseek")


def test_configs_from_our_yaml_and_config_object(hf, tmp_path):
    from mindformers_ext.models.llama_config import LlamaFamilyConfig

    ours_cfg = dict(type="LlamaFamilyConfig", hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                    intermediate_size=96, vocab_size=128, seq_length=64)
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text("model:\n  model_config:\n" + "".join(f"    {k}: {v}\n" for k, v in ours_cfg.items()))
    ckpt = str(tmp_path / "m.ckpt")
    convert(hf["plain"], ckpt, "deepseek", config=str(yaml_path), progress=False)
    back = str(tmp_path / "back")
    convert(ckpt, back, "deepseek", reverse=True, config=str(yaml_path), progress=False)
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == ("llama", 2, 2)
    kwargs = {k: v for k, v in ours_cfg.items() if k != "type"}
    names = [n for n, _ in iter_hf_weights(hf["plain"], "deepseek", LlamaFamilyConfig(**kwargs))]
    assert len(names) == 21
    with pytest.raises(ConversionError, match=r"has shape \[128, 64\], but the config .* implies \[128, 48\]"):
        list(iter_hf_weights(hf["plain"], "deepseek", LlamaFamilyConfig(**{**kwargs, "n_kv_heads": None,
                                                                           "num_heads": 4, "hidden_size": 48})))


# ------------------------------------------------------- a map's stacked / concatenated / split / transposed entries
def _moe_map():
    """A DeepSeek-V2-like toy map: experts stacked (and transposed), q/k/v fused, an HF-fused tensor split."""
    def shapes(cfg):  # ours: experts stacked then transposed, q/k/v fused, the HF c_attn split in two
        h, e, f, n = cfg["hidden"], cfg["experts"], cfg["ffn"], cfg["layers"]
        out = {"tok.embedding": (10, h)}
        for i in range(n):
            out.update({f"layers.{i}.moe.w_up": (e, h, f), f"layers.{i}.wqkv": (2 * h, h),
                        f"layers.{i}.wq2": (h, h), f"layers.{i}.wkv2": (h, h)})
        return out
    return WeightMap(
        name="toy", shapes=shapes, hf_config=dict,
        names={"embed": "tok.embedding",
               "layers.{}.experts.{}.up": "layers.{}.moe.w_up",  # one {} more: stacked
               "layers.{}.attn.q": "layers.{}.wqkv", "layers.{}.attn.k": "layers.{}.wqkv",  # concatenated
               "layers.{}.attn.v": "layers.{}.wqkv",
               "layers.{}.c_attn": ("layers.{}.wq2", "layers.{}.wkv2")},  # split
        part_rows=lambda template, shape, c: [c["hidden"], c["hidden"] // 2, c["hidden"] // 2],
        layouts={"layers.{}.moe.w_up": Layout(axes=(0, 2, 1))},
    )


def test_stack_concat_and_transform_rules_roundtrip(tmp_path):
    import mindspore as ms
    from safetensors.numpy import load_file, save_file

    wmap = _moe_map()
    cfg = {"hidden": 8, "experts": 3, "ffn": 6, "layers": 2}
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in hf_shapes(wmap, cfg).items()}
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    ckpt = str(tmp_path / "m.ckpt")
    convert(str(src), ckpt, wmap, config=cfg, progress=False)
    loaded = {k: v.asnumpy() for k, v in ms.load_checkpoint(ckpt).items()}
    up = np.stack([tensors[f"layers.1.experts.{j}.up"] for j in range(3)]).transpose(0, 2, 1)
    assert np.array_equal(loaded["layers.1.moe.w_up"], up)
    qkv = np.concatenate([tensors[f"layers.0.attn.{p}"] for p in "qkv"])
    assert np.array_equal(loaded["layers.0.wqkv"], qkv)
    assert np.array_equal(loaded["layers.0.wkv2"], tensors["layers.0.c_attn"][8:])
    back = str(tmp_path / "back")
    convert(ckpt, back, wmap, reverse=True, config=cfg, progress=False)
    again = load_file(os.path.join(back, "model.safetensors"))
    assert set(again) == set(tensors) and all(_same_bits(again[k], v) for k, v in tensors.items())
    tensors.pop("layers.1.experts.2.up")
    os.remove(src / "model.safetensors")
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"layers\.1\.experts\.2\.up"):
        convert(str(src), str(tmp_path / "x.ckpt"), wmap, config=cfg, progress=False)


def test_safetensors_writer_readable_by_reference(tmp_path):
    from safetensors.numpy import load_file

    arrays = {n: a for n, (c, a) in _sample_arrays().items() if c != "BF16"}
    infos = [TensorInfo(n, {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64", "bool": "BOOL"}
                        [str(a.dtype)], a.shape) for n, a in arrays.items()]
    path = str(tmp_path / "w.safetensors")
    with SafetensorsWriter(path, infos, {"format": "pt"}) as w:
        for n in reversed(list(arrays)):  # any order: offsets are fixed by the header
            w.write(n, arrays[n])
    got = load_file(path)
    assert all(_same_bits(got[n], a) for n, a in arrays.items())
    entries, meta = read_safetensors_header(path)
    assert meta == {"format": "pt"} and [e.name for e in entries] == list(arrays)


# ------------------------------------------------------------------------------------------ CLI, memory
def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("LOG_MF_PATH", str(tmp_path / "mflog"))
    return env


def test_cli_end_to_end(hf, tmp_path):
    ckpt = str(tmp_path / "m.ckpt")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weight.py"), "--model", "deepseek",
                          "--input_path", hf["sharded"], "--output_path", ckpt, "--dtype", "bf16"],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "converted 21 tensors" in run.stdout
    back = str(tmp_path / "back")
    # the seed-style wrapper, in process (a second interpreter would only import MindFormers again)
    seed_cli = runpy.run_path(os.path.join(REPO, "research", "deepseek1_5", "convert_weight.py"))
    assert seed_cli["main"](["--reversed", "--mindspore_ckpt_path", ckpt, "--torch_ckpt_path", back, "--dtype",
                             "float32", "--config", os.path.join(hf["sharded"], "config.json")]) == 0
    src = _load_hf_dir(hf["sharded"])
    out = _load_hf_dir(back)
    assert all(np.array_equal(out[k], bf16_to_f32(f32_to_bf16(v))) for k, v in src.items())
    # upstream v1.5.0's spelling of the same script converts too; a foreign --model is refused
    upstream_form = str(tmp_path / "up.ckpt")
    assert seed_cli["main"](["--model", "deepseek1_5", "--input_path", hf["sharded"], "--output_path",
                             upstream_form]) == 0
    assert os.path.getsize(upstream_form) > 0
    with pytest.raises(SystemExit):
        seed_cli["main"](["--model", "wizardcoder", "--input_path", hf["sharded"], "--output_path", ckpt + "2"])


def test_peak_rss_stays_near_one_tensor(tmp_path):
    """9 tensors of 64 MiB (576 MiB): converting must not hold more than ~a tensor at once."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak RSS (VmHWM) from Linux /proc")
    side = 4096  # one [4096, 4096] float32 tensor = 64 MiB
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=side, intermediate_size=side, num_hidden_layers=1, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=side, tie_word_embeddings=False)))
    shapes = hf_shapes(get_weight_map("llama"), json.loads((src / "config.json").read_text()))
    block = np.linspace(-1, 1, side * side, dtype=np.float32).reshape(side, side)
    infos = [TensorInfo(n, "F32", s) for n, s in shapes.items()]
    with SafetensorsWriter(str(src / "model.safetensors"), infos, {"format": "pt"}) as w:
        for info in infos:
            w.write(info.name, block if info.shape == block.shape else np.ones(info.shape, np.float32))
    del block
    tensor_kib = side * side * 4 // 1024
    grew = {}
    for label in ("forward", "forward_bf16", "reverse"):
        run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, REPO, str(src), str(tmp_path), label, "llama",
                              "200MB"],
                             cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        base, peak = json.loads(run.stdout.strip().splitlines()[-1])
        grew[label] = round((peak - base) / 1024, 1)
        assert peak - base < 2 * tensor_kib, (label, base, peak)  # the whole model is 9 tensors
    print("peak RSS growth over the baseline (MiB) for 9 x 64 MiB tensors:", grew)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
