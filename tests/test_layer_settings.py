"""Per-layer training settings of upstream MindFormers' YAMLs on our models, as MindFormers' LayerSetting
applies them to its own: recompute_config (off CPU; on CPU left off with a warning; bad values refused;
recomputing leaves the gradients as they are), gradient all-reduce fusion groups, and the sequence-split
settings our layers do not apply (refused or reported)."""
import os
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest

from conftest import make_tiny_llama
from deepseek2_reference import make_tiny_deepseek2
from mindformers_ext import load_hf_model
from mindformers_ext.parallel import build_skeleton, shard
from mindformers_ext.parallel.shard import recompute_layers
from research.deepseek1_5 import DeepSeekCoderConfig, DeepSeekCoderForCausalLM
from wizardcoder_util import make_tiny_bigcode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recomputed(cell) -> bool:
    """Whether ``Cell.recompute`` was called on ``cell`` itself (it adds this flag to the cell)."""
    return "output_recompute" in cell.get_flags()


def _skeleton(layers=8, parallel=None, **recompute):
    parallel = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 2, **(parallel or {})}
    if recompute:
        parallel["recompute"] = recompute
    config = DeepSeekCoderConfig.from_preset("deepseek-coder-1.3b", num_layers=layers, seq_length=64, batch_size=1,
                                             parallel_config=parallel)
    return build_skeleton(DeepSeekCoderForCausalLM, config)


def _settings(offset=0, **recompute):
    return SimpleNamespace(parallel_config=SimpleNamespace(recompute=recompute), offset=offset)


def test_whole_layers_per_stage_and_select_recompute_off_cpu():
    """True: every layer; a list: the first n layers of each pipeline stage; select_recompute: the attention
    core of the layers not recomputed whole."""
    layers = _skeleton().model.layers
    recompute_layers(layers, _settings(recompute=[3, 1], select_recompute=True), stages=2, device_target="Ascend")
    # 8 layers over 2 stages: 0-3 and 4-7
    assert [_recomputed(layer) for layer in layers] == [True, True, True, False, True, False, False, False]
    assert [_recomputed(layer.attention.core) for layer in layers] == [False, False, False, True,
                                                                       False, True, True, True]
    layers = _skeleton().model.layers
    recompute_layers(layers, _settings(recompute=True), device_target="Ascend")
    assert all(_recomputed(layer) for layer in layers)
    # the stage split follows offset, as the layers' pipeline_stage does: [1, -1] puts 5 layers on stage 0
    layers = _skeleton().model.layers
    recompute_layers(layers, _settings(recompute=False, select_recompute=[5, 0], offset=[1, -1]), stages=2,
                     device_target="Ascend")
    assert [_recomputed(layer.attention.core) for layer in layers] == [True] * 5 + [False] * 3
    assert not any(_recomputed(layer) for layer in layers)


def test_cpu_leaves_recompute_off_and_says_why(monkeypatch):
    messages = []
    monkeypatch.setattr(shard, "logger", SimpleNamespace(warning=messages.append))
    model = _skeleton(recompute=True)
    assert not any(_recomputed(layer) or _recomputed(layer.attention.core) for layer in model.model.layers)
    assert len(messages) == 1 and "recompute_config: recompute: True is not applied on CPU" in messages[0]
    messages.clear()
    _skeleton(recompute=False, select_recompute=False)
    _skeleton()
    assert not messages
    # MindFormers' other op-name pattern settings are reported wherever the model is built
    layers = _skeleton().model.layers
    recompute_layers(layers, _settings(recompute=True, select_comm_recompute=True,
                                       select_recompute_exclude={r"feed_forward\.mul": True}),
                     device_target="Ascend")
    assert [m.split(":")[0] for m in messages] == ["recompute_config.select_comm_recompute",
                                                   "recompute_config.select_recompute_exclude"]
    assert all(_recomputed(layer) for layer in layers)


@pytest.mark.parametrize("value, key, match", [
    ([1, 1, 1], "recompute", r"recompute_config\.recompute: \[1, 1, 1\] has 3 layer counts, expected one per "
                             r"pipeline stage \(2\)"),
    ({r"feed_forward\.mul": True}, "select_recompute", r"recompute_config\.select_recompute: .* is not supported"),
    ([[1, 1]], "recompute", r"recompute_config\.recompute: \[\[1, 1\]\] is not supported"),
])
def test_unsupported_values_are_refused(value, key, match):
    layers = _skeleton().model.layers
    with pytest.raises(ValueError, match=match):
        recompute_layers(layers, _settings(**{key: value}), stages=2, device_target="CPU")


