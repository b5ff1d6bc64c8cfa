"""The compiled graphs behind ``generate``: whole-sequence logits, and a cached step (prefill / decode).

By default each is compiled once with dynamic batch / length dimensions (``set_inputs``), so prompts
of any length and any number of new tokens reuse one graph instead of recompiling per shape. The
cached steps can instead be static (one graph per input shape, faster per call): generate's
``cache_implementation="static"`` and the serving engine's bucketed decode batches use that.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindformers_ext.cache import CacheSpec, can_write_in_place
from mindformers_ext.cpu_kernels import use_cpu_kernels

try:  # MindSpore's graph executor (private): see Step
    from mindspore.graph.api import _cell_graph_executor, _real_phase
except ImportError:  # another MindSpore layout: every call takes Cell.__call__
    _cell_graph_executor = _real_phase = None


def _dyn(rank: int, dtype) -> Tensor:
    return Tensor(shape=[None] * rank, dtype=dtype)


def cached_step_inputs(spec: CacheSpec, cache_dtype) -> list:
    """Dynamic input signature of :class:`CachedStep`: ids, positions, mask, slot, then the cache."""
    return ([_dyn(2, ms.int32), _dyn(2, ms.int32), _dyn(4, ms.float32), _dyn(1, ms.int32)]
            + [_dyn(4, dtype) for _, dtype in spec.shapes(None, None, cache_dtype)])


class Step(nn.Cell):
    """A compiled step that, once its graph exists for an input signature (shapes and dtypes, all inputs
    tensors, graph mode), runs that graph directly on later calls with the same signature.

    ``Cell.__call__`` re-derives the compiled graph's key from the arguments and sets the compile phase on
    every sub-cell, one Python attribute write per cell, on every call: about 1.2 ms on this CPU, a third
    of the demo model's decode step (bench/paged_step.py: 3.7 -> 2.5 ms at batch 1, 6.0 -> 4.7 ms at 16).
    A new signature still goes through ``Cell.__call__``, which compiles it (or finds it compiled) and
    records which graph it is.

    ``cpu_kernels`` (default True): the graphs may use :mod:`mindformers_ext.cpu_kernels` where they run
    (the KV cache written in place, the MoE's expert product); False keeps them to
    stock operators (a portable MindIR export). Applied to the model ``lm`` when a graph is compiled.
    """

    def __init__(self, lm: nn.Cell, cpu_kernels: bool = True) -> None:
        super().__init__(auto_prefix=False)
        self.lm = lm
        self.cpu_kernels = cpu_kernels
        # (phase, shapes and dtypes of the inputs) -> (the compiled graph's phase, the jit config it runs with)
        self._graphs: dict = {}

    def __call__(self, *args):
        key = (self.phase,) + tuple((arg.shape, arg.dtype) if isinstance(arg, Tensor) else None for arg in args)
        graph = self._graphs.get(key)
        if graph is not None:  # what Cell.__call__ does once the graph exists, without the per-call walk
            # pylint: disable=protected-access
            _cell_graph_executor._graph_executor.set_jit_config(graph[1])
            return _cell_graph_executor._exec_pip(self, *args, phase=graph[0])
        self.prepare()
        out = super().__call__(*args)
        if (_real_phase is not None and None not in key[1:] and ms.get_context("mode") == ms.GRAPH_MODE
                and getattr(self, "arguments_key", None)):
            self._graphs[key] = (_real_phase(self.phase, self), self.jit_config_dict or ms.JitConfig().jit_config_dict)
        return out

    def prepare(self) -> None:
        """Runs before ``Cell.__call__`` compiles (or finds) the graph of a new input signature; call it
        before compiling the step another way (``mindspore.export``)."""
        use_cpu_kernels(self.lm, self.cpu_kernels)  # the model is shared: its cells take this step's setting


class LastLogitsStep(Step):
    """No cache: run the whole (left-padded) sequence, return logits of the last position."""

    def __init__(self, lm: nn.Cell) -> None:
        super().__init__(lm)
        self.set_inputs(_dyn(2, ms.int32), _dyn(2, ms.int32), _dyn(4, ms.float32))

    def construct(self, input_ids, position_ids, mask):
        hidden, _, _ = self.lm.model(input_ids, position_ids, mask)
        return self.lm.logits(hidden[:, -1:, :])


class CachedStep(Step):
    """New tokens written into the cache at ``slot``; returns the last-position logits, then the updated
    cache unless it is written in place.

    Inputs: input_ids (B, S), position_ids (B, S), mask, slot (B,), then the ``spec.num_tensors``
    cache tensors of :class:`mindformers_ext.cache.KVCache`. ``decode=False`` is the prefill (the
    prompt into an empty cache, mask (B, 1, S, S)); ``decode=True`` attends over the whole cache
    (mask (B, 1, S, capacity)). ``dynamic=False``: one static graph per input shape (see
    :class:`PagedStep`). With ``cpu_kernels`` where the model's cache writes can run in place
    (:func:`mindformers_ext.cache.can_write_in_place`; ``in_place``) the step writes into the cache
    tensors it is given and returns ``(logits,)``; otherwise ``(logits, *updated cache)``, a new copy of
    every cache tensor (what the MindIR exporter compiles, with ``cpu_kernels=False``).
    """

    def __init__(self, lm: nn.Cell, spec: CacheSpec, cache_dtype, decode: bool, dynamic: bool = True,
                 cpu_kernels: bool = True) -> None:
        super().__init__(lm, cpu_kernels)
        self.decode = decode
        self.in_place = cpu_kernels and can_write_in_place(lm)
        if dynamic:
            self.set_inputs(*cached_step_inputs(spec, cache_dtype))

    def construct(self, input_ids, position_ids, mask, slot, *cache):
        hidden, cache, _ = self.lm.model(input_ids, position_ids, mask, cache, slot, self.decode)
        logits = self.lm.logits(hidden[:, -1:, :])
        if self.in_place:  # the writes stay in the graph (a prefill reads none of them)
            return (ops.depend(logits, cache),)
        return (logits,) + cache


class PagedStep(Step):
    """:class:`CachedStep` over a :class:`mindformers_ext.cache.PagedKVCache` pool.

    Inputs: input_ids (B, S), position_ids (B, S), mask, positions (B, S) (the pool positions the new
    tokens are written to), table (B, L) (the pool positions of each row's tokens, read in decode),
    then the pool Parameters, which the step updates in place. Returns the last-position logits.

    ``dynamic=False`` compiles one graph per input shape instead of one dynamic-shape graph: on CPU a
    static graph runs a decode step in about 60 % of the time (no per-kernel shape inference), so the
    serving engine pads its decode batches to a few bucketed shapes and compiles each once.
    """

    def __init__(self, lm: nn.Cell, pool: tuple, decode: bool, dynamic: bool = True) -> None:
        super().__init__(lm)
        self.decode = decode
        if dynamic:  # the pool's shape is fixed: only the step's tensors vary
            self.set_inputs(_dyn(2, ms.int32), _dyn(2, ms.int32), _dyn(4, ms.float32), _dyn(2, ms.int32),
                            _dyn(2, ms.int32), *pool)

    def construct(self, input_ids, position_ids, mask, positions, table, *cache):
        hidden, _, _ = self.lm.model(input_ids, position_ids, mask, cache, (positions, table), self.decode)
        return self.lm.logits(hidden[:, -1:, :])
