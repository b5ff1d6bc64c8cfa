"""Weight-only int8 quantization (W8A16): symmetric per-output-channel scales for the linear layers.

``q = round(w / s)`` clipped to [-127, 127] with ``s = max|w_row| / 127`` per output feature (row of
HF's [out, in] weight; per expert and output feature for the stacked routed experts of DeepSeekMoE),
so ``w ~= q * s`` with an error of at most ``s / 2`` per weight. Activations stay in the compute
dtype (the "A16"); each :class:`mindformers_ext.layers.Linear` and
:class:`research.deepseek2.deepseek2.RoutedExperts` multiplies its int8 matmul output by the scales.
The LM head and the embedding stay in float unless asked; MoE routers stay in float (their scores
pick the experts).

A quantized weight ``W`` is stored as the int8 parameter ``W`` and the float32 parameter
``W_scale``, in the model and in a checkpoint written by ``convert_weight.py --quant w8a16``:
:func:`load_checkpoint_w8a16` loads such a checkpoint as it is (no re-quantisation), or a float one
followed by :func:`quantize_model`.

On Ascend a quantized :class:`Linear` can run MindSpore's fused weight-only kernel
(``ops.auto_generate.WeightQuantBatchMatmul``: ``y = x @ ((weight + offset) * scale)``) on the same
int8 weight and scale instead of the portable int8 matmul followed by the scale multiply: the
``fused_quant_matmul`` switch of :func:`quantize_model` (:func:`use_fused_quant_matmul` decides).
Routed MoE experts keep the portable batched matmuls. docs/quantization.md relates this layout to
MindSpore Golden Stick's.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

QUANT_METHODS = ("w8a16",)
SCALE_SUFFIX = "_scale"
FUSED_SWITCH = "fused_quant_matmul"
# x dtypes the Ascend WeightQuantBatchMatmul kernel takes (float32 activations are not among them)
FUSED_COMPUTE_DTYPES = ("Float16", "BFloat16")


def device_target() -> str:
    """MindSpore's ``device_target`` ("CPU", "GPU", "Ascend")."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    return ms.get_context("device_target")


def use_fused_quant_matmul(switch: Optional[bool], compute_dtype, where: str = "this Linear") -> bool:
    """Whether a W8A16 Linear (``where``, for the error) computing in ``compute_dtype`` runs the fused
    Ascend kernel.

    ``switch=None`` (the default everywhere): on exactly when the device target is Ascend and the
    compute dtype is float16 / bfloat16. ``True`` on another device target or with float32 compute
    raises ``ValueError`` naming the switch; ``False`` keeps the portable path."""
    if switch is not None and not isinstance(switch, bool):
        raise TypeError(f"{FUSED_SWITCH} must be True, False or None (automatic), got {switch!r}")
    target = device_target()
    fits = str(compute_dtype) in FUSED_COMPUTE_DTYPES
    if switch is None:
        return target == "Ascend" and fits
    if switch and target != "Ascend":
        raise ValueError(f"{FUSED_SWITCH}=True needs device_target 'Ascend' (WeightQuantBatchMatmul is an Ascend "
                         f"kernel), but device_target is {target!r}; leave {FUSED_SWITCH} unset or False there "
                         "for the portable int8 matmul")
    if switch and not fits:
        raise ValueError(f"{FUSED_SWITCH}=True needs a float16 or bfloat16 compute_dtype (the kernel's activation "
                         f"dtypes), but {where} computes in {compute_dtype}")
    return switch


def check_method(method: str) -> str:
    """``method`` if it is a supported quantization, else ``ValueError`` naming the choices."""
    if method not in QUANT_METHODS:
        raise ValueError(f"quant {method!r} is not supported; expected one of {QUANT_METHODS}")
    return method


