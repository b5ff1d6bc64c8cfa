"""PortableTrainOneStepCell: overflow handling, loss scale, clipping and accumulation on tiny nets."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Parameter, Tensor, nn, ops

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper import build_wrapper

from mindformers_ext.runner.wrapper import PortableTrainOneStepCell


class LinearLoss(nn.Cell):
    """loss = sum(w * x): the gradient with respect to w is x itself."""

    def __init__(self, size=2):
        super().__init__()
        self.w = Parameter(Tensor(np.ones(size, np.float32)), name="w")

    def construct(self, x):
        return (self.w * x).sum()


class RegressionLoss(nn.Cell):
    """Mean squared error of a small dense layer: a loss that is a mean over the batch."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(3, 2, weight_init="normal", bias_init="zeros")

    def construct(self, x, y):
        return ((self.dense(x) - y) ** 2).mean()


def _weights(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


def test_registered_and_built_from_config():
    assert MindFormerRegister.is_exist(MindFormerModuleType.WRAPPER, "PortableTrainOneStepCell")
    net = LinearLoss()
    wrapper = build_wrapper({"type": "PortableTrainOneStepCell", "scale_sense": 4, "use_clip_grad": True},
                            default_args={"network": net, "optimizer": nn.SGD(net.trainable_params(), 0.1),
                                          "parallel_config": None, "calculate_per_token_loss": False,
                                          "global_norm_spike_threshold": 1.0, "print_separate_loss": True,
                                          "use_skip_data_by_global_norm": False, "lr_scheduler": None,
                                          "grouped_lr_scheduler": None})
    assert isinstance(wrapper, PortableTrainOneStepCell)
    assert float(wrapper.scale_sense.asnumpy()) == 4.0


@pytest.mark.parametrize("clip", [False, True])
def test_overflow_skips_update_and_lowers_dynamic_scale(clip):
    net = LinearLoss()
    manager = nn.DynamicLossScaleUpdateCell(loss_scale_value=1024.0, scale_factor=2, scale_window=1000)
    step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.5), scale_sense=manager,
                                    use_clip_grad=clip, max_grad_norm=100.0)
    before = net.w.asnumpy().copy()
    loss, overflow, scale, _, _ = step(Tensor(np.array([np.inf, 1.0], np.float32)))
    assert bool(overflow.asnumpy())
    assert float(scale.asnumpy()) == 1024.0  # the scale used for this step
    assert float(step.scale_sense.asnumpy()) == 512.0  # lowered for the next one
    np.testing.assert_array_equal(net.w.asnumpy(), before)  # update skipped
    loss, overflow, _, _, _ = step(Tensor(np.array([1.0, 2.0], np.float32)))
    assert not bool(overflow.asnumpy())
    assert float(loss.asnumpy()) == pytest.approx(3.0)
    # gradient x unscaled: w <- w - 0.5 * x
    np.testing.assert_allclose(net.w.asnumpy(), before - 0.5 * np.array([1.0, 2.0]), rtol=1e-6)
    assert float(step.scale_sense.asnumpy()) == 512.0


def test_overflow_with_static_scale_skips_and_keeps_scale():
    net = LinearLoss()
    step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.5), scale_sense=8.0)
    before = net.w.asnumpy().copy()
    _, overflow, _, _, _ = step(Tensor(np.array([np.nan, 1.0], np.float32)))
    assert bool(overflow.asnumpy())
    # +inf and -inf in one gradient: its sum is NaN, still caught
    _, overflow, _, _, _ = step(Tensor(np.array([np.inf, -np.inf], np.float32)))
    assert bool(overflow.asnumpy())
    np.testing.assert_array_equal(net.w.asnumpy(), before)
    assert float(step.scale_sense.asnumpy()) == 8.0
    unit = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.5))
    with pytest.raises(ValueError, match="static loss scale of 1"):
        unit.set_sense_scale(Tensor(2.0, ms.float32))


