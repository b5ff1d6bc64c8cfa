"""Feed-forward blocks: SwiGLU (Llama / DeepSeek) and GELU (GPT-BigCode)."""
from __future__ import annotations

from mindspore import ops

from mindformers_ext.layers.linear import FusedLinear, Linear
from mindformers_ext.parallel.shard import ShardedCell


class SwiGLU(ShardedCell):
    """``w2(silu(w1 x) * w3 x)`` with MindFormers' names (w1 = gate, w2 = down, w3 = up)."""

    def __init__(self, hidden_size: int, intermediate_size: int, has_bias: bool = False,
                 compute_dtype: str = "float32", param_init_type: str = "float32", init_std: float = 0.02,
                 concat: bool = False) -> None:
        super().__init__()
        linear = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        self.intermediate_size = intermediate_size
        self.concat = concat
        if concat:  # upstream's ffn concat: gate and up in one matmul, their rows interleaved
            self.w_gate_hidden = FusedLinear(hidden_size, (("w1", intermediate_size), ("w3", intermediate_size)),
                                             intermediate_size, has_bias, **linear)
            self.split = ops.Split(3, 2)
            self.reshape = ops.Reshape()
        else:
            self.w1 = Linear(hidden_size, intermediate_size, has_bias, **linear)
            self.w3 = Linear(hidden_size, intermediate_size, has_bias, **linear)
        self.w2 = Linear(intermediate_size, hidden_size, has_bias, **linear)
        self.sigmoid = ops.Sigmoid()
        self.mul_gate = ops.Mul()
        self.mul = ops.Mul()

    def shard(self, dp: int, mp: int) -> None:
        """Intermediate features split over model parallel."""
        if self.concat:
            self.w_gate_hidden.shard_column(dp, mp)
            self.shard_op("split", self.split, ((dp, 1, mp, 1),), (("B", "S", self.intermediate_size, 2),))
        else:
            self.w1.shard_column(dp, mp)
            self.w3.shard_column(dp, mp)
        self.w2.shard_row(dp, mp)
        act = ("B", "S", self.intermediate_size)
        self.shard_op("sigmoid", self.sigmoid, ((dp, 1, mp),), (act,))
        self.shard_op("mul_gate", self.mul_gate, ((dp, 1, mp), (dp, 1, mp)), (act, act))
        self.shard_op("mul", self.mul, ((dp, 1, mp), (dp, 1, mp)), (act, act))

    def construct(self, x):
        if self.concat:
            bs, seq, _ = x.shape
            shape = (bs, seq, self.intermediate_size)
            gate, up = self.split(self.reshape(self.w_gate_hidden(x), shape + (2,)))
            gate, up = self.reshape(gate, shape), self.reshape(up, shape)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(self.mul(self.mul_gate(gate, self.sigmoid(gate)), up))


class GeluMLP(ShardedCell):
    """``c_proj(gelu(c_fc x))``; ``approximate`` is 'none' (exact erf GELU) or 'tanh'."""

    def __init__(self, hidden_size: int, intermediate_size: int, approximate: str = "none",
                 has_bias: bool = True, compute_dtype: str = "float32", param_init_type: str = "float32",
                 init_std: float = 0.02) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        linear = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        self.intermediate_size = intermediate_size
        self.c_fc = Linear(hidden_size, intermediate_size, has_bias, **linear)
        self.c_proj = Linear(intermediate_size, hidden_size, has_bias, **linear)
        self.gelu = ops.GeLU() if approximate == "tanh" else None
        self.approximate = approximate

    def shard(self, dp: int, mp: int) -> None:
        """Intermediate features split over model parallel."""
        self.c_fc.shard_column(dp, mp)
        self.c_proj.shard_row(dp, mp)
        if self.gelu is not None:
            self.shard_op("gelu", self.gelu, ((dp, 1, mp),), (("B", "S", self.intermediate_size),))

    def construct(self, x):
        h = self.c_fc(x)
        h = self.gelu(h) if self.gelu is not None else ops.gelu(h, approximate="none")
        return self.c_proj(h)
