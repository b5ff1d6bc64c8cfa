"""Checkpoints written by upstream MindFormers (v1.3.2 - v1.5.0) load into our models with HF's logits.

Each test builds a tiny HF model, writes the checkpoint upstream's converter would have written for it
(``tests/upstream_util.py`` restates upstream's rules, independently of our weight maps), then loads it
(on the fly, or after ``tools/convert_weight.py --upstream``) and compares logits with HF's.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mindspore as ms
from mindformers_ext.checkpoint import CheckpointError, model_parameters, select_checkpoint
from mindformers_ext.checkpoint import load_checkpoint_into as plain_load
from mindformers_ext.convert import ConversionError, read_ckpt_index
from mindformers_ext.checkpoint import load_checkpoint_into  # falls back to the upstream layout
from mindformers_ext.convert.upstream import convert_upstream, detect_upstream, upstream_candidate
from mindformers_ext.hf_loader import build_from_hf_config, read_hf_config
from deepseek2_reference import make_tiny_deepseek2, one_torch_thread
from upstream_util import (deepseek2_mla_split, deepseek2_upstream_tensors, llama_upstream_tensors,
                           save_ms_checkpoint, wizardcoder_upstream_tensors)
from wizardcoder_util import REPO, make_tiny_bigcode

TOL = 1e-4


def _ids(vocab, seed=1, length=21):
    return np.random.RandomState(seed).randint(3, vocab, size=(2, length)).astype(np.int32)


def _build(hf_dir):
    model, _ = build_from_hf_config(read_hf_config(hf_dir), use_past=False, compute_dtype="float32",
                                    param_init_type="float32")
    model.set_train(False)
    return model


def _hf_logits(hf, ids):
    with torch.no_grad(), one_torch_thread():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def ds2(tmp_path_factory):
    """{variant: (hf dir, HF state dict, HF model)} for DeepSeek-V2 "full" (q_lora) and "lite" (plain q)."""
    import transformers

    root = tmp_path_factory.mktemp("ds2_upstream")
    out = {}
    for i, variant in enumerate(("full", "lite")):
        path = str(root / variant)
        state = make_tiny_deepseek2(path, variant, seed=10 + i)
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(path).eval()
        out[variant] = (path, state, hf)
    return out


@pytest.fixture(scope="module")
def wiz(tmp_path_factory):
    """(hf dir, HF model) of a tiny multi-query GPT-BigCode (WizardCoder-shaped)."""
    import transformers

    path = make_tiny_bigcode(str(tmp_path_factory.mktemp("wiz_upstream") / "hf"), seed=3)
    hf = transformers.GPTBigCodeForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return path, hf


def _wiz_upstream(path, hf, out):
    cfg = read_hf_config(path)
    tensors = wizardcoder_upstream_tensors(hf.state_dict(), cfg["n_embd"], cfg["n_embd"] // cfg["n_head"],
                                           cfg["n_layer"])
    return save_ms_checkpoint(tensors, out)


@pytest.mark.parametrize("variant,gmm", [("full", False), ("lite", False), ("full", True)])
def test_deepseek2_upstream_checkpoint_loads_with_hf_logits(ds2, variant, gmm, tmp_path):
    """Upstream names (routed_experts.*), HF's rope-row order, stacked experts (and the gmm transpose):
    mapped while loading; logits within 1e-4 of HF."""
    path, state, hf = ds2[variant]
    ckpt = save_ms_checkpoint(deepseek2_upstream_tensors(state, gmm=gmm), str(tmp_path / "up.ckpt"))
    names = [e.name for e in read_ckpt_index(ckpt)]
    assert any(".feed_forward.routed_experts.ffn.w1.weight" in n for n in names)
    assert detect_upstream(names) == "deepseek2"
    model = _build(path)
    with pytest.raises(CheckpointError):  # not our layout (names differ) ...
        select_checkpoint(ckpt, model_parameters(model))
    assert upstream_candidate(ckpt, model) == [ckpt]
    assert load_checkpoint_into(model, ckpt) == [ckpt]  # ... mapped while loading
    ids = _ids(160)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - _hf_logits(hf, ids)).max() <= TOL


def _training_state(tensors: list) -> list:
    """What upstream's Trainer saved beside the weights: AdamW moments per weight and step counters."""
    state = [(f"{kind}.{n}", np.full_like(a, 0.5), "float32") for n, a, _ in tensors[:6] for kind in ("adam_m",
                                                                                                     "adam_v")]
    return state + [("global_step", np.array([7], np.int32), "int32"), ("scale_sense", np.array(1.0, np.float32),
                                                                       "float32")]


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_deepseek2_mla_split_checkpoint_loads_with_hf_logits(ds2, variant, tmp_path):
    """Upstream v1.5.0's MLA-split checkpoint (l2q_nope_proj / l2q_pe_proj, kv2l_latent_kv / kv2l_k_pe,
    lkv2kv_k_nope / lkv2kv_v, rope rows de-interleaved; V2-Lite's q_proj left whole), saved with the
    Trainer's optimizer state: loads on the fly with HF's logits, and migrates once with --upstream."""
    path, state, hf = ds2[variant]
    cfg = read_hf_config(path)
    tensors = deepseek2_mla_split(deepseek2_upstream_tensors(state), cfg["num_attention_heads"],
                                  cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"])
    names = [n for n, _, _ in tensors]
    assert any(".attention.kv2l_k_pe." in n for n in names) and not any(".attention.kv2l." in n for n in names)
    assert any(".attention.l2q_pe_proj." in n for n in names) == (variant == "full")
    ckpt = save_ms_checkpoint(tensors + _training_state(tensors), str(tmp_path / "split.ckpt"))
    model = _build(path)
    assert load_checkpoint_into(model, ckpt) == [ckpt]
    ids = _ids(160, seed=6)
    want = _hf_logits(hf, ids)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - want).max() <= TOL
    ours = str(tmp_path / "ours.ckpt")
    convert_upstream(ckpt, ours, "deepseek2", config=os.path.join(path, "config.json"), progress=False)
    model = _build(path)
    plain_load(model, ours)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - want).max() <= TOL