def test_clipping_bounds_the_global_norm():
    """Gradient (3, 4) has norm 5; clipped to 1 it becomes (0.6, 0.8) (loss scale divided out first)."""
    net = LinearLoss()
    step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=1.0),
                                    use_clip_grad=True, max_grad_norm=1.0, scale_sense=64.0)
    _, overflow, _, _, global_norm = step(Tensor(np.array([3.0, 4.0], np.float32)))
    assert not bool(overflow.asnumpy())
    assert float(global_norm.asnumpy().reshape(())) == pytest.approx(5.0, rel=1e-6)
    np.testing.assert_allclose(net.w.asnumpy(), [1 - 0.6, 1 - 0.8], rtol=1e-5)
    # a gradient already inside the bound is left alone
    net2 = LinearLoss()
    step2 = PortableTrainOneStepCell(net2, nn.SGD(net2.trainable_params(), learning_rate=1.0),
                                     use_clip_grad=True, max_grad_norm=10.0)
    step2(Tensor(np.array([3.0, 4.0], np.float32)))
    np.testing.assert_allclose(net2.w.asnumpy(), [1 - 3.0, 1 - 4.0], rtol=1e-6)


def _regression_step(accumulation, x, y, per_token=False):
    ms.set_seed(1)
    net = RegressionLoss()
    init = _weights(net)
    step = PortableTrainOneStepCell(net, nn.Adam(net.trainable_params(), learning_rate=0.01),
                                    gradient_accumulation_steps=accumulation, use_clip_grad=True, max_grad_norm=1e3)
    losses = [float(step(Tensor(x), Tensor(y))[0].asnumpy()) for _ in range(3)]
    return init, _weights(net), losses


def test_steps_whose_global_norm_spikes_are_skipped(monkeypatch):
    """MFTrainOneStepCell's use_skip_data_by_global_norm: a step whose global gradient norm (loss scale
    divided out, before clipping) is not below global_norm_spike_threshold leaves the weights as they were;
    the others update as usual. MFTrainOneStepCell's local_norm diagnostic is reported as not done."""
    from mindformers_ext.runner import wrapper

    net = LinearLoss()
    step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=1.0), use_clip_grad=True,
                                    max_grad_norm=100.0, scale_sense=4.0, use_skip_data_by_global_norm=True,
                                    global_norm_spike_threshold=5.0)
    before = net.w.asnumpy().copy()
    _, overflow, _, _, norm = step(Tensor(np.array([3.0, 4.0], np.float32)))  # norm 5: not below 5
    assert not bool(overflow.asnumpy()) and float(norm.asnumpy()) == pytest.approx(5.0)
    np.testing.assert_array_equal(net.w.asnumpy(), before)
    _, _, _, _, norm = step(Tensor(np.array([2.4, 3.2], np.float32)))  # norm 4: w <- w - x
    assert float(norm.asnumpy()) == pytest.approx(4.0)
    np.testing.assert_allclose(net.w.asnumpy(), before - np.array([2.4, 3.2]), rtol=1e-6)
    with pytest.raises(ValueError, match="use_skip_data_by_global_norm: True needs use_clip_grad: True"):
        PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), 1.0), use_skip_data_by_global_norm=True)
    messages = []
    monkeypatch.setattr(wrapper, "logger", type("Recorder", (), {"warning": lambda *a: messages.append(a[0] % a[1:])}))
    # print_separate_loss is True by default in MindFormers' trainer: no message for it
    PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), 1.0), local_norm=True, print_separate_loss=True,
                             lr_scheduler=None)
    assert messages == ["runner_wrapper.local_norm: True is not done by PortableTrainOneStepCell (an "
                        "MFTrainOneStepCell diagnostic); training runs as without it"]


