"""Shard strategies that remember what they split, so a config can be checked without running it.

Every layer sets the strategies of its primitives through :meth:`ShardedCell.shard_op`, which calls
``primitive.shard(strategy)`` (what MindSpore's semi-auto-parallel mode reads on Ascend; ignored in
single-device runs) and records a :class:`ShardSpec` with the symbolic input shapes. Shapes use
the strings ``"B"`` (global batch) and ``"S"`` (sequence length) for the run-time dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Union

import mindspore as ms
from mindspore import nn

from mindformers.tools.logger import logger

Dim = Union[int, str]


@dataclass(frozen=True)
class ShardSpec:
    """One primitive's strategy and the (symbolic) shapes of the inputs it splits."""
    op: str
    strategy: tuple
    shapes: tuple
    # pairs ((input_a, dim_a), (input_b, dim_b)) whose splits must agree, e.g. a MatMul's contraction.
    tied: tuple = ()


def parallel_sizes(parallel_config: Any) -> tuple[int, int, int, int]:
    """(data_parallel, model_parallel, pipeline_stage, expert_parallel) of a MindFormers parallel config."""
    def get(name: str) -> int:
        return int(_setting(parallel_config, name, 1) or 1)
    return get("data_parallel"), get("model_parallel"), get("pipeline_stage"), get("expert_parallel")


def vocab_emb_dp(parallel_config: Any) -> bool:
    """Whether the embedding table is replicated (True) or split over model parallel (False)."""
    return bool(_setting(parallel_config, "vocab_emb_dp", True))


def pipeline_stage_of(layer_id: int, num_layers: int, stages: int, offset: Union[int, Sequence[int]] = 0) -> int:
    """Pipeline stage of decoder layer ``layer_id`` (MindFormers' rule: even split, then ``offset``)."""
    if stages <= 1:
        return 0
    per_stage = num_layers // stages
    if isinstance(offset, (list, tuple)):
        if len(offset) != stages:
            raise ValueError(f"offset has {len(offset)} entries, expected one per pipeline stage ({stages})")
        bounds, start = [], 0
        for stage, extra in enumerate(offset):
            start += per_stage + int(extra)
            bounds.append(start)
        for stage, end in enumerate(bounds):
            if layer_id < end:
                return stage
        return stages - 1
    stage = (layer_id + int(offset)) // max(per_stage, 1)
    return min(max(stage, 0), stages - 1)