def quantize_per_channel(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float (..., out, in) -> (int8 (..., out, in), float32 scales (..., out)); all-zero rows get scale 1."""
    weight = np.asarray(weight, dtype=np.float32)
    peak = np.abs(weight).max(axis=-1)
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(weight / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def quant_targets(model, lm_head: bool = False) -> Iterator[Tuple[str, object]]:
    """``(cell name, cell)`` of every cell whose weights W8A16 stores as int8: each :class:`Linear`
    except MoE routers and the LM head (that one only with ``lm_head``, and never when tied to the
    embedding), and every stack of MoE experts (a cell with ``W8A16_WEIGHTS``: DeepSeek-V2's ``RoutedExperts``,
    stacked w1 / w2 / w3). Quantized cells included."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.layers.linear import Linear

    head = getattr(model, "lm_head", None)
    tied = head is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            if not name.endswith("router.dense") and not (cell is head and (tied or not lm_head)):
                yield name, cell
        elif hasattr(cell, "W8A16_WEIGHTS"):  # stacked MoE experts
            yield name, cell


def scale_shapes(model, lm_head: bool = False) -> dict:
    """``{weight parameter name: shape of its scale}`` for the weights :func:`quantize_model` turns into
    int8 (what ``convert_weight.py --quant`` quantizes; works on a weightless skeleton)."""
    shapes = {}
    for _, cell in quant_targets(model, lm_head):
        for attr in cell.W8A16_WEIGHTS:
            param = getattr(cell, attr)
            shapes[param.name] = tuple(param.shape[:-1])
    return shapes


def quantize_model(model, method: str = "w8a16", lm_head: bool = False, from_weights: bool = True,
                   fused_quant_matmul: Optional[bool] = None) -> dict:
    """Quantize the weights :func:`quant_targets` names, in place. Returns {"linears": cells quantized,
    "float_bytes": their float32 bytes, "quant_bytes": int8 values plus float32 scales, "fused": cells
    that run the fused Ascend kernel}.

    ``from_weights=False`` only gives the model the int8 layout (int8 zeros, unit scales) for a
    checkpoint that already holds int8 weights and scales to be loaded into it.
    ``fused_quant_matmul`` (each :class:`Linear`; see :func:`use_fused_quant_matmul`): None = on
    exactly on Ascend with a float16 / bfloat16 compute dtype; the routed MoE experts always keep the
    portable batched matmuls."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.layers.linear import Linear

    check_method(method)
    targets = [(name, cell) for name, cell in quant_targets(model, lm_head) if not cell.quantized]
    for name, cell in targets:  # every switch check before the first weight changes
        if isinstance(cell, Linear):
            use_fused_quant_matmul(fused_quant_matmul, cell.compute_dtype, f"Linear {name!r}")
    report = {"linears": 0, "float_bytes": 0, "quant_bytes": 0, "fused": 0}
    for _, cell in targets:
        if isinstance(cell, Linear):
            cell.quantize_w8a16(from_weights, fused_quant_matmul)
            report["fused"] += int(cell.fused_quant_matmul)
        else:
            cell.quantize_w8a16(from_weights)
        for attr in cell.W8A16_WEIGHTS:
            numel = int(np.prod(getattr(cell, attr).shape))
            report["float_bytes"] += numel * 4
            report["quant_bytes"] += numel + int(np.prod(getattr(cell, attr + SCALE_SUFFIX).shape)) * 4
        report["linears"] += 1
    return report


def int8_parameters(param, from_weights: bool = True):
    """(int8 parameter, float32 scale parameter) replacing the float ``param`` (..., out, in): its
    :func:`quantize_per_channel` values, or zeros and unit scales (a layout to load into)."""
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from mindspore import Parameter, Tensor
    from mindspore.common.initializer import One, Zero, initializer

    shape = tuple(param.shape)
    if from_weights:
        q, scale = quantize_per_channel(param.asnumpy())
        q, scale = Tensor(q), Tensor(scale)
    else:
        q, scale = initializer(Zero(), shape, ms.int8), initializer(One(), shape[:-1], ms.float32)
    return (Parameter(q, name=param.name, requires_grad=False),
            Parameter(scale, name=param.name + SCALE_SUFFIX, requires_grad=False))


def _checkpoint_dtypes(files) -> dict:
    """``{name: dtype code}`` of the tensors in checkpoint ``files`` (headers only)."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.convert.ckpt_io import read_ckpt_index
    from mindformers_ext.convert.safetensors_io import read_safetensors_header

    dtypes = {}
    for file in files:
        entries = read_safetensors_header(file)[0] if file.endswith(".safetensors") else read_ckpt_index(file)
        dtypes.update({e.name: (e.dtype, file) for e in entries})
    return dtypes


def load_checkpoint_w8a16(network, path: str, rank_id: Optional[int] = None, what: str = "load_checkpoint",
                          method: str = "w8a16", fused_quant_matmul: Optional[bool] = None) -> list:
    """Load ``path`` into ``network`` as a W8A16 model; returns the files read.

    A checkpoint that holds the int8 weights and their ``*_scale`` tensors (``convert_weight.py
    --quant w8a16``) is loaded as it is into the int8 layout; a float checkpoint is loaded and then
    quantized (:func:`quantize_model`, which takes ``fused_quant_matmul``)."""
    # pylint: disable=import-outside-toplevel
    from mindformers.tools.logger import logger

    from mindformers_ext.checkpoint import (CheckpointError, current_rank, load_checkpoint_into,
                                            model_parameters, select_checkpoint)

    check_method(method)
    rank_id = current_rank() if rank_id is None else rank_id
    scales = scale_shapes(network)
    expected = dict(model_parameters(network))
    expected.update({name + SCALE_SUFFIX: shape for name, shape in scales.items()})
    try:
        files = select_checkpoint(path, expected, rank_id, what, type(network).__name__ + " (w8a16)")
    except CheckpointError:  # no int8 checkpoint there: load the float weights, then quantize them
        files = load_checkpoint_into(network, path, rank_id, what)
        report = quantize_model(network, method, fused_quant_matmul=fused_quant_matmul)
        logger.info("%s: float weights quantized to int8 after loading (%s: %d cells, %.1f -> %.1f MiB)", what,
                    method, report["linears"], report["float_bytes"] / 2**20, report["quant_bytes"] / 2**20)
        return files
    dtypes = _checkpoint_dtypes(files)
    for name in scales:
        dtype, file = dtypes[name]
        if dtype != "I8":
            raise CheckpointError(f"{what} {file}: tensor {name!r} is {dtype} next to its {name}{SCALE_SUFFIX}; "
                                  "a w8a16 checkpoint stores the quantized weights as int8 (I8)")
    quantize_model(network, method, from_weights=False, fused_quant_matmul=fused_quant_matmul)
    files = load_checkpoint_into(network, path, rank_id, what)
    logger.info("%s: %s checkpoint loaded as stored (%d int8 weights with their scales)", what, method, len(scales))
    return files
