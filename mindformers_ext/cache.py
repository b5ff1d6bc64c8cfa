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
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

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
    """``cache[b, h, slot[b] + j, :] = new[b, h, j, :]`` for the S new tokens of every row.

    cache (B, H, T, D), new (B, H, S, D), slot (B,) int32. Functional (returns the updated cache),
    so one compiled graph serves every batch size, prompt length and capacity.
    """

    def __init__(self) -> None:
        super().__init__()
        self.update = ops.TensorScatterUpdate()

    def construct(self, cache, new, slot):
        bs, heads, seq, _ = new.shape
        shape = (bs, heads, seq, 1)
        rows = ops.broadcast_to(ops.reshape(ops.arange(bs, dtype=ms.int32), (-1, 1, 1, 1)), shape)
        head = ops.broadcast_to(ops.reshape(ops.arange(heads, dtype=ms.int32), (1, -1, 1, 1)), shape)
        tokens = ops.reshape(slot, (-1, 1, 1, 1)) + ops.reshape(ops.arange(seq, dtype=ms.int32), (1, 1, -1, 1))
        index = ops.concat((rows, head, ops.broadcast_to(tokens, shape)), -1)
        return self.update(cache, index, ops.cast(new, cache.dtype))


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

    def construct(self, entries, new, slot):
        if not self.int8:
            cache = self.write_values(entries[0], new, slot)
            return (cache,), ops.cast(cache, new.dtype)
        x = ops.cast(new, ms.float32)
        scale = ops.abs(x).max(axis=-1, keepdims=True) / 127.0
        scale = ops.select(scale > 0, scale, ops.ones_like(scale))
        values = self.write_values(entries[0], ops.cast(ops.round(x / scale), ms.int8), slot)
        scales = self.write_scales(entries[1], scale, slot)
        return (values, scales), ops.cast(ops.cast(values, ms.float32) * scales, new.dtype)


class CachedKV(nn.Cell):
    """A layer's keys and values (two :class:`CachedTensor`): ``(updated entries, all keys, all values)``."""

    def __init__(self, int8: bool = False) -> None:
        super().__init__()
        self.keys = CachedTensor(int8)
        self.values = CachedTensor(int8)

    def construct(self, cache, k, v, slot):
        n = self.keys.size
        k_entries, k_all = self.keys(cache[:n], k, slot)
        v_entries, v_all = self.values(cache[n:], v, slot)
        return k_entries + v_entries, k_all, v_all


def padded_causal_mask(valid: np.ndarray) -> np.ndarray:
    """Additive (B, 1, S, S) float32 mask for a left-padded batch: causal, and padding never attended."""
    seq = valid.shape[1]
    allowed = np.tril(np.ones((seq, seq), dtype=bool))[None] & valid[:, None, :]
    return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]


class KVCache:
    """A static cache for one batch: ``spec``'s tensors of ``capacity`` slots, allocated as zeros.

    Rows are left-padded, so every row writes its next token at the same slot; ``valid`` records
    which slots hold real tokens (prompt padding never does). ``tensors`` is replaced by each step's
    updated tensors (:meth:`update`).
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