def _loss_and_grads(model, ids):
    params = model.trainable_params()
    model.set_train(True)
    loss, grads = ms.value_and_grad(model, None, params)(ms.Tensor(ids), ms.Tensor(ids))
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode", "deepseek2"])
def test_recomputed_layers_give_the_same_gradients(tmp_path, family):
    """Each family's layers, recomputed whole (first one) or by their attention core (second), give the
    loss and every gradient of the model without recompute: the layers are free of state that a second
    forward pass would change."""
    path = str(tmp_path / family)
    if family == "llama":
        make_tiny_llama(path)
    elif family == "gpt_bigcode":
        make_tiny_bigcode(path)
    else:
        make_tiny_deepseek2(path, "full")
    plain = load_hf_model(path)
    recomputed = load_hf_model(path)
    layers = recomputed.model.layers
    assert len(layers) >= 2
    recompute_layers(layers, _settings(recompute=[1], select_recompute=True), device_target="Ascend")
    assert _recomputed(layers[0]) and _recomputed(layers[1].attention.core)
    ids = np.random.RandomState(0).randint(3, 90, size=(2, 12)).astype(np.int32)
    loss, grads = _loss_and_grads(plain, ids)
    loss_rc, grads_rc = _loss_and_grads(recomputed, ids)
    assert loss_rc == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_rc.keys()
    for name, grad in grads.items():
        np.testing.assert_allclose(grads_rc[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)


def _fusion(cell) -> set:
    return {p.comm_fusion for p in cell.trainable_params()}


@pytest.mark.parametrize("group, pipeline, expected", [
    (4, 1, [1, 1, 2, 2, 3, 3, 4, 4]),  # 8 layers in groups of (8 + 1) // 4 = 2
    (2, 1, [1, 1, 1, 1, 2, 2, 2, 2]),
    (4, 2, [2] * 8),                    # pipeline parallel: one group
])
def test_gradient_fusion_groups_follow_gradient_aggregation_group(group, pipeline, expected):
    from research.wizardcoder import WizardCoderConfig, WizardCoderForCausalLM

    parallel = {"gradient_aggregation_group": group, "pipeline_stage": pipeline}
    model = _skeleton(parallel=parallel)
    assert [_fusion(layer) for layer in model.model.layers] == [{g} for g in expected]
    outer = 2 if pipeline > 1 else group
    assert _fusion(model.model.tok_embeddings) == _fusion(model.model.norm_out) == {outer}
    config = WizardCoderConfig(num_layers=8, batch_size=1, parallel_config={
        "data_parallel": 1, "model_parallel": 1, "micro_batch_num": 2, **parallel})
    model = build_skeleton(WizardCoderForCausalLM, config)
    assert [_fusion(layer) for layer in model.model.layers] == [{g} for g in expected]
    for cell in (model.model.tok_embeddings, model.model.position_embeddings, model.model.norm_out):
        assert _fusion(cell) == {outer}


def test_sequence_splits_are_refused_or_reported(monkeypatch):
    with pytest.raises(ValueError, match=r"parallel_config\.context_parallel: 2 is not supported"):
        _skeleton(parallel={"context_parallel": 2})
    messages = []
    monkeypatch.setattr(shard, "logger", SimpleNamespace(warning=messages.append))
    _skeleton(parallel={"use_seq_parallel": True})
    assert len(messages) == 1 and "parallel_config.use_seq_parallel: True is not applied" in messages[0]
    messages.clear()
    _skeleton(parallel={"use_seq_parallel": False, "context_parallel": 1})
    assert not messages


def test_static_check_reports_and_checks_recompute_config(tmp_path):
    """tools/check_parallel.py: the recompute each pipeline stage gets on Ascend, and a bad setting refused
    before a job is launched."""
    import yaml

    from mindformers_ext.parallel.yaml_check import check_yaml

    shipped = os.path.join(REPO, "research", "deepseek2", "finetune_deepseek2_236B.yaml")  # 60 layers, pp 2
    assert check_yaml(shipped)[-1] == "recompute per pipeline stage: [30, 30] layers whole, [0, 0] attention cores"
    with open(shipped, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    doc["recompute_config"].update(recompute=[4, 0], select_recompute=[6, 2])
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert check_yaml(str(path))[-1] == "recompute per pipeline stage: [4, 0] layers whole, [2, 2] attention cores"
    doc["recompute_config"]["recompute"] = [1, 1, 1]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"select\.yaml: recompute_config\.recompute: \[1, 1, 1\] has 3 layer counts"):
        check_yaml(str(path))
    doc["recompute_config"].update(recompute=False, select_recompute=False)
    path.write_text(yaml.safe_dump(doc))
    assert "recompute" not in check_yaml(str(path))[-1]
