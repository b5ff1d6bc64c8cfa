"""The CPU kernels (cpu_kernels.cc): the product of each row with the expert matrix it picks (MoE decode),
the KV cache's in-place write and the int8 cache's dequantization, against numpy."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindformers_ext import cpu_kernels


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
    op = cpu_kernels.indexed_matmul_op()
    assert op is not None, "the CPU kernels did not build (is g++ installed?)"
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
    op = cpu_kernels.indexed_matmul_op(int8=True)
    assert op is not None, "the CPU kernels did not build (is g++ installed?)"
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
    assert cpu_kernels.indexed_matmul_op() is None and cpu_kernels.cache_write_op() is None
    assert cpu_kernels.dequantize_op() is None
    monkeypatch.delenv("MINDFORMERS_EXT_CPU_KERNELS")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cpu_kernels.indexed_matmul_op() is None and cpu_kernels.cache_write_op() is None
    assert ms.get_context("device_target") == "CPU"


class _Write(nn.Cell):
    """Writes ``new`` into ``cache`` at ``slot`` and returns the cache read after the write (and its sum)."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, cache, new, slot):
        cache = ops.depend(cache, self.op(cache, new, slot))
        return cache * 1, ops.cast(cache, ms.float32).sum()


@pytest.mark.parametrize("dtype", ["float32", "int8", "bfloat16"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_cache_write_changes_the_input_in_place(dtype, dynamic):
    """Rows written at different slots, two tokens per row (a prefill) then one (a decode step): the
    tensor passed in holds exactly numpy's assignment afterwards, and the graph's reads after the
    write see it. The dynamic-shape graph runs at two batch sizes and capacities."""
    op = cpu_kernels.cache_write_op()
    assert op is not None, "the CPU kernels did not build (is g++ installed?)"
    net = _Write(op)
    mstype = getattr(ms, dtype)
    if dynamic:
        net.set_inputs(Tensor(shape=[None] * 4, dtype=mstype), Tensor(shape=[None] * 4, dtype=mstype),
                       Tensor(shape=[None], dtype=ms.int32))
    rng = np.random.default_rng(2)
    for batch, capacity, slots, seq in ((3, 9, [0, 4, 7], 2), (2, 12, [11, 3], 1))[:2 if dynamic else 1]:
        want = rng.integers(-100, 100, size=(batch, 2, capacity, 5)).astype(np.float32)
        cache = Tensor(want, dtype=mstype)
        new = rng.integers(-100, 100, size=(batch, 2, seq, 5)).astype(np.float32)
        for b, s in enumerate(slots):
            want[b, :, s:s + seq] = new[b]
        read, total = net(cache, Tensor(new, dtype=mstype), Tensor(np.array(slots, np.int32)))
        np.testing.assert_array_equal(cache.astype(ms.float32).asnumpy(), want)
        np.testing.assert_array_equal(read.astype(ms.float32).asnumpy(), want)
        assert float(total.asnumpy()) == want.sum()


def test_cache_write_past_the_capacity_fails():
    """A slot whose tokens would not fit (slot + S > T) or is negative fails the call; nothing is written."""
    op = cpu_kernels.cache_write_op()
    assert op is not None, "the CPU kernels did not build (is g++ installed?)"
    net = _Write(op)
    cache = Tensor(np.zeros((1, 2, 4, 3), np.float32))
    for slot in (3, -1):
        with pytest.raises(RuntimeError):
            net(cache, Tensor(np.ones((1, 2, 2, 3), np.float32)), Tensor(np.array([slot], np.int32)))
    assert not cache.asnumpy().any()


class _Dequantize(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, values, scales):
        return self.op(values, scales)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dequantize_matches_numpy(dynamic):
    """int8 values times their row's scale, for cache-shaped (B, H, T, D) and gathered paged (B, H, L, D)
    inputs; the dynamic-shape graph runs at two shapes."""
    op = cpu_kernels.dequantize_op()
    assert op is not None, "the CPU kernels did not build (is g++ installed?)"
    net = _Dequantize(op)
    if dynamic:
        net.set_inputs(Tensor(shape=[None] * 4, dtype=ms.int8), Tensor(shape=[None] * 4, dtype=ms.float32))
    rng = np.random.default_rng(4)
    for shape in ((2, 3, 7, 5), (1, 1, 4, 9))[:2 if dynamic else 1]:
        values = rng.integers(-127, 128, size=shape).astype(np.int8)
        scales = rng.uniform(0.001, 0.1, size=shape[:-1] + (1,)).astype(np.float32)
        got = net(Tensor(values), Tensor(scales)).asnumpy()
        np.testing.assert_allclose(got, values.astype(np.float64) * scales, rtol=1e-6)
