"""DeepSeek-V2 weight conversion (experts stacked, RoPE rows permuted, both directions, streaming) and
the full-size YAMLs' parallel layouts."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers_ext.convert import ConversionError, SafetensorsWriter, TensorInfo, get_weight_map
from mindformers_ext.convert.cli import main as cli_main
from mindformers_ext.convert.maps.deepseek2 import rope_permutation
from mindformers_ext.convert.weight_map import hf_shapes
from deepseek2_reference import make_tiny_deepseek2
from rss_util import RSS_SCRIPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{variant: HF dir}: full (q_lora), lite (plain q) and one with a dense layer between MoE layers."""
    root = tmp_path_factory.mktemp("ds2_convert")
    return {v: (str(root / v), make_tiny_deepseek2(str(root / v), v, seed=i))[0]
            for i, v in enumerate(("full", "lite", "yarn_lite_norm"))}


def _hf_tensors(path):
    """{name: array} of every tensor in an HF dir, as the safetensors package reads them (bf16 as bits)."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


def _ms_tensors(path):
    import mindspore as ms

    loaded = ms.load_checkpoint(path)
    return {k: (v.asnumpy().view(np.int16) if v.dtype == ms.bfloat16 else v.asnumpy()) for k, v in loaded.items()}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("variant", ["full", "lite", "yarn_lite_norm"])
def test_round_trip_is_bit_exact(hf_dirs, variant, dtype, tmp_path):
    """HF -> our .ckpt -> HF gives back every tensor bit for bit (names, shapes, dtype, values)."""
    src = hf_dirs[variant]
    if dtype:  # a bfloat16 source checkpoint, as DeepSeek ships
        bf16 = tmp_path / "bf16_src"
        assert cli_main(["--model", "deepseek2", "--input_path", os.path.join(src), "--output_path",
                         str(tmp_path / "tmp.ckpt"), "--dtype", dtype, "--no_progress"]) == 0
        assert cli_main(["--model", "deepseek2", "--reversed", "--input_path", str(tmp_path / "tmp.ckpt"),
                         "--output_path", str(bf16), "--config", os.path.join(src, "config.json"),
                         "--no_progress"]) == 0
        src = str(bf16)
    ckpt, back = tmp_path / "ours.ckpt", tmp_path / "back"
    assert cli_main(["--model", "deepseek2", "--input_path", src, "--output_path", str(ckpt), "--no_progress"]) == 0
    assert cli_main(["--model", "deepseek2", "--reversed", "--input_path", str(ckpt), "--output_path", str(back),
                     "--config", os.path.join(src, "config.json"), "--no_progress"]) == 0
    original, returned = _hf_tensors(src), _hf_tensors(str(back))
    assert sorted(original) == sorted(returned)
    for name, value in original.items():
        assert returned[name].dtype == value.dtype and returned[name].tobytes() == value.tobytes(), name
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_type"] == "deepseek_v2"


def test_experts_stacked_and_rope_rows_permuted(hf_dirs, tmp_path):
    """Our checkpoint: one (E, inter, hidden) tensor per projection and MoE layer, in expert order;
    the rope rows of every query head and of the shared key in rotate-half order."""
    src = hf_dirs["full"]
    ckpt = tmp_path / "ours.ckpt"
    assert cli_main(["--model", "deepseek2", "--input_path", src, "--output_path", str(ckpt), "--no_progress"]) == 0
    hf, ours = _hf_tensors(src), _ms_tensors(str(ckpt))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    experts = cfg["n_routed_experts"]
    for layer in (1, 2):  # layer 0 is dense
        for hf_name, ours_name in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            stacked = ours[f"model.layers.{layer}.feed_forward.ffn.{ours_name}"]
            expected = np.stack([hf[f"model.layers.{layer}.mlp.experts.{e}.{hf_name}.weight"] for e in range(experts)])
            assert stacked.shape[0] == experts and np.array_equal(stacked, expected)
        assert np.array_equal(ours[f"model.layers.{layer}.feed_forward.router.dense.weight"],
                              hf[f"model.layers.{layer}.mlp.gate.weight"])
    assert "model.layers.0.feed_forward.w1.weight" in ours and "model.layers.0.feed_forward.ffn.w1" not in ours
    nope, rope, heads, kv_lora = (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["num_attention_heads"],
                                  cfg["kv_lora_rank"])
    perm = rope_permutation(rope)
    q_hf = hf["model.layers.0.self_attn.q_b_proj.weight"].reshape(heads, nope + rope, -1)
    q_ours = ours["model.layers.0.attention.l2q_proj.weight"].reshape(heads, nope + rope, -1)
    assert np.array_equal(q_ours[:, :nope], q_hf[:, :nope])
    assert np.array_equal(q_ours[:, nope:], q_hf[:, nope:][:, perm])
    kv_hf = hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    kv_ours = ours["model.layers.0.attention.kv2l.weight"]
    assert np.array_equal(kv_ours[:kv_lora], kv_hf[:kv_lora])
    assert np.array_equal(kv_ours[kv_lora:], kv_hf[kv_lora:][perm])


def test_seed_cli_both_directions(hf_dirs, tmp_path):
    """research/deepseek2/convert_weight.py keeps the seed's flags: forward as a script, back in process."""
    import runpy

    src = hf_dirs["lite"]
    script = os.path.join(REPO, "research", "deepseek2", "convert_weight.py")
    ckpt, back = tmp_path / "seed.ckpt", tmp_path / "seed_back"
    run = subprocess.run([sys.executable, script, "--torch_ckpt_path", src, "--mindspore_ckpt_path", str(ckpt)],
                         cwd=tmp_path, env={**os.environ, "LOG_MF_PATH": str(tmp_path / "log")}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "converted" in run.stdout, run.stdout + run.stderr
    seed_main = runpy.run_path(script)["main"]
    assert seed_main(["--reversed", "--mindspore_ckpt_path", str(ckpt), "--torch_ckpt_path", str(back),
                      "--config", os.path.join(src, "config.json")]) == 0
    original, returned = _hf_tensors(src), _hf_tensors(str(back))
    assert all(returned[k].tobytes() == v.tobytes() for k, v in original.items()) and len(original) == len(returned)


def test_converted_checkpoint_loads_into_the_model(hf_dirs, tmp_path):
    """Every parameter of DeepseekV2ForCausalLM has its tensor, with its shape (from our YAML-style config)."""
    import mindspore as ms
    from mindformers_ext.parallel import build_skeleton
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.deepseek2.deepseek2_hf_config import deepseek2_kwargs_from_hf

    src = hf_dirs["yarn_lite_norm"]
    ckpt = tmp_path / "ours.ckpt"
    assert cli_main(["--model", "deepseek2", "--input_path", src, "--output_path", str(ckpt), "--no_progress"]) == 0
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = DeepseekV2Config(**deepseek2_kwargs_from_hf(json.load(f)))
    model = build_skeleton(DeepseekV2ForCausalLM, config)
    params = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    saved = {name: tuple(t.shape) for name, t in ms.load_checkpoint(str(ckpt)).items()}
    assert saved == params


def test_conversion_errors_name_the_tensor(hf_dirs, tmp_path, capsys):
    """A missing expert or an expert count that disagrees with config.json fails before writing."""
    from safetensors.numpy import load_file, save_file

    src = hf_dirs["full"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"},
              str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli_main(["--model", "deepseek2", "--input_path", str(bad), "--output_path", str(tmp_path / "x.ckpt"),
                     "--no_progress"]) == 1
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.ckpt")
    (bad / "config.json").write_text(json.dumps({**cfg, "n_routed_experts": 16}))
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli_main(["--model", "deepseek2", "--input_path", str(bad), "--output_path", str(tmp_path / "x.ckpt"),
                     "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "n_routed_experts=16" in err and "[n_routed_experts, hidden_size]" in err


def test_expert_stacking_streams_layer_by_layer(tmp_path):
    """6 MoE layers of 8 experts (3 x 16 MiB stacked per layer, 288 MiB in all), one safetensors shard
    per layer: converting holds about one layer's experts, not the model."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak RSS (VmHWM) from Linux /proc")
    cfg = dict(model_type="deepseek_v2", hidden_size=1024, num_hidden_layers=6, num_attention_heads=2,
               intermediate_size=64, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
               v_head_dim=8, vocab_size=64, n_routed_experts=8, n_shared_experts=None, num_experts_per_tok=2,
               moe_intermediate_size=512, first_k_dense_replace=0, topk_method="greedy", tie_word_embeddings=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    shapes = hf_shapes(get_weight_map("deepseek2"), cfg)
    index = {}
    for layer in range(-1, cfg["num_hidden_layers"]):
        names = [n for n in shapes if (n.startswith(f"model.layers.{layer}.") if layer >= 0
                                       else not n.startswith("model.layers."))]
        infos = [TensorInfo(n, "F32", shapes[n]) for n in names]
        fname = f"model-{layer + 2:05d}.safetensors"
        with SafetensorsWriter(str(src / fname), infos, {"format": "pt"}) as w:
            for info in infos:
                w.write(info.name, np.full(info.shape, 0.5, np.float32))
        index.update({n: fname for n in names})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    layer_mib = 3 * 8 * 512 * 1024 * 4 / 2**20  # 48 MiB of experts per layer
    env = {**os.environ, "LOG_MF_PATH": str(tmp_path / "log")}
    grew = {}
    for label in ("forward", "reverse"):
        run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, REPO, str(src), str(tmp_path), label, "deepseek2",
                              "32MB"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        base, peak = json.loads(run.stdout.strip().splitlines()[-1])
        grew[label] = (peak - base) / 1024
        assert grew[label] < 1.6 * layer_mib, (label, grew)  # the experts alone are 6 x 48 MiB
    print("peak RSS growth (MiB), 48 MiB of experts per layer:", grew)


# ------------------------------------------------------------------------------------ YAML layouts
FULL_YAMLS = {  # file: devices of its intended job
    "finetune_deepseek2_236B.yaml": 64,  # 8 nodes x 8: dp 4 x mp 8 x pp 2, ep 4
    "predict_deepseek2_236B.yaml": 16,  # 2 nodes x 8: mp 16
    "finetune_deepseek2_lite.yaml": 8,  # dp 2 x mp 4, ep 2
    "predict_deepseek2_lite.yaml": 1,
}


def test_full_size_yamls_pass_the_static_parallel_check():
    """Every full-size YAML builds a weightless skeleton whose strategies fit its device count, and its
    shapes are the released config's (the presets)."""
    from mindformers.tools.register import MindFormerConfig
    from mindformers_ext.parallel.yaml_check import check_yaml
    from research.deepseek2 import PRESETS

    summaries = {}
    for name, devices in FULL_YAMLS.items():
        path = os.path.join(REPO, "research", "deepseek2", name)
        summaries[name] = check_yaml(path, devices)
        model_config = MindFormerConfig(path).model.model_config
        preset = PRESETS["deepseek-v2-lite" if "lite" in name else "deepseek-v2"]
        for key, value in preset.items():
            assert model_config[key] == value or (isinstance(value, dict) and dict(model_config[key]) == value), \
                (name, key)
    assert "dp=4 mp=8 pp=2 ep=4 on 64 devices" in summaries["finetune_deepseek2_236B.yaml"][0]
    assert "dp=1 mp=16 pp=1 ep=1 on 16 devices" in summaries["predict_deepseek2_236B.yaml"][0]


def test_bad_expert_layouts_are_reported():
    from mindformers_ext.parallel import ParallelCheckError, build_skeleton, check_parallel
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM

    def model(**parallel):
        parallel = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1, **parallel}
        return build_skeleton(DeepseekV2ForCausalLM, DeepseekV2Config.from_preset(
            "deepseek-v2", num_layers=2, parallel_config=parallel))

    with pytest.raises(ParallelCheckError, match=r"expert_parallel \(3\) must divide data_parallel \(4\)"):
        model(data_parallel=4, expert_parallel=3)
    with pytest.raises(ParallelCheckError, match=r"expert_parallel \(3\) must divide n_routed_experts \(160\)"):
        model(data_parallel=3, expert_parallel=3)
    with pytest.raises(ParallelCheckError) as err:  # 128 heads over 3
        check_parallel(model(model_parallel=3), 3)
    assert "model.layers.0.attention.core.qk: input 1 dimension 1 (128 = 128) is not divisible by its split 3" \
        in str(err.value)
    check_parallel(model(data_parallel=8, expert_parallel=8), 8)


def test_tiny_yamls_build_the_same_model():
    """configs/deepseek2 tiny finetune / predict YAMLs describe one model (checkpoints carry over)."""
    from mindformers.tools.register import MindFormerConfig

    ft = dict(MindFormerConfig(os.path.join(REPO, "configs", "deepseek2", "finetune_tiny.yaml")).model.model_config)
    pr = dict(MindFormerConfig(os.path.join(REPO, "configs", "deepseek2", "predict_tiny.yaml")).model.model_config)
    shape_keys = [k for k in ft if k not in ("seq_length", "use_past", "eos_token_id")]
    assert {k: ft[k] for k in shape_keys} == {k: pr[k] for k in shape_keys if k in pr}
