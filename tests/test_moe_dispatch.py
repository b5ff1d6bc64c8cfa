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


def _capacity_reference(cell, x, indices, weights, factor):
    """Upstream MindFormers' capacity rule written out: each expert takes at most
    ceil(factor * n * k / E) assignments (capped at n), first choices of all tokens before second
    choices, each in token order; the others are dropped. -> (output, dropped, kept routing weights)."""
    n, k = indices.shape
    cap = min(n, int(np.ceil(factor * n * k / E)))
    taken = np.zeros(E, int)
    kept = np.zeros_like(weights)
    for j in range(k):
        for t in range(n):
            e = indices[t, j]
            if taken[e] < cap:
                taken[e] += 1
                kept[t, j] = weights[t, j]
    dropped = int((kept == 0).sum() - (weights == 0).sum())
    return _reference(cell, x.astype(np.float64), indices, kept), dropped, kept


def _counter(cell):
    from mindformers_ext.counters import COUNTERS
    value = COUNTERS[cell.dropped_key].asnumpy().copy()
    COUNTERS[cell.dropped_key].set_data(Tensor(np.zeros_like(value)))
    return value


# Expert 0 is the second choice of tokens 0-2 and the first choice of tokens 5-7, with room for 3 (factor 1,
# 8 tokens, top-3 of 8 experts): upstream's rule keeps the first choices, token order would keep tokens 0-2.
PRIORITY = [[1, 0, 7], [2, 0, 7], [3, 0, 7], [4, 5, 6], [5, 6, 4], [0, 1, 2], [0, 2, 3], [0, 3, 1]]


@pytest.mark.parametrize("kind, n", [("skewed", 20), ("one_expert", 20), ("priority", 8)])
def test_capacity_factor_drops_what_upstream_drops_in_training_only(kind, n):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, H)).astype(np.float32)
    if kind == "priority":
        indices, weights = np.array(PRIORITY, np.int32), rng.random((n, K)).astype(np.float32) + 0.1
    else:
        indices, weights = _routing(kind, n, rng)
    cell = _experts()
    cell.capacity_factor = factor = 1.0
    cell.dropped_key = _new_counter()
    expected, dropped, _ = _capacity_reference(cell, x, indices, weights, factor)
    assert dropped > 0
    cell.set_train(True)
    out = cell(Tensor(x), Tensor(indices), Tensor(weights)).asnumpy()
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(_counter(cell), [dropped, indices.size])
    # inference never drops: the exact dispatch, whatever the factor
    cell.set_train(False)
    out = cell(Tensor(x), Tensor(indices), Tensor(weights)).asnumpy()
    np.testing.assert_allclose(out, _reference(cell, x.astype(np.float64), indices, weights), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(_counter(cell), [0, 0])


def _new_counter():
    from mindformers_ext.counters import MOE_DROPPED, new_counter
    return new_counter(MOE_DROPPED, 2)


def test_a_capacity_factor_that_would_compute_more_rows_runs_the_exact_dispatch():
    """Factor 3 would pad every expert to 3x its fair share, more rows than the exact dispatch: no drop."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, H)).astype(np.float32)
    indices, weights = _routing("skewed", 20, rng)
    cell = _experts()
    cell.capacity_factor, cell.dropped_key = 3.0, _new_counter()
    cell.set_train(True)
    out = cell(Tensor(x), Tensor(indices), Tensor(weights)).asnumpy()
    np.testing.assert_allclose(out, _reference(cell, x.astype(np.float64), indices, weights), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(_counter(cell), [0, 0])


def test_capacity_limited_gradients_equal_the_all_experts_computation_without_the_dropped():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((24, H)).astype(np.float32)
    indices, weights = _routing("skewed", 24, rng)
    indices[::3] = [1, 0, 6]  # a third of the tokens elsewhere: some kept by each expert, most dropped
    limited = _experts(3)
    limited.capacity_factor, limited.dropped_key = 1.0, _new_counter()
    kept = _capacity_reference(limited, x, indices, weights, 1.0)[2]
    results = []
    for cell, routing in ((limited, weights), (_experts(3), kept)):
        if cell is not limited:
            cell.token_dispatch = False
        net = _SquaredSum(cell)
        net.set_train(True)
        grad = ops.GradOperation(get_all=True, get_by_list=True)(net, ms.ParameterTuple(net.trainable_params()))
        inputs, weight_grads = grad(Tensor(x), Tensor(indices), Tensor(routing))
        results.append([g.asnumpy() for g in (inputs[0], *weight_grads)]
                       + [np.where(kept != 0, inputs[2].asnumpy(), 0)])
    for limited_grad, dense in zip(*results):
        np.testing.assert_allclose(limited_grad, dense, atol=1e-4, rtol=1e-5)
