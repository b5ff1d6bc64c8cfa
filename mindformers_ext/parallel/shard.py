"""Shard strategies that remember what they split, so a config can be checked without running it.

Every layer sets the strategies of its primitives through :meth:`ShardedCell.shard_op`, which calls
``primitive.shard(strategy)`` (what MindSpore's semi-auto-parallel mode reads on Ascend; ignored in
single-device runs) and records a :class:`ShardSpec` with the symbolic input shapes. Shapes use
the strings ``"B"`` (global batch) and ``"S"`` (sequence length) for the run-time dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from mindspore import nn

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
    def get(name: str, default: int = 1) -> int:
        if isinstance(parallel_config, dict):
            return int(parallel_config.get(name, default) or default)
        return int(getattr(parallel_config, name, default) or default)
    return get("data_parallel"), get("model_parallel"), get("pipeline_stage"), get("expert_parallel")


def vocab_emb_dp(parallel_config: Any) -> bool:
    """Whether the embedding table is replicated (True) or split over model parallel (False)."""
    if isinstance(parallel_config, dict):
        return bool(parallel_config.get("vocab_emb_dp", True))
    return bool(getattr(parallel_config, "vocab_emb_dp", True))


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
    """``config.num_layers`` decoder layers ``layer_class(config, layer_id)``, sharded with ``shard_args`` and,
    when ``stages > 1``, assigned their pipeline stage (``config.offset`` as MindFormers)."""
    layers = nn.CellList()
    for layer_id in range(config.num_layers):
        layer = layer_class(config, layer_id)
        layer.shard(*shard_args)
        if stages > 1:
            layer.pipeline_stage = pipeline_stage_of(layer_id, config.num_layers, stages, config.offset)
        layers.append(layer)
    return layers


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
