"""Dense projection with an HF-shaped weight ([out, in]) and column / row parallel strategies."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ops
from mindspore.common.initializer import Normal, Zero, initializer
from mindspore.ops.auto_generate import WeightQuantBatchMatmul

from mindformers_ext.convert.weight_map import grouped_rows
from mindformers_ext.parallel.shard import ShardedCell


def ms_dtype(name: str) -> ms.dtype:
    """MindSpore dtype for 'float32' / 'float16' / 'bfloat16'."""
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


class Linear(ShardedCell):
    """``y = x @ W^T + b`` over the last axis of a (batch, seq, in) input.

    The weight keeps HF's [out_features, in_features] layout so checkpoints map one to one. After
    :meth:`quantize_w8a16` the weight is int8 with one float scale per output feature
    (``weight_scale``) and ``y = (x @ q^T) * scale + b``, the same as ``x @ (q * scale)^T``; with
    ``fused_quant_matmul`` (Ascend) one ``WeightQuantBatchMatmul`` computes ``x @ (q * scale)^T`` on
    the same two parameters (:meth:`fused_matmul_args`).
    """

    W8A16_WEIGHTS = ("weight",)  # what quantize_w8a16 turns into int8 (+ "<name>_scale")

    def __init__(self, in_features: int, out_features: int, has_bias: bool = False,
                 compute_dtype: str = "float32", param_init_type: str = "float32", init_std: float = 0.02) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = has_bias
        self.compute_dtype = ms_dtype(compute_dtype)
        dtype = ms_dtype(param_init_type)
        self.weight = Parameter(initializer(Normal(sigma=init_std), [out_features, in_features], dtype), name="weight")
        if has_bias:
            self.bias = Parameter(initializer(Zero(), [out_features], dtype), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.quantized = False
        self.fused_quant_matmul = False

    def quantize_w8a16(self, from_weights: bool = True, fused_quant_matmul: Optional[bool] = None) -> None:
        """Replace the float weight by int8 with symmetric per-output-feature scales (weight-only);
        ``from_weights=False``: int8 zeros and unit scales, a layout to load an int8 checkpoint into.

        ``fused_quant_matmul``: run Ascend's fused ``WeightQuantBatchMatmul`` instead of the portable
        int8 matmul + scale multiply; None = on exactly on Ascend with a float16 / bfloat16 compute
        dtype, True elsewhere raises (:func:`mindformers_ext.quant.use_fused_quant_matmul`)."""
        # pylint: disable=import-outside-toplevel
        from mindformers_ext.quant import int8_parameters, use_fused_quant_matmul

        fused = use_fused_quant_matmul(fused_quant_matmul, self.compute_dtype)
        self.weight, self.weight_scale = int8_parameters(self.weight, from_weights)
        self.quantized = True
        if fused:
            # our [out, in] weight is the kernel's (k, n) weight transposed; per-channel scales: no groups
            self.fused_matmul = WeightQuantBatchMatmul(transpose_x=False, transpose_weight=True,
                                                       antiquant_group_size=0)
            for strategy in [spec.strategy for spec in self.shard_specs if spec.op == "matmul"]:
                self._shard_fused_matmul(strategy)  # already sharded: the kernel takes the same split
        self.fused_quant_matmul = fused

    def fused_matmul_args(self, x) -> tuple:
        """The inputs of ``WeightQuantBatchMatmul(x, weight, antiquant_scale, antiquant_offset, quant_scale,
        quant_offset, bias)`` for a (batch, seq, in) ``x``: x as (batch * seq, in) in the compute dtype,
        the int8 weight as stored ([out, in]: the kernel's (k, n) with ``transpose_weight``), the
        per-output-feature scale (out,) in x's dtype (the kernel's rule), no offset (symmetric), no
        output quantization and no bias (added afterwards, as on the portable path)."""
        return (self.reshape(self.cast(x, self.compute_dtype), (-1, self.in_features)), self.weight,
                self.cast(self.weight_scale, self.compute_dtype), None, None, None, None)

    def _shard_matmul(self, strategy: tuple) -> None:
        """``strategy`` ((x), (weight)) for the matmul, and the fused kernel when it runs."""
        self.shard_op("matmul", self.matmul, strategy,
                      (("B*S", self.in_features), (self.out_features, self.in_features)), tied=(((0, 1), (1, 1)),))
        if self.fused_quant_matmul:
            self._shard_fused_matmul(strategy)

    def _shard_fused_matmul(self, strategy: tuple) -> None:
        """The matmul's ``strategy`` for WeightQuantBatchMatmul, its scale (out,) split as the weight's out axis."""
        act, weight = strategy
        self.shard_op("fused_matmul", self.fused_matmul, (act, weight, (weight[0],)),
                      (("B*S", self.in_features), (self.out_features, self.in_features), (self.out_features,)),
                      tied=(((0, 1), (1, 1)),))

    def shard_column(self, dp: int, mp: int) -> None:
        """Split the output features over model parallel (q/k/v, gate/up, LM head)."""
        self._shard_matmul(((dp, 1), (mp, 1)))
        if self.has_bias:
            self.shard_op("bias_add", self.bias_add, ((dp, mp), (mp,)),
                          (("B*S", self.out_features), (self.out_features,)))

    def shard_row(self, dp: int, mp: int) -> None:
        """Split the input features over model parallel (attention output, down projection)."""
        self._shard_matmul(((dp, mp), (1, mp)))
        if self.has_bias:
            self.shard_op("bias_add", self.bias_add, ((dp, 1), (1,)),
                          (("B*S", self.out_features), (self.out_features,)))

    def float_weight(self, dtype):
        """The weight as ``dtype`` (dequantised, q * scale, after :meth:`quantize_w8a16`)."""
        weight = self.cast(self.weight, dtype)
        if self.quantized:
            weight = weight * ops.expand_dims(self.cast(self.weight_scale, dtype), -1)
        return weight

    def construct(self, x):
        bs, seq, _ = x.shape
        if self.fused_quant_matmul:
            out = self.fused_matmul(*self.fused_matmul_args(x))
        else:
            out = self.matmul(self.reshape(self.cast(x, self.compute_dtype), (-1, self.in_features)),
                              self.cast(self.weight, self.compute_dtype))
            if self.quantized:
                out = out * self.cast(self.weight_scale, self.compute_dtype)
        if self.has_bias:
            out = self.bias_add(out, self.cast(self.bias, self.compute_dtype))
        return self.reshape(out, (bs, seq, self.out_features))


class FusedLinear(Linear):
    """Several projections of the same input as one matmul (upstream MindFormers' ``qkv_concat``: ``w_qkv``,
    ``w_gate_hidden``), while checkpoints may keep them apart.

    ``parts`` names the separate projections (sibling cells of this one in checkpoints, e.g. ``("wq", 256),
    ("wk", 64), ("wv", 64)``: name and output rows). Each part's rows are cut into ``groups`` equal groups
    and stored group by group (``[p0 g0, p1 g0, ..., p0 g1, p1 g1, ...]``), upstream v1.5.0's layout: one
    group per key/value head for q/k/v, one row per group for gate/up (interleaved), one group for a plain
    concatenation. Model-parallel shards of whole groups then hold matching rows of every part.
    """

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], groups: int = 1, has_bias: bool = False,
                 **kwargs) -> None:
        parts = tuple((str(name), int(rows)) for name, rows in parts)
        if any(rows % groups for _, rows in parts):
            raise ValueError(f"FusedLinear: the rows of {parts} must be multiples of groups={groups}")
        super().__init__(in_features, sum(rows for _, rows in parts), has_bias, **kwargs)
        self.parts, self.groups = parts, groups

    def fuse(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The fused tensor (weight, bias or scale: rows first) from the parts' tensors, in ``parts`` order."""
        return np.concatenate(arrays, axis=0)[grouped_rows([rows for _, rows in self.parts], self.groups)]