def test_sharded_upstream_checkpoint_says_merge_first(ds2, tmp_path):
    """rank_N/ folders of a model-parallel upstream save (each tensor cut in 2 along one axis, optimizer
    state beside): loading one is refused with what was found and how to merge, not a shape list."""
    path, state, _ = ds2["full"]
    tensors = deepseek2_upstream_tensors(state)
    for rank in (0, 1):
        shard = []
        for name, value, dtype in tensors:
            if value.ndim >= 2 and "norm" not in name:
                axis = 1 if ("attention.wo." in name or ".w2." in name) and value.ndim == 2 else 0
                value = np.array_split(value, 2, axis=axis)[rank]
            shard.append((name, np.ascontiguousarray(value), dtype))
        os.makedirs(tmp_path / "save" / f"rank_{rank}")
        save_ms_checkpoint(shard + _training_state(shard),
                           str(tmp_path / "save" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))
    model = _build(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_into(model, str(tmp_path / "save"), rank_id=1)
    message = str(err.value)
    assert "rank_1/checkpoint_1.ckpt: one rank's part of a distributed (model-parallel) upstream save" in message
    assert "cut 2 ways" in message and "mindspore.transform_checkpoints" in message


def test_deepseek2_upstream_dtypes_load_as_written(ds2, tmp_path):
    """Upstream stores norms and the router in float32, everything else in bfloat16: each of our
    parameters gets exactly the stored value (bfloat16 ones = HF's rounded to bfloat16)."""
    path, state, _ = ds2["full"]
    tensors = deepseek2_upstream_tensors(state, upstream_dtypes=True)
    assert {d for _, _, d in tensors} == {"float32", "bfloat16"}
    ckpt = save_ms_checkpoint(tensors, str(tmp_path / "up_bf16.ckpt"))
    model = _build(path)
    load_checkpoint_into(model, ckpt)
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    stored = {n: (a, d) for n, a, d in tensors}
    router = stored["model.layers.1.feed_forward.routed_experts.router.dense.weight"]
    assert router[1] == "float32" and np.array_equal(params["model.layers.1.feed_forward.router.dense.weight"],
                                                     router[0])
    w1 = stored["model.layers.1.feed_forward.routed_experts.ffn.w1.weight"]
    expected = ms.Tensor(w1[0], ms.bfloat16).astype(ms.float32).asnumpy()
    assert np.array_equal(params["model.layers.1.feed_forward.ffn.w1"], expected)
    assert not np.array_equal(expected, w1[0])  # the rounding is real, so the check means something


def test_deepseek2_upstream_migration_cli(ds2, tmp_path):
    """tools/convert_weight.py --model deepseek2 --upstream writes our layout once; the plain loader
    then loads it and the logits equal HF's."""
    path, state, hf = ds2["full"]
    up = save_ms_checkpoint(deepseek2_upstream_tensors(state, upstream_dtypes=False), str(tmp_path / "up.ckpt"))
    ours = tmp_path / "ours.ckpt"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weight.py"), "--model", "deepseek2",
                          "--upstream", "--input_path", up, "--output_path", str(ours), "--config",
                          os.path.join(path, "config.json"), "--no_progress"],
                         capture_output=True, text=True, cwd=str(tmp_path), check=False)
    assert run.returncode == 0, run.stderr
    assert "migrated" in run.stdout
    names = {e.name for e in read_ckpt_index(str(ours))}
    assert "model.layers.1.feed_forward.ffn.w1" in names and detect_upstream(names) is None
    model = _build(path)
    plain_load(model, str(ours))
    ids = _ids(160, seed=4)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - _hf_logits(hf, ids)).max() <= TOL


