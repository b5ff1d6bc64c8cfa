"""The CPU kernel that multiplies each row by the expert matrix it picks, in place (MoE decode)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from mindformers_ext.layers import indexed_matmul


class _Apply(nn.Cell):
    def __init__(self, op, weights):
        super().__init__()
        self.op = op
        self.w = Parameter(Tensor(weights), name="w")

    def construct(self, x, idx):
        return self.op(x, self.w, idx)


@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_numpy(dynamic):
    """Rows picking the same expert, an expert nobody picks, a depth that is no multiple of the kernel's
    four accumulators, in a static graph and in one dynamic-shape graph run at two row counts: each row
    equals its own matrix-vector product."""
    op = indexed_matmul.indexed_matmul_op()
    if op is None:
        pytest.skip("no C++ compiler here: MoE decode gathers expert weights instead")
    rng = np.random.default_rng(0)
    experts, width, depth = 5, 6, 13
    w = rng.standard_normal((experts, width, depth)).astype(np.float32)
    net = _Apply(op, w)
    if dynamic:
        net.set_inputs(Tensor(shape=[None, depth], dtype=ms.float32), Tensor(shape=[None], dtype=ms.int32))
    for idx in ([3, 0, 3, 4, 0, 3, 1], [2, 2]) if dynamic else ([3, 0, 3, 4, 0, 3, 1],):  # 2 unused, 3 thrice
        idx = np.array(idx, np.int32)
        x = rng.standard_normal((len(idx), depth)).astype(np.float32)
        got = net(Tensor(x), Tensor(idx)).asnumpy()
        want = np.einsum("rod,rd->ro", w[idx].astype(np.float64), x.astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _ApplyInt8(nn.Cell):
    def __init__(self, op, weights, scale):
        super().__init__()
        self.op = op
        self.w = Parameter(Tensor(weights), name="w")
        self.scale = Parameter(Tensor(scale), name="scale")

    def construct(self, x, idx):
        return self.op(x, self.w, self.scale, idx)


def test_int8_weights_with_scales_match_numpy():
    """W8A16: int8 values times the picked expert's per-row scale."""
    op = indexed_matmul.indexed_matmul_op(int8=True)
    if op is None:
        pytest.skip("no C++ compiler here: MoE decode gathers expert weights instead")
    rng = np.random.default_rng(1)
    experts, width, depth = 4, 5, 11
    w = rng.integers(-127, 128, size=(experts, width, depth)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, size=(experts, width)).astype(np.float32)
    idx = np.array([1, 3, 1, 0], np.int32)
    x = rng.standard_normal((len(idx), depth)).astype(np.float32)
    got = _ApplyInt8(op, w, scale)(Tensor(x), Tensor(idx)).asnumpy()
    want = scale[idx] * np.einsum("rod,rd->ro", w[idx].astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_switched_off_or_without_compiler_returns_none(monkeypatch, tmp_path):
    """MINDFORMERS_EXT_CPU_KERNELS=0, or a compiler that does not exist: no operator (the caller gathers)."""
    monkeypatch.setenv("MINDFORMERS_EXT_CPU_KERNELS", "0")
    assert indexed_matmul.indexed_matmul_op() is None
    monkeypatch.delenv("MINDFORMERS_EXT_CPU_KERNELS")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert indexed_matmul.indexed_matmul_op() is None
    assert ms.get_context("device_target") == "CPU"
