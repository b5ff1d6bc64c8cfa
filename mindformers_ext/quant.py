"""Weight-only int8 quantization (W8A16): symmetric per-output-channel scales for the linear layers.

``q = round(w / s)`` clipped to [-127, 127] with ``s = max|w_row| / 127`` per output feature (row of
HF's [out, in] weight), so ``w ~= q * s`` with an error of at most ``s / 2`` per weight. Activations
stay in the compute dtype (the "A16"); each :class:`mindformers_ext.layers.Linear` multiplies its
int8 matmul output by the scales. The LM head and the embedding stay in float unless asked; MoE
routers stay in float (their scores pick the experts); the stacked routed experts are not quantized
yet.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

QUANT_METHODS = ("w8a16",)


def quantize_per_channel(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float (out, in) -> (int8 (out, in), float32 scales (out,)); all-zero rows get scale 1."""
    peak = np.abs(weight).max(axis=-1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_model(model, method: str = "w8a16", lm_head: bool = False) -> dict:
    """Quantize every :class:`Linear` of ``model`` in place (not the LM head unless ``lm_head``; a head
    tied to the embedding never). Returns {"linears": count, "float_bytes": ..., "quant_bytes": ...}
    for the quantized weights (int8 values plus their float32 scales)."""
    from mindformers_ext.layers.linear import Linear  # pylint: disable=import-outside-toplevel

    if method not in QUANT_METHODS:
        raise ValueError(f"quant {method!r} is not supported; expected one of {QUANT_METHODS}")
    head = getattr(model, "lm_head", None)
    tied = head is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    report = {"linears": 0, "float_bytes": 0, "quant_bytes": 0}
    for name, cell in model.cells_and_names():
        if (not isinstance(cell, Linear) or cell.quantized or name.endswith("router.dense")
                or (cell is head and (tied or not lm_head))):
            continue
        report["float_bytes"] += int(np.prod(cell.weight.shape)) * 4
        cell.quantize_w8a16()
        report["quant_bytes"] += int(np.prod(cell.weight.shape)) + int(cell.weight_scale.shape[0]) * 4
        report["linears"] += 1
    return report
