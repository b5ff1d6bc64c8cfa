"""``qkv_concat``: q/k/v and gate/up as one matmul each (upstream MindFormers' ``w_qkv`` / ``w_gate_hidden``),
against HF transformers on the same weights, and the fused rows against upstream v1.5.0's layout."""
import numpy as np
import pytest
import torch
import transformers

import mindspore as ms
from decode_steps import TOLERANCE, generate_with_logits, hf_rows, max_step_error, random_prompts
from deepseek2_reference import make_tiny_deepseek2, one_torch_thread
from mindformers_ext import load_hf_model
from mindformers_ext.checkpoint import CheckpointError, load_checkpoint_into, unfused_parameters
from mindformers_ext.layers import FusedLinear
from research.deepseek1_5 import DeepSeekCoderForCausalLM
from wizardcoder_util import make_tiny_bigcode


def _names(model):
    return [p.name for p in model.get_parameters()]


def _hf_logits(ref, ids):
    with torch.no_grad(), one_torch_thread():
        return ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def gqa(tiny_llama_dirs):
    """(HF dir, fused model, HF model) of the tiny GQA Llama (4 query heads over 2 key/value heads)."""
    path = tiny_llama_dirs["gqa"]
    return (path, load_hf_model(path, qkv_concat=True),
            transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval())


def test_fused_rows_follow_upstream_layout():
    """Upstream v1.5.0 (``qkv_concat_hf2mg`` / ``ffn_concat_hf2mg``): w_qkv rows per key/value head are its
    queries, its key, its value; w_gate_hidden interleaves gate and up rows. Rows written out by hand for
    4 query heads over 2 key/value heads of dim 1, and 3 intermediate rows."""
    qkv = FusedLinear(2, (("wq", 4), ("wk", 2), ("wv", 2)), groups=2)
    q, k, v = np.array([[10], [11], [12], [13]]), np.array([[20], [21]]), np.array([[30], [31]])
    fused = qkv.fuse([q, k, v])
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert qkv.fuse([q[:, 0], k[:, 0], v[:, 0]]).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]  # a bias
    gate_up = FusedLinear(2, (("w1", 3), ("w3", 3)), groups=3)
    assert gate_up.fuse([np.array([1, 2, 3]), np.array([7, 8, 9])]).tolist() == [1, 7, 2, 8, 3, 9]
    assert FusedLinear(2, (("q_attn", 2), ("kv_attn", 2))).fuse([np.array([1, 2]), np.array([3, 4])]).tolist() \
        == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="must be multiples of groups=2"):
        FusedLinear(2, (("wq", 3), ("wk", 2)), groups=2)


def test_llama_fused_logits_and_decode_steps_match_hf(gqa):
    _, ours, ref = gqa
    names = _names(ours)
    assert "model.layers.0.attention.w_qkv.weight" in names and "model.layers.0.feed_forward.w_gate_hidden.weight" \
        in names and not any(".wq." in n or ".w1." in n for n in names)
    ids = np.array(random_prompts(ours.config.vocab_size, [23, 23], seed=1), dtype=np.int32)
    assert np.abs(ours(ms.Tensor(ids)).asnumpy() - _hf_logits(ref, ids)).max() <= 1e-4
    prompts = random_prompts(ours.config.vocab_size, [5, 12, 9], seed=3)
    sequences, logits = generate_with_logits(ours, prompts)
    assert max_step_error(prompts, sequences, logits, hf_rows(ref)) <= TOLERANCE