def pipeline_layers(layer_class: Callable[..., nn.Cell], config: Any, shard_args: tuple, stages: int) -> nn.CellList:
    """``config.num_layers`` decoder layers ``layer_class(config, layer_id)``, sharded with ``shard_args``, with
    what MindFormers' ``LayerSetting`` gives its own layers: their pipeline stage when ``stages > 1``
    (``config.offset`` as MindFormers), their gradient all-reduce fusion group and ``recompute_config``."""
    _check_unsplit_sequence(config.parallel_config)
    layers = nn.CellList()
    span = max((config.num_layers + 1) // max(_aggregation_group(config.parallel_config), 1), 1)
    first_offset = config.offset[0] if isinstance(config.offset, (list, tuple)) else config.offset
    for layer_id in range(config.num_layers):
        layer = layer_class(config, layer_id)
        layer.shard(*shard_args)
        if stages > 1:
            layer.pipeline_stage = pipeline_stage_of(layer_id, config.num_layers, stages, config.offset)
        # ``gradient_aggregation_group`` runs of consecutive layers; a single group under pipeline parallelism
        layer.set_comm_fusion(_PIPELINE_FUSION_GROUP if stages > 1 else (layer_id + int(first_offset)) // span + 1)
        layers.append(layer)
    recompute_layers(layers, config, stages)
    return layers


def fuse_outer_gradients(config: Any, stages: int, *cells: nn.Cell) -> None:
    """The embeddings' and final norm's gradient all-reduce fusion group, as MindFormers' models set it."""
    group = _PIPELINE_FUSION_GROUP if stages > 1 else _aggregation_group(config.parallel_config)
    for cell in cells:
        cell.set_comm_fusion(group)


# MindFormers' models put every gradient into this one all-reduce fusion group under pipeline parallelism.
_PIPELINE_FUSION_GROUP = 2


def _aggregation_group(parallel_config: Any) -> int:
    """``parallel_config.gradient_aggregation_group`` (MindFormers' default: 4)."""
    return int(_setting(parallel_config, "gradient_aggregation_group", 4))


def _setting(parallel_config: Any, name: str, default: Any) -> Any:
    if isinstance(parallel_config, dict):
        return parallel_config.get(name, default)
    return getattr(parallel_config, name, default)


def _check_unsplit_sequence(parallel_config: Any) -> None:
    """Refuse context parallelism and say that sequence parallelism is not applied: our layers keep each
    sequence whole on a device."""
    context = int(_setting(parallel_config, "context_parallel", 1) or 1)
    if context > 1:
        raise ValueError(f"parallel_config.context_parallel: {context} is not supported: our attention keeps each "
                         "sequence whole on one device (no split of the sequence across devices); set it to 1 "
                         "and use data / model / pipeline parallel")
    if _setting(parallel_config, "use_seq_parallel", False):
        logger.warning("parallel_config.use_seq_parallel: True is not applied: our layers keep the activations "
                       "between the model-parallel matmuls (norms, residual adds) whole on every model-parallel "
                       "device, as with use_seq_parallel: False (same results, more activation memory per device)")


_RECOMPUTE_PATTERNS = ("select_comm_recompute", "select_recompute_exclude", "select_comm_recompute_exclude")
# The numbers: bench/models.py's llama-150m trained with PortableAdamW on 2 threads, every layer recomputed.
_RECOMPUTE_ON_CPU = ("recompute_config: {what} is not applied on CPU: it trades compute for device memory on "
                     "Ascend, but MindSpore's CPU runtime keeps activations anyway, so recomputing raised peak "
                     "memory and step time here (llama-150m, 2 x 512 tokens: 9.4 -> 11.1 GB, 3.3 -> 4.0 s per step); "
                     "the layers run without it")


def recompute_layers(layers: Sequence[nn.Cell], config: Any, stages: int = 1,
                     device_target: Optional[str] = None) -> tuple[list, list]:
    """Upstream MindFormers' ``recompute_config`` (carried as ``parallel_config.recompute``) on our decoder
    layers, as MindFormers' ``LayerSetting`` applies it to its own models.

    ``recompute``: True recomputes every layer in the backward pass (only the layer inputs are kept); a
    list gives, per pipeline stage, how many of its first layers are. ``select_recompute`` (True or such a
    list) recomputes, in the layers not recomputed whole, the attention core (scores, softmax, weighted
    sum: the activations that grow with the sequence length squared). MindFormers' op-name patterns name
    the operators of MindFormers' own layers: refused in ``select_recompute``, reported as not applied in
    ``select_comm_recompute`` and the ``*_exclude`` settings. ``mp_comm_recompute`` and
    ``recompute_slice_activation`` go to ``Cell.recompute``. On CPU (``device_target``, default the
    context's) nothing is recomputed and a warning says why. Returns, per pipeline stage, how many layers
    are (or off CPU would be) recomputed whole and by their attention core.
    """
    settings = getattr(config.parallel_config, "recompute", None)
    if settings is None:
        return [0] * max(stages, 1), [0] * max(stages, 1)
    if isinstance(settings, dict):
        settings = SimpleNamespace(**settings)
    per_stage = [0] * max(stages, 1)
    stage_of = [pipeline_stage_of(i, len(layers), stages, config.offset) for i in range(len(layers))]
    for stage in stage_of:
        per_stage[stage] += 1
    for key in _RECOMPUTE_PATTERNS:  # MindFormers' op-name pattern settings, besides select_recompute
        if getattr(settings, key, None):
            logger.warning(f"recompute_config.{key}: {getattr(settings, key)!r} is not applied: it selects "
                           "operators of MindFormers' own layers by name; here recompute_config.recompute (whole "
                           "layers) and select_recompute (attention cores) choose what is recomputed")
    whole = _recompute_counts(getattr(settings, "recompute", False), "recompute", per_stage)
    select = _recompute_counts(getattr(settings, "select_recompute", False), "select_recompute", per_stage)
    attention = [max(s - w, 0) for w, s in zip(whole, select)]  # select applies to the layers not recomputed whole
    if not any(whole) and not any(select):
        return whole, attention
    if (device_target or ms.get_context("device_target")) == "CPU":
        what = " and ".join(f"{key}: {value!r}" for key, value in (
            ("recompute", getattr(settings, "recompute", False)),
            ("select_recompute", getattr(settings, "select_recompute", False))) if value)
        logger.warning(_RECOMPUTE_ON_CPU.format(what=what))
        return whole, attention
    options = {key: bool(getattr(settings, key)) for key in ("mp_comm_recompute", "recompute_slice_activation")
               if hasattr(settings, key)}
    position = [0] * len(per_stage)
    for layer, stage in zip(layers, stage_of):
        if position[stage] < whole[stage]:
            layer.recompute(**options)
        elif position[stage] < select[stage]:
            layer.attention.core.recompute(**options)
        position[stage] += 1
    return whole, attention


def _recompute_counts(value: Any, key: str, per_stage: Sequence[int]) -> list:
    """Layers to recompute in each pipeline stage, from a ``recompute_config`` value (bool or per-stage counts)."""
    if value is None or isinstance(value, bool):
        return [count if value else 0 for count in per_stage]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                for v in value):
        if len(value) != len(per_stage):
            raise ValueError(f"recompute_config.{key}: {list(value)} has {len(value)} layer counts, expected one per "
                             f"pipeline stage ({len(per_stage)})")
        return [min(v, count) for v, count in zip(value, per_stage)]
    raise ValueError(f"recompute_config.{key}: {value!r} is not supported: give True / False or one layer count "
                     "per pipeline stage (op-name patterns name the operators of MindFormers' own layers; "
                     "select_recompute here covers each layer's attention core)")


def pin_stages(stages: int, first: Sequence[nn.Cell] = (), last: Sequence[nn.Cell] = ()) -> None:
    """With pipeline parallelism (``stages > 1``): ``first`` run on stage 0 (embeddings), ``last`` on the
    last stage (final norm, LM head)."""
    if stages > 1:
        for cell in first:
            cell.pipeline_stage = 0
        for cell in last:
            cell.pipeline_stage = stages - 1


class ShardedCell(nn.Cell):
    """A Cell whose primitives' shard strategies are recorded for the static parallel check."""

    def __init__(self) -> None:
        super().__init__()
        self.shard_specs: list[ShardSpec] = []

    def shard_op(self, name: str, primitive: Any, strategy: tuple, shapes: Sequence[Sequence[Dim]],
                 tied: tuple = ()) -> Any:
        """Set ``primitive``'s strategy and record it against the symbolic ``shapes`` of its inputs."""
        if len(strategy) != len(shapes):
            raise ValueError(f"{type(self).__name__}.{name}: {len(strategy)} strategies for {len(shapes)} inputs")
        for s, shape in zip(strategy, shapes):
            if len(s) != len(shape):
                raise ValueError(f"{type(self).__name__}.{name}: strategy {s} does not match rank of shape {shape}")
        primitive.shard(strategy)
        self.shard_specs.append(ShardSpec(name, tuple(map(tuple, strategy)), tuple(map(tuple, shapes)), tied))
        return primitive
