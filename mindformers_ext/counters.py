"""Counters that a compiled graph adds to and a training callback reads, e.g. the token-expert
assignments a capacity-limited MoE drops.

A counter is an int64 :class:`Parameter` kept here, outside every cell: a graph updates it with
``ops.assign_add(COUNTERS[key], ...)`` (a free variable of the graph), and since no cell owns it no
checkpoint holds it, the converter never sees it and loading a checkpoint never misses it.
"""
from __future__ import annotations

import itertools

import numpy as np
from mindspore import Parameter, Tensor

COUNTERS: dict = {}  # key -> Parameter
# (dropped, routed) token-expert assignments of a capacity-limited MoE layer in training
MOE_DROPPED = "moe_dropped_assignments"
_IDS = itertools.count()


def new_counter(kind: str, size: int) -> str:
    """A fresh zero counter of ``size`` int64 values; returns its key, ``"<kind>.<n>"``."""
    key = f"{kind}.{next(_IDS)}"
    COUNTERS[key] = Parameter(Tensor(np.zeros(size, np.int64)), name=key, requires_grad=False)
    return key


def take(kind: str) -> np.ndarray:
    """The sum of every ``kind`` counter since the last ``take`` (zeros if there is none); resets them."""
    total = None
    for key, counter in COUNTERS.items():
        if key.rsplit(".", 1)[0] != kind:
            continue
        value = counter.asnumpy().copy()
        total = value if total is None else total + value
        counter.set_data(Tensor(np.zeros_like(value)))
    return np.zeros(0, np.int64) if total is None else total
