"""The compiled graphs behind ``generate``: whole-sequence logits, and a cached step (prefill / decode).

By default each is compiled once with dynamic batch / length dimensions (``set_inputs``), so prompts
of any length and any number of new tokens reuse one graph instead of recompiling per shape. The
cached steps can instead be static (one graph per input shape, faster per call): generate's
``cache_implementation="static"`` and the serving engine's bucketed decode batches use that.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn

from mindformers_ext.cache import CacheSpec


def _dyn(rank: int, dtype) -> Tensor:
    return Tensor(shape=[None] * rank, dtype=dtype)


def cached_step_inputs(spec: CacheSpec, cache_dtype) -> list:
    """Dynamic input signature of :class:`CachedStep`: ids, positions, mask, slot, then the cache."""
    return ([_dyn(2, ms.int32), _dyn(2, ms.int32), _dyn(4, ms.float32), _dyn(1, ms.int32)]
            + [_dyn(4, dtype) for _, dtype in spec.shapes(None, None, cache_dtype)])


class LastLogitsStep(nn.Cell):
    """No cache: run the whole (left-padded) sequence, return logits of the last position."""

    def __init__(self, lm: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.lm = lm
        self.set_inputs(_dyn(2, ms.int32), _dyn(2, ms.int32), _dyn(4, ms.float32))

    def construct(self, input_ids, position_ids, mask):
        hidden, _, _ = self.lm.model(input_ids, position_ids, mask)
        return self.lm.logits(hidden[:, -1:, :])


class CachedStep(nn.Cell):
    """New tokens written into the cache at ``slot``; returns last-position logits and the updated cache.

    Inputs: input_ids (B, S), position_ids (B, S), mask, slot (B,), then the ``spec.num_tensors``
    cache tensors of :class:`mindformers_ext.cache.KVCache`. ``decode=False`` is the prefill (the
    prompt into an empty cache, mask (B, 1, S, S)); ``decode=True`` attends over the whole cache
    (mask (B, 1, S, capacity)). ``dynamic=False``: one static graph per input shape (see
    :class:`PagedStep`).
    """

    def __init__(self, lm: nn.Cell, spec: CacheSpec, cache_dtype, decode: bool, dynamic: bool = True) -> None:
        super().__init__(auto_prefix=False)
        self.lm = lm
        self.decode = decode
        if dynamic:
            self.set_inputs(*cached_step_inputs(spec, cache_dtype))

    def construct(self, input_ids, position_ids, mask, slot, *cache):
        hidden, cache, _ = self.lm.model(input_ids, position_ids, mask, cache, slot, self.decode)
        return (self.lm.logits(hidden[:, -1:, :]),) + cache


class PagedStep(nn.Cell):
    """:class:`CachedStep` over a :class:`mindformers_ext.cache.PagedKVCache` pool.

    Inputs: input_ids (B, S), position_ids (B, S), mask, positions (B, S) (the pool rows the new
    tokens are written to), table (B, L) (the pool rows of each row's tokens, read in decode),
    then the pool Parameters, which the step updates in place. Returns the last-position logits.

    ``dynamic=False`` compiles one graph per input shape instead of one dynamic-shape graph: on CPU a
    static graph runs a decode step in about 60 % of the time (no per-kernel shape inference), so the
    serving engine pads its decode batches to a few bucketed shapes and compiles each once.
    """

    def __init__(self, lm: nn.Cell, pool: tuple, decode: bool, dynamic: bool = True) -> None:
        super().__init__(auto_prefix=False)
        self.lm = lm
        self.decode = decode
        if dynamic:  # the pool's shape is fixed: only the step's tensors vary
            self.set_inputs(_dyn(2, ms.int32), _dyn(2, ms.int32), _dyn(4, ms.float32), _dyn(2, ms.int32),
                            _dyn(2, ms.int32), *pool)

    def construct(self, input_ids, position_ids, mask, positions, table, *cache):
        hidden, _, _ = self.lm.model(input_ids, position_ids, mask, cache, (positions, table), self.decode)
        return self.lm.logits(hidden[:, -1:, :])