def test_fused_model_loads_split_and_fused_checkpoints(gqa, tmp_path):
    """A checkpoint with wq / wk / wv apart (what the converter writes) and one with w_qkv (a fused model's,
    as upstream's qkv_concat training saves) both load into a fused model; a missing part is named."""
    path, fused, ref = gqa
    split_ckpt, fused_ckpt = str(tmp_path / "split.ckpt"), str(tmp_path / "fused.ckpt")
    ms.save_checkpoint(load_hf_model(path), split_ckpt)
    ms.save_checkpoint(fused, fused_ckpt)
    ids = np.array(random_prompts(fused.config.vocab_size, [17], seed=4), dtype=np.int32)
    expected = _hf_logits(ref, ids)
    fields = {**fused.config.to_dict(), "checkpoint_name_or_path": ""}
    for ckpt in (split_ckpt, fused_ckpt):
        model = DeepSeekCoderForCausalLM(type(fused.config)(**fields))
        load_checkpoint_into(model, ckpt)
        assert np.abs(model(ms.Tensor(ids)).asnumpy() - expected).max() <= 1e-4, ckpt
    assert set(unfused_parameters(model)) == set(_names(load_hf_model(path)))
    unfused = DeepSeekCoderForCausalLM(type(fused.config)(**{**fields, "qkv_concat": False}))
    with pytest.raises(CheckpointError, match=r"fused projections .*set model_config\.qkv_concat: True"):
        load_checkpoint_into(unfused, fused_ckpt)
    # fused names where the model expects nothing of theirs (another model's checkpoint): no such hint
    other = {k.replace("model.", "transformer.", 1): v for k, v in ms.load_checkpoint(fused_ckpt).items()}
    ms.save_checkpoint([{"name": k, "data": v} for k, v in other.items()], str(tmp_path / "other.ckpt"))
    with pytest.raises(CheckpointError, match=r"transformer\.layers\.0") as refused:
        load_checkpoint_into(unfused, str(tmp_path / "other.ckpt"))
    assert "qkv_concat" not in str(refused.value)
    partial = {k: v for k, v in ms.load_checkpoint(split_ckpt).items() if k != "model.layers.1.attention.wv.weight"}
    ms.save_checkpoint([{"name": k, "data": v} for k, v in partial.items()], str(tmp_path / "partial.ckpt"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.attention\.wv\.weight"):
        load_checkpoint_into(model, str(tmp_path / "partial.ckpt"))


def test_gpt_bigcode_multi_query_fused_matches_hf(tmp_path):
    path = make_tiny_bigcode(str(tmp_path / "mqa"), seed=2)
    ours = load_hf_model(path, qkv_concat=True)
    assert "model.layers.0.attention.c_attn.weight" in _names(ours)
    assert not any("q_attn" in n or "kv_attn" in n for n in _names(ours))
    ref = transformers.GPTBigCodeForCausalLM.from_pretrained(path).eval()
    ids = np.array(random_prompts(160, [21, 21], seed=2), dtype=np.int32)
    assert np.abs(ours(ms.Tensor(ids)).asnumpy() - _hf_logits(ref, ids)).max() <= 1e-4
    prompts = random_prompts(160, [6, 11], seed=5)
    sequences, logits = generate_with_logits(ours, prompts)
    assert max_step_error(prompts, sequences, logits, hf_rows(ref)) <= TOLERANCE
    with pytest.raises(ValueError, match="cannot split over model_parallel 2"):
        ours.model.layers[0].attention.shard(1, 2)


def test_deepseek2_dense_layer_fused_matches_hf(tmp_path):
    """DeepSeek-V2 fuses its dense layers' gate / up (upstream's ffn_concat); MLA stays as it is."""
    path = str(tmp_path / "lite")
    make_tiny_deepseek2(path, "lite", seed=1)
    ours = load_hf_model(path, qkv_concat=True)
    assert "model.layers.0.feed_forward.w_gate_hidden.weight" in _names(ours)
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(path).eval()
    ids = np.array(random_prompts(160, [19, 19], seed=6), dtype=np.int32)
    assert np.abs(ours(ms.Tensor(ids)).asnumpy() - _hf_logits(ref, ids)).max() <= 1e-4


def test_fused_layout_parallel_check():
    """33B (56 query heads over 8 key/value heads) fused: model parallel 8 splits whole key/value groups; 16
    cannot, and the check names the split of the fused projection."""
    from mindformers_ext.parallel import ParallelCheckError, build_skeleton, check_parallel
    from research.deepseek1_5 import DeepSeekCoderConfig

    def skeleton(mp):
        parallel = {"data_parallel": 1, "model_parallel": mp, "pipeline_stage": 1, "micro_batch_num": 1}
        config = DeepSeekCoderConfig.from_preset("deepseek-coder-33b", seq_length=4096, batch_size=1,
                                                 parallel_config=parallel, qkv_concat=True)
        return build_skeleton(DeepSeekCoderForCausalLM, config)

    check_parallel(skeleton(8), 8)
    with pytest.raises(ParallelCheckError, match=r"attention\.split_qkv: input 0 dimension 2 \(8 = 8\) is not "
                                                 r"divisible by its split 16"):
        check_parallel(skeleton(16), 16)


def _upstream_qkv(q, k, v, kv_heads):
    """Upstream v1.5.0's ``qkv_concat_hf2mg`` written out: per key/value head, its queries, its key, its value."""
    rep, dim = q.shape[0] // k.shape[0], k.shape[0] // kv_heads
    rows = []
    for g in range(kv_heads):
        rows += [q[g * rep * dim:(g + 1) * rep * dim], k[g * dim:(g + 1) * dim], v[g * dim:(g + 1) * dim]]
    return np.concatenate(rows)


def test_converter_writes_and_reverses_fused_checkpoints(gqa, tmp_path, capsys):
    """``convert_weight.py --qkv_concat True`` (upstream's flag) writes w_qkv / w_gate_hidden in upstream's row
    order, which a fused model loads with HF's logits; ``--reversed`` recognises the fused names and gives back
    HF's tensors bit for bit; a family without the fused layout is refused."""
    from safetensors.numpy import load_file
    from mindformers_ext.convert.cli import main as convert_main

    path, fused, ref = gqa
    ckpt, back = str(tmp_path / "fused.ckpt"), str(tmp_path / "hf_back")
    assert convert_main(["--model", "deepseek", "--input_path", path, "--output_path", ckpt, "--qkv_concat", "True",
                         "--no_progress"]) == 0
    hf = load_file(f"{path}/model.safetensors")
    written = {k: v.asnumpy() for k, v in ms.load_checkpoint(ckpt).items()}
    assert not any(".wq." in n or ".w1." in n or ".w3." in n for n in written)
    kv_heads = fused.config.n_kv_heads
    for i in range(fused.config.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        expected = _upstream_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], kv_heads)
        assert np.array_equal(written[f"model.layers.{i}.attention.w_qkv.weight"], expected)
        gate_up = written[f"model.layers.{i}.feed_forward.w_gate_hidden.weight"]
        assert np.array_equal(gate_up[0::2], hf[m + "gate_proj.weight"])
        assert np.array_equal(gate_up[1::2], hf[m + "up_proj.weight"])
    model = DeepSeekCoderForCausalLM(type(fused.config)(**{**fused.config.to_dict(), "checkpoint_name_or_path": ""}))
    load_checkpoint_into(model, ckpt)
    ids = np.array(random_prompts(fused.config.vocab_size, [13], seed=6), dtype=np.int32)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - _hf_logits(ref, ids)).max() <= 1e-4

    assert convert_main(["--model", "deepseek", "--input_path", ckpt, "--output_path", back, "--reversed",
                         "--config", f"{path}/config.json", "--no_progress"]) == 0
    restored = load_file(f"{back}/model.safetensors")
    assert set(restored) == set(hf) and all(np.array_equal(restored[k], hf[k]) for k in hf)

    capsys.readouterr()
    assert convert_main(["--model", "wizardcoder", "--input_path", path, "--output_path", str(tmp_path / "x.ckpt"),
                         "--qkv_concat", "True", "--no_progress"]) == 1
    assert "--qkv_concat: the wizardcoder weight map has no fused layout" in capsys.readouterr().err
