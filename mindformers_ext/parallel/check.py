"""Static check of a model's semi-auto-parallel layout against the device mesh, without running it.

Semi-auto-parallel only compiles on Ascend, so on CPU we verify what its compiler would verify
first: dp x mp x pp equals the device count, every shard strategy divides the dimension it splits,
each input's splits fit into one stage's devices, the two sides of a contraction are split alike,
and the pipeline has layers for every stage. Problems are reported with the layer and dimension.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from mindspore import nn

from mindformers_ext.parallel.shard import ShardedCell, parallel_sizes


class ParallelCheckError(ValueError):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("parallel layout check failed:\n  " + "\n  ".join(problems))
        self.problems = problems


def _evaluate(dim: Any, batch: int, seq: int) -> int:
    if isinstance(dim, int):
        return dim
    return int(eval(str(dim), {"__builtins__": {}}, {"B": batch, "S": seq, "T": seq}))  # noqa: S307


def check_parallel(model: nn.Cell, device_num: int, batch_size: Optional[int] = None,
                   seq_length: Optional[int] = None, micro_batch_num: Optional[int] = None) -> list[str]:
    """Check ``model``'s recorded strategies for ``device_num`` devices; raise on any problem.

    ``batch_size`` is the per-data-parallel-rank batch (default: the config's ``batch_size``),
    ``seq_length`` defaults to the config's. Returns a summary (one line per checked item kind).
    """
    config = model.config
    dp, mp, pp, ep = parallel_sizes(config.parallel_config)
    problems: list[str] = []
    if dp * mp * pp != device_num:
        problems.append(f"data_parallel ({dp}) x model_parallel ({mp}) x pipeline_stage ({pp}) = {dp * mp * pp}, "
                        f"but the job has {device_num} devices")
    if ep > 1 and (dp * mp) % ep:
        problems.append(f"expert_parallel ({ep}) must divide data_parallel x model_parallel ({dp * mp})")
    num_layers = getattr(config, "num_layers", None)
    if pp > 1:
        if num_layers is not None and pp > num_layers:
            problems.append(f"pipeline_stage ({pp}) exceeds num_layers ({num_layers}): some stages get no layer")
        micro = micro_batch_num or getattr(config.parallel_config, "micro_batch_num", 1)
        if micro < pp:
            problems.append(f"micro_batch_num ({micro}) must be >= pipeline_stage ({pp})")
        stages = {getattr(cell, "pipeline_stage", 0) for _, cell in model.cells_and_names()
                  if type(cell).__name__.endswith("DecoderLayer")}
        missing = sorted(set(range(pp)) - stages)
        if missing:
            problems.append(f"pipeline stages {missing} hold no decoder layer (check `offset`)")
    batch = (batch_size or getattr(config, "batch_size", 1) or 1) * dp
    seq = seq_length or getattr(config, "seq_length", 1)
    stage_devices = dp * mp
    checked = 0
    for path, cell in model.cells_and_names():
        if not isinstance(cell, ShardedCell):
            continue
        for spec in cell.shard_specs:
            where = f"{path or type(model).__name__}.{spec.op}"
            checked += 1
            for i, (strategy, shape) in enumerate(zip(spec.strategy, spec.shapes)):
                splits = math.prod(strategy) if strategy else 1
                if stage_devices % splits:
                    problems.append(f"{where}: input {i} strategy {strategy} uses {splits} devices, which does not "
                                    f"divide the {stage_devices} devices of a pipeline stage")
                for axis, (split, dim) in enumerate(zip(strategy, shape)):
                    size = _evaluate(dim, batch, seq)
                    if split > 1 and size % split:
                        problems.append(f"{where}: input {i} dimension {axis} ({dim} = {size}) is not divisible by "
                                        f"its split {split}")
            for (ia, da), (ib, db) in spec.tied:
                if spec.strategy[ia][da] != spec.strategy[ib][db]:
                    problems.append(f"{where}: contraction dimension split differently "
                                    f"({spec.strategy[ia][da]} vs {spec.strategy[ib][db]})")
    if not checked:
        problems.append(f"no shard strategy was checked: {type(model).__name__} records none (only this project's "
                        "models record their strategies; a model of another package cannot be checked here)")
    if problems:
        raise ParallelCheckError(problems)
    return [f"dp={dp} mp={mp} pp={pp} ep={ep} on {device_num} devices",
            f"{checked} shard strategies divide their dimensions (batch {batch}, seq {seq})"]


def build_skeleton(model_class: type, config: Any) -> nn.Cell:
    """The model's cells and strategies without allocating its weights (any size fits in memory)."""
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        return model_class(config)