def test_accumulation_equals_one_step_on_the_concatenated_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    init1, after1, losses1 = _regression_step(1, x, y)
    init4, after4, losses4 = _regression_step(4, x, y)
    for name in init1:
        np.testing.assert_array_equal(init1[name], init4[name])
        assert not np.allclose(after1[name], init1[name])
        np.testing.assert_allclose(after4[name], after1[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)


def test_bad_accumulation_settings_are_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a graph that fails to compile leaves rank_0/om/analyze_fail.ir in the cwd
    net = RegressionLoss()
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), 0.1), gradient_accumulation_steps=0)
    step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), 0.1), gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="batch size 4 is not divisible"):
        step(Tensor(np.zeros((4, 3), np.float32)), Tensor(np.zeros((4, 2), np.float32)))


class PerTokenLoss(nn.Cell):
    """(sum of squared errors over valid rows, number of valid rows)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(3, 1, weight_init="normal", bias_init="zeros")

    def construct(self, x, y, mask):
        err = ((self.dense(x) - y) ** 2).squeeze(-1) * mask
        return err.sum(), mask.sum()


def test_per_token_loss_accumulates_exactly_with_uneven_counts():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = rng.standard_normal((4, 1)).astype(np.float32)
    mask = np.array([1, 1, 1, 0], np.float32)  # micro-batches of 2 hold 2 and 1 valid rows
    results = []
    for k in (1, 2):
        ms.set_seed(3)
        net = PerTokenLoss()
        step = PortableTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1),
                                        gradient_accumulation_steps=k, calculate_per_token_loss=True)
        loss = float(step(Tensor(x), Tensor(y), Tensor(mask))[0].asnumpy())
        results.append((loss, _weights(net)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, rtol=1e-5, atol=1e-7)


def _adamw_run(optimizer_type, groups, steps=4):
    from mindformers.core.lr import build_lr
    from mindformers.core.optim import build_optim

    from mindformers_ext.runner import register
    register()  # PortableAdamW in MindFormers' registry
    ms.set_seed(7)
    net = RegressionLoss()
    initial = _weights(net)
    params = net.trainable_params()
    if groups:
        params = [{"params": [p for p in params if len(p.shape) > 1], "weight_decay": 0.1},
                  {"params": [p for p in params if len(p.shape) <= 1], "weight_decay": 0.0}]
    lr = build_lr({"type": "CosineWithWarmUpLR", "learning_rate": 0.05, "warmup_steps": 1, "total_steps": 10})
    optimizer = build_optim({"type": optimizer_type, "learning_rate": lr, "betas": [0.9, 0.95], "eps": 1e-6,
                             "weight_decay": 0.1}, default_args={"params": params})
    step = PortableTrainOneStepCell(net, optimizer, use_clip_grad=True, max_grad_norm=0.5)
    rng = np.random.default_rng(2)
    for _ in range(steps):
        step(Tensor(rng.standard_normal((4, 3)).astype(np.float32)),
             Tensor(rng.standard_normal((4, 2)).astype(np.float32)))
    state = {p.name: p.asnumpy().copy() for p in optimizer.parameters}
    assert all(not np.allclose(state[name], value) for name, value in initial.items())
    state.update({p.name: p.asnumpy().copy() for p in optimizer.exp_avg})
    state.update({p.name: p.asnumpy().copy() for p in optimizer.exp_avg_sq})
    state["global_step"] = optimizer.global_step.asnumpy().copy()
    assert getattr(optimizer, "fused", True)  # PortableAdamW took its fused path
    return state


@pytest.mark.parametrize("groups", [False, True])
def test_portable_adamw_equals_mindformers_adamw(groups):
    """Bias correction folded into the fused operator's inputs: same weights and moments, same state names."""
    ours, theirs = _adamw_run("PortableAdamW", groups), _adamw_run("AdamW", groups)
    assert sorted(ours) == sorted(theirs)
    assert any(name.startswith("adam_m.") for name in ours) and int(ours["global_step"][0]) == 4
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
