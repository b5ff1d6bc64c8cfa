"""Token dispatch of the routed experts (training / prefill) against a per-token NumPy reference:
``sum_k w_k * (silu(x W1_e^T) * (x W3_e^T)) W2_e^T`` for each token's chosen experts e, and its
gradients against the all-experts computation, for balanced, skewed, all-on-one-expert and single-token
routings."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from research.deepseek2.deepseek2 import RoutedExperts

E, H, F, K = 8, 16, 12, 3


def _experts(seed=0):
    rng = np.random.default_rng(seed)
    cell = RoutedExperts(E, H, F, top_k=K)
    for name in ("w1", "w3", "w2"):
        param = getattr(cell, name)
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))
    return cell


def _reference(cell, x, indices, weights):
    w1, w3, w2 = (getattr(cell, n).asnumpy().astype(np.float64) for n in ("w1", "w3", "w2"))
    out = np.zeros((x.shape[0], H))
    for t in range(x.shape[0]):
        for e, w in zip(indices[t], weights[t]):
            gate, up = w1[e] @ x[t], w3[e] @ x[t]
            out[t] += w * (w2[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


def _routing(kind, n, rng):
    if kind == "skewed":  # every token picks the same k experts: k experts hold all the work
        indices = np.tile(np.array([5, 2, 7]), (n, 1))
    elif kind == "one_expert":  # top-1, all on one expert: the most spill blocks a routing can need
        return np.full((n, 1), 4, np.int32), rng.random((n, 1)).astype(np.float32)
    else:
        indices = np.stack([rng.permutation(E)[:K] for _ in range(n)])
    return indices.astype(np.int32), rng.random((n, K)).astype(np.float32)


@pytest.mark.parametrize("kind, n", [("balanced", 37), ("skewed", 20), ("one_expert", 20), ("balanced", 1)])
def test_token_dispatch_equals_the_per_token_formula(kind, n):
    rng = np.random.default_rng(1)
    cell = _experts()
    assert cell.token_dispatch
    x = rng.standard_normal((n, H)).astype(np.float32)
    indices, weights = _routing(kind, n, rng)
    out = cell(Tensor(x), Tensor(indices), Tensor(weights)).asnumpy()
    np.testing.assert_allclose(out, _reference(cell, x.astype(np.float64), indices, weights), atol=2e-5, rtol=0)


class _SquaredSum(ms.nn.Cell):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def construct(self, x, indices, weights):
        return (self.experts(x, indices, weights) ** 2).sum()


def test_token_dispatch_gradients_equal_the_all_experts_computation():
    rng = np.random.default_rng(2)
    x = Tensor(rng.standard_normal((29, H)).astype(np.float32))
    indices, weights = (Tensor(a) for a in _routing("balanced", 29, rng))
    results = []
    for dispatch in (True, False):
        cell = _experts(3)
        cell.token_dispatch = dispatch
        net = _SquaredSum(cell)
        grad = ops.GradOperation(get_all=True, get_by_list=True)(net, ms.ParameterTuple(net.trainable_params()))
        inputs, weight_grads = grad(x, indices, weights)
        results.append([g.asnumpy() for g in (inputs[0], inputs[2], *weight_grads)])
    for dispatched, dense in zip(*results):
        np.testing.assert_allclose(dispatched, dense, atol=1e-4, rtol=1e-5)