def test_wizardcoder_upstream_checkpoint_loads_with_hf_logits(wiz, tmp_path):
    """backbone.blocks.N.layernorm1.gamma, dense1/2/3, transposed projection / mapping, head.head_weight:
    mapped while loading; logits within 1e-4 of HF."""
    path, hf = wiz
    ckpt = _wiz_upstream(path, hf, str(tmp_path / "wizardcoder_up.ckpt"))
    assert detect_upstream(e.name for e in read_ckpt_index(ckpt)) == "wizardcoder"
    model = _build(path)
    with pytest.raises(CheckpointError, match=r"backbone\.blocks\.0\."):  # not our layout: names the unexpected
        select_checkpoint(ckpt, model_parameters(model))
    load_checkpoint_into(model, ckpt)
    ids = _ids(160, seed=2, length=23)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - _hf_logits(hf, ids)).max() <= TOL


def test_wizardcoder_upstream_directory_and_migration(wiz, tmp_path):
    """A rank_0/ folder holding the upstream file loads as a directory; --upstream migrates it, and a
    config-less migration of a non-released size asks for --config."""
    path, hf = wiz
    folder = tmp_path / "ckpt" / "rank_0"
    folder.mkdir(parents=True)
    ckpt = _wiz_upstream(path, hf, str(folder / "wizardcoder.ckpt"))
    model = _build(path)
    assert load_checkpoint_into(model, str(tmp_path / "ckpt"), rank_id=0) == [ckpt]
    ours = str(tmp_path / "ours.ckpt")
    result = convert_upstream(ckpt, ours, "wizardcoder", config=os.path.join(path, "config.json"), progress=False)
    assert result.tensors == len({p.name for p in model.get_parameters()})
    fresh = _build(path)
    plain_load(fresh, ours)
    for a, b in zip(model.get_parameters(), fresh.get_parameters()):
        assert a.name == b.name and np.array_equal(a.asnumpy(), b.asnumpy())
    with pytest.raises(ConversionError, match=r"(?s)pass --config.*run_wizardcoder\.yaml"):
        convert_upstream(ckpt, str(tmp_path / "x.ckpt"), "wizardcoder", progress=False)


def test_deepseek_coder_upstream_checkpoint_is_our_layout(tiny_llama_dirs, tmp_path):
    """Upstream's DeepSeek-Coder converter wrote our names: the plain loader takes it unchanged, and
    --upstream --model deepseek is a checked copy."""
    import transformers

    path = tiny_llama_dirs["v1_5"]
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ckpt = save_ms_checkpoint(llama_upstream_tensors(hf.state_dict()), str(tmp_path / "up.ckpt"))
    model = _build(path)
    plain_load(model, ckpt)
    ids = _ids(160, seed=6)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - _hf_logits(hf, ids)).max() <= TOL
    result = convert_upstream(ckpt, str(tmp_path / "copy.ckpt"), "deepseek", config=os.path.join(path, "config.json"),
                              progress=False)
    assert result.tensors == len(read_ckpt_index(ckpt))


def test_errors_name_the_file_tensor_and_expectation(ds2, wiz, tmp_path):
    """Wrong family, wrong config, and a checkpoint of neither layout: each error names the file and
    the tensor at fault and what was expected."""
    path, state, _ = ds2["full"]
    up = save_ms_checkpoint(deepseek2_upstream_tensors(state), str(tmp_path / "ds2_up.ckpt"))
    with pytest.raises(ConversionError, match=r"ds2_up\.ckpt: an upstream DeepSeek-V2 checkpoint, not WizardCoder"):
        convert_upstream(up, str(tmp_path / "a.ckpt"), "wizardcoder", config=os.path.join(wiz[0], "config.json"))
    lite_config = os.path.join(ds2["lite"][0], "config.json")
    with pytest.raises(ConversionError, match=r"ds2_up\.ckpt: tensor .* (has shape|is a deepseek2_upstream weight)"):
        convert_upstream(up, str(tmp_path / "b.ckpt"), "deepseek2", config=lite_config)
    lite_model = _build(ds2["lite"][0])
    with pytest.raises(CheckpointError, match=r"load_checkpoint: .*ds2_up\.ckpt"):
        load_checkpoint_into(lite_model, up)
    # neither layout: our loader lists unexpected and missing names; the converter says what it wanted
    junk = save_ms_checkpoint([("encoder.block.0.weight", np.zeros((4, 4), np.float32), "float32")],
                              str(tmp_path / "junk.ckpt"))
    with pytest.raises(CheckpointError, match=r"junk\.ckpt.*no weight for .*encoder\.block\.0\.weight"):
        load_checkpoint_into(lite_model, junk)
    with pytest.raises(ConversionError, match=r"junk\.ckpt: not an upstream MindFormers DeepSeek-V2 checkpoint \(no "
                                              r"names like 'model\.layers\.1\.feed_forward\.routed_experts"):
        convert_upstream(junk, str(tmp_path / "c.ckpt"), "deepseek2", config=lite_config)
    assert not os.path.exists(tmp_path / "a.ckpt") and not os.path.exists(tmp_path / "b.ckpt")
