"""The KV cache: one object owns what a model caches, its allocation, the writes and the masks.

A family declares what each decoder layer caches as a :class:`CacheSpec`: one ``(heads, dim)``
entry per tensor, e.g. K and V with ``kv_heads`` heads (Llama, GQA), K and V with one head
(GPT-BigCode's multi-query) or MLA's single latent + rope-key tensor (DeepSeek-V2). Every cache
tensor is (batch, heads, capacity, dim) with the token axis at 2.

* In the graph, each layer receives its own tensors (``spec.layer(cache, i)``) and writes its new
  tokens with :class:`CacheWriter` at one slot per row; prefill writes the prompt into the
  preallocated cache the same way (slot 0), so nothing is padded on the host between graphs.
* On the host, :class:`KVCache` allocates the tensors for a batch and a capacity, keeps which slots
  hold real tokens and builds the additive attention masks of prefill and decode.

The generator (``generation/decoding.py``), the step graphs (``generation/step_cells.py``) and the
MindIR exporter read the layout from the spec only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindformers_ext.cpu_kernels import cache_write_op, dequantize_op

MASK_VALUE = -1e9


@dataclass(frozen=True)
class CacheSpec:
    """What every decoder layer caches: ``tensors`` holds one ``(heads, dim)`` per cached quantity.

    With ``int8`` each quantity is stored as int8 values (B, heads, T, dim) followed by their float32
    scales (B, heads, T, 1), one per token and head (:class:`CachedTensor`).
    """
    tensors: tuple
    num_layers: int
    int8: bool = False

    @property
    def per_layer(self) -> int:
        return len(self.tensors) * (2 if self.int8 else 1)

    @property
    def num_tensors(self) -> int:
        return self.per_layer * self.num_layers

    def shapes(self, batch, capacity, dtype) -> list:
        """(shape, dtype) of every cache tensor, layer by layer (``dtype``: the float cache's)."""
        per_layer = []
        for heads, dim in self.tensors:
            if self.int8:
                per_layer += [((batch, heads, capacity, dim), ms.int8), ((batch, heads, capacity, 1), ms.float32)]
            else:
                per_layer.append(((batch, heads, capacity, dim), dtype))
        return per_layer * self.num_layers

    def layer(self, cache: tuple, i: int) -> tuple:
        """Layer ``i``'s tensors of the flat ``cache`` tuple (or None without a cache)."""
        if cache is None:
            return None
        return cache[i * self.per_layer:(i + 1) * self.per_layer]

    def to_dict(self) -> dict:
        return {"tensors": [list(t) for t in self.tensors], "num_layers": self.num_layers, "int8": self.int8}

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSpec":
        return cls(tuple(tuple(int(v) for v in t) for t in data["tensors"]), int(data["num_layers"]),
                   bool(data.get("int8", False)))


class CacheWriter(nn.Cell):
    """``cache[b, h, slot[b] + j, :] = new[b, h, j, :]`` for the S new tokens of every row; returns the cache
    to read afterwards.

    cache (B, H, T, D), new (B, H, S, D), slot (B,) int32. Shapes may change from call to call, so one
    compiled graph serves every batch size, prompt length and capacity. Two ways to write, chosen when a
    step graph is compiled (:func:`mindformers_ext.cpu_kernels.use_cpu_kernels`):

    * functional (``TensorScatterUpdate``, the default and what MindIR exports hold): a new cache tensor,
      which the step returns; every step copies every cache tensor whole, which grows with the capacity;
    * in place (CPU, :func:`mindformers_ext.cpu_kernels.cache_write_op`): the new tokens go into the
      input cache's own memory and the step returns nothing of the cache.

    Paged (:class:`PagedKVCache`): ``slot`` is the pair ``(positions (B, S), table (B, L))`` and
    ``cache`` the block pool, a Parameter (blocks * block_size * H, D) holding token position p's head h
    at row ``p * H + h`` (:func:`pool_rows`); token j of row b goes to position ``positions[b, j]``,
    written in place (``ScatterUpdate`` on the Parameter).
    """

    def __init__(self) -> None:
        super().__init__()
        self.update = ops.TensorScatterUpdate()
        self.update_rows = ops.ScatterUpdate()
        self.write_in_place = cache_write_op()  # None where the operator does not run
        self.cpu_kernels_enabled = True  # mindformers_ext.cpu_kernels.use_cpu_kernels

    def construct(self, cache, new, slot):
        bs, heads, seq, dim = new.shape
        if isinstance(slot, tuple):
            self.update_rows(cache, pool_rows(slot[0], heads), ops.cast(new, cache.dtype))
            return cache
        if self.cpu_kernels_enabled and self.write_in_place is not None:
            return ops.depend(cache, self.write_in_place(cache, ops.cast(new, cache.dtype), slot))
        shape = (bs, heads, seq, 1)
        head = ops.broadcast_to(ops.reshape(ops.arange(heads, dtype=ms.int32), (1, -1, 1, 1)), shape)
        rows = ops.broadcast_to(ops.reshape(ops.arange(bs, dtype=ms.int32), (-1, 1, 1, 1)), shape)
        tokens = ops.reshape(slot, (-1, 1, 1, 1)) + ops.reshape(ops.arange(seq, dtype=ms.int32), (1, 1, -1, 1))
        index = ops.concat((rows, head, ops.broadcast_to(tokens, shape)), -1)
        return self.update(cache, index, ops.cast(new, cache.dtype))


def can_write_in_place(model: nn.Cell) -> bool:
    """Whether every contiguous-cache write of ``model`` can run in place (:class:`CacheWriter`)."""
    writers = [cell for _, cell in model.cells_and_names() if isinstance(cell, CacheWriter)]
    return bool(writers) and all(w.write_in_place is not None for w in writers)


def pool_rows(positions, heads: int):
    """Rows (B, H, L) of a paged pool (:class:`CacheWriter`) that hold the ``heads`` heads of the token
    positions ``positions`` (B, L): ``positions[b, l] * heads + h``.

    The pool keeps a token's heads in consecutive rows, so that gathering these rows gives the (B, H, L,
    D) layout attention reads, and a decode step's new (B, H, 1, D) keys scatter without a transpose:
    with a (positions, H, D) pool, each decode step transposed every gathered cache tensor (on the demo
    model at batch 16, 256 tokens, 8 transposes took a quarter of the step)."""
    if heads == 1:
        return ops.expand_dims(positions, 1)
    return (ops.expand_dims(positions, 1) * heads
            + ops.reshape(ops.arange(heads, dtype=positions.dtype), (1, heads, 1)))


def read_cache(cache, slot, heads: int):
    """The cache a decode step attends over: ``cache`` itself, or for a paged pool each row's tokens
    gathered through its table (``slot[1]`` (B, L) token positions) into (B, H, L, D)."""
    if isinstance(slot, tuple):
        return ops.gather(cache, pool_rows(slot[1], heads), 0)
    return cache


class CachedTensor(nn.Cell):
    """One cached quantity of a layer (K, V or MLA's latent): writes the new tokens at ``slot`` and
    returns ``(updated entries, the whole cache as new.dtype)``.

    float: ``entries`` is (cache,). int8 (``kv_cache_dtype: int8``): (values int8, scales float32
    (B, H, T, 1)); each new token and head is stored as ``round(x / s)`` with ``s = max|x| / 127``
    and read back as values * scales.
    """

    def __init__(self, int8: bool = False) -> None:
        super().__init__()
        self.int8 = int8
        self.size = 2 if int8 else 1
        self.write_values = CacheWriter()
        self.write_scales = CacheWriter()
        self.dequantize = dequantize_op() if int8 else None  # the CPU kernel (None elsewhere)
        self.cpu_kernels_enabled = True  # mindformers_ext.cpu_kernels.use_cpu_kernels

    def construct(self, entries, new, slot):
        if not self.int8:
            cache = self.write_values(entries[0], new, slot)
            return (cache,), ops.cast(read_cache(cache, slot, new.shape[1]), new.dtype)
        x = ops.cast(new, ms.float32)
        scale = ops.abs(x).max(axis=-1, keepdims=True) / 127.0
        scale = ops.select(scale > 0, scale, ops.ones_like(scale))
        values = self.write_values(entries[0], ops.cast(ops.round(x / scale), ms.int8), slot)
        scales = self.write_scales(entries[1], scale, slot)
        heads = new.shape[1]
        int8_all, scales_all = read_cache(values, slot, heads), read_cache(scales, slot, heads)
        if self.cpu_kernels_enabled and self.dequantize is not None:
            full = self.dequantize(int8_all, scales_all)
        else:
            full = ops.cast(int8_all, ms.float32) * scales_all
        return (values, scales), ops.cast(full, new.dtype)


class CachedKV(nn.Cell):
    """A layer's keys and values (two :class:`CachedTensor`): ``(updated entries, keys, values to attend
    over)``. Without ``cache`` (training): ``((), k, v)``. With it, k and v are written at ``slot``;
    ``decode`` attends over the whole cache, otherwise (prefill into an empty cache) over the new tokens."""

    def __init__(self, int8: bool = False) -> None:
        super().__init__()
        self.keys = CachedTensor(int8)
        self.values = CachedTensor(int8)

    def construct(self, cache, k, v, slot, decode):
        if cache is None:
            return (), k, v
        n = self.keys.size
        k_entries, k_all = self.keys(cache[:n], k, slot)
        v_entries, v_all = self.values(cache[n:], v, slot)
        if decode:
            return k_entries + v_entries, k_all, v_all
        return k_entries + v_entries, k, v


def left_pad(prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple:
    """Prompts of different lengths as one left-padded batch, so every row ends at the same column:
    (ids (B, S) int32, valid (B, S) bool, positions (B, S) int32: each row's tokens counted from 0,
    padding at 0)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int32)
    valid = np.zeros((len(prompts), width), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        valid[row, width - len(prompt):] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return ids, valid, positions


def padded_causal_mask(valid: np.ndarray) -> np.ndarray:
    """Additive (B, 1, S, S) float32 mask for a left-padded batch: causal, and padding never attended."""
    seq = valid.shape[1]
    allowed = np.tril(np.ones((seq, seq), dtype=bool))[None] & valid[:, None, :]
    return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]


class KVCache:
    """A static cache for one batch: ``spec``'s tensors of ``capacity`` slots, allocated as zeros.

    Rows are left-padded, so every row writes its next token at the same slot; ``valid`` records
    which slots hold real tokens (prompt padding never does). A step graph that writes in place changes
    ``tensors`` themselves; a functional one returns updated tensors, which replace them
    (:meth:`take_step_output`).
    """

    def __init__(self, spec: CacheSpec, batch: int, capacity: int, dtype=ms.float32) -> None:
        self.spec, self.capacity = spec, capacity
        self.tensors = tuple(ops.zeros(shape, dt) for shape, dt in spec.shapes(batch, capacity, dtype))
        self.valid = np.zeros((batch, capacity), dtype=bool)
        self.length = 0  # slots written so far (the same for every row)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def prefill(self, valid: np.ndarray) -> tuple:
        """(mask (B, 1, S, S), slot (B,)) to write a left-padded prompt batch (``valid`` (B, S)) at slot 0."""
        width = valid.shape[1]
        if self.length or width > self.capacity:
            raise ValueError(f"prefill of {width} tokens into a cache of capacity {self.capacity} "
                             f"holding {self.length}")
        self.valid[:, :width] = valid
        self.length = width
        return Tensor(padded_causal_mask(valid)), Tensor(np.zeros(self.batch, np.int32))

    def next_slot(self) -> tuple:
        """(mask (B, 1, 1, capacity), slot (B,)) for one new token per row at the next slot."""
        if self.length >= self.capacity:
            raise ValueError(f"the cache is full ({self.capacity} slots)")
        self.valid[:, self.length] = True
        slot = np.full(self.batch, self.length, np.int32)
        self.length += 1
        mask = np.where(self.valid, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :]
        return Tensor(mask), Tensor(slot)

    def update(self, tensors: Sequence[Tensor]) -> None:
        """Take a step's updated cache tensors."""
        if len(tensors) != self.spec.num_tensors:
            raise ValueError(f"expected {self.spec.num_tensors} cache tensors, got {len(tensors)}")
        self.tensors = tuple(tensors)

    def take_step_output(self, out: Sequence[Tensor]) -> Tensor:
        """The logits of a step's output ``(logits, *cache)``: the updated cache tensors a functional step
        returns replace :attr:`tensors` (a step that writes in place returns only the logits)."""
        if len(out) > 1:
            self.update(out[1:])
        return out[0]


class PagedKVCache:
    """A pool of fixed-size blocks shared by many sequences (vLLM's paged KV cache, portable ops).

    Each cache tensor of ``spec`` is one pool, a Parameter (num_blocks * block_size * heads, dim) that the
    step graphs write in place; a sequence owns a list of blocks (its block table) and its token t lives
    at pool position ``table[t // block_size] * block_size + t % block_size``, its heads in that
    position's ``heads`` consecutive rows (:func:`pool_rows`). Blocks are reserved when a sequence is
    added (for every token it may ever hold, so a running sequence never waits for memory) and
    returned to the free list when it is freed. The step graphs get, instead of one slot per row,
    ``(positions (B, S), table (B, L))``: where the new tokens go and the pool positions of each
    row's first L tokens (:class:`CacheWriter`, :func:`read_cache`).

    One extra block past ``num_blocks`` is never handed out: padding rows of a decode batch (rounded
    up to a compiled batch size) write there and read only there.
    """

    def __init__(self, spec: CacheSpec, num_blocks: int, block_size: int = 16, dtype=ms.float32) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        self.tensors = tuple(Parameter(ops.zeros((shape[2] * shape[1], shape[3]), dt), name=f"paged_cache.{i}",
                                       requires_grad=False)
                             for i, (shape, dt) in enumerate(spec.shapes(1, (num_blocks + 1) * block_size, dtype)))
        self.scratch = num_blocks * block_size  # pool position of the padding rows' block
        self.free_blocks = list(range(num_blocks))
        self.tables: dict = {}   # sequence id -> its blocks
        self.lengths: dict = {}  # sequence id -> tokens written

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def can_add(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self.free_blocks)

    def add(self, seq_id, max_tokens: int) -> None:
        """Reserve blocks for a sequence that will hold at most ``max_tokens`` tokens."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        need = self.blocks_for(max_tokens)
        if need > len(self.free_blocks):
            raise MemoryError(f"sequence {seq_id!r} needs {need} blocks of {self.block_size} tokens, "
                              f"{len(self.free_blocks)} of {self.num_blocks} are free")
        self.tables[seq_id] = [self.free_blocks.pop() for _ in range(need)]
        self.lengths[seq_id] = 0

    def free(self, seq_id) -> None:
        """Return a sequence's blocks to the pool (a no-op for an unknown id)."""
        self.free_blocks.extend(self.tables.pop(seq_id, ()))
        self.lengths.pop(seq_id, None)

    def _blocks(self, seq_id, tokens: int) -> list:
        """The blocks of ``seq_id``, which is to hold ``tokens`` tokens (raises if it reserved fewer)."""
        table = self.tables[seq_id]
        if tokens > len(table) * self.block_size:
            raise ValueError(f"sequence {seq_id!r} would hold {tokens} tokens, it reserved "
                             f"{len(table) * self.block_size}")
        return table

    @staticmethod
    def _padded_shape(step: str, count: int, longest: int, rows: Optional[int], width: Optional[int]) -> tuple:
        """(rows, width) of a ``step`` ("prefill" / "decode") batch of ``count`` rows of up to ``longest``
        tokens, padded to ``rows`` / ``width`` where given."""
        rows = count if rows is None else rows
        width = longest if width is None else width
        if rows < count or width < longest:
            raise ValueError(f"{step}: {count} rows of up to {longest} tokens do not fit the padded shape "
                             f"({rows}, {width})")
        return rows, width

    def _positions(self, seq_id, start: int, count: int) -> np.ndarray:
        table = self._blocks(seq_id, start + count)
        tokens = np.arange(start, start + count)
        return (np.asarray(table, np.int32)[tokens // self.block_size] * self.block_size
                + tokens % self.block_size).astype(np.int32)

    def prefill(self, seq_ids: Sequence, counts: Sequence[int], rows: Optional[int] = None,
                width: Optional[int] = None) -> tuple:
        """(mask (B, 1, S, S), (positions, table) (B, S)) to write the prompts of new sequences, ``counts[b]``
        tokens for ``seq_ids[b]``, left-padded to the longest, or to ``width`` (padding writes to the scratch
        block and is masked). ``rows`` pads B up to a compiled shape with rows that are all padding."""
        rows, width = self._padded_shape("prefill", len(seq_ids), max(counts, default=1), rows, width)
        positions = np.full((rows, width), self.scratch, np.int32)
        for row, (seq_id, count) in enumerate(zip(seq_ids, counts)):
            if self.lengths[seq_id]:
                raise ValueError(f"sequence {seq_id!r} already holds {self.lengths[seq_id]} tokens")
            positions[row, width - count:] = self._positions(seq_id, 0, count)
            self.lengths[seq_id] = count
        counts = np.concatenate([np.asarray(counts, np.int64), np.zeros(rows - len(seq_ids), np.int64)])
        valid = np.arange(width)[None, :] >= width - counts[:, None]
        mask = padded_causal_mask(valid)
        return Tensor(mask), (Tensor(positions), Tensor(positions))

    def decode(self, seq_ids: Sequence, rows: Optional[int] = None, width: Optional[int] = None) -> tuple:
        """(mask (B, 1, 1, L), (positions (B, 1), table (B, L))) for one new token of each sequence.

        ``rows`` / ``width`` pad B and L up to a compiled shape: padding rows write to and read the
        scratch block, padding columns are masked."""
        lengths = np.array([self.lengths[s] + 1 for s in seq_ids], np.int64)
        rows, width = self._padded_shape("decode", len(seq_ids), int(lengths.max(initial=1)), rows, width)
        # each row's block table, padded with the scratch block (padding rows: all scratch)
        blocks = np.full((rows, self.blocks_for(width)), self.num_blocks, np.int32)
        for row, (seq_id, length) in enumerate(zip(seq_ids, lengths)):
            owned = self._blocks(seq_id, int(length))
            blocks[row, :min(len(owned), blocks.shape[1])] = owned[:blocks.shape[1]]
            self.lengths[seq_id] = int(length)
        lengths = np.concatenate([lengths, np.ones(rows - len(seq_ids), lengths.dtype)])
        tokens = np.arange(width)
        valid = tokens[None, :] < lengths[:, None]
        table = np.where(valid, blocks[:, tokens // self.block_size] * self.block_size + tokens % self.block_size,
                         self.scratch).astype(np.int32)
        positions = np.take_along_axis(table, (lengths - 1)[:, None], 1)
        mask = np.where(valid, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :]
        return Tensor(mask), (Tensor(positions), Tensor(table))
