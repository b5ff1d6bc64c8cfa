"""``PortableTrainOneStepCell``: a training step that runs on CPU as well as on Ascend / GPU.

MindFormers' default ``MFTrainOneStepCell`` (and MindSpore's ``TrainOneStepWithLossScaleCell``)
detect overflow with NPU status registers (``NPUGetFloatStatusV2``) or device-specific kernels,
which CPU lacks. This wrapper does the same job with ordinary operators:

* overflow check after the data-parallel reduction: one sum per gradient (the square sum that the
  global norm needs anyway, or a plain sum without clipping) is inf / NaN exactly when the gradient
  holds one; ``IsFinite`` + ``ReduceAll`` over those sums, plus an ``AllReduce`` of the flag when
  distributed, so all ranks skip a step together. (Reducing per tensor instead of testing every
  element keeps it to one memory pass: on CPU the check costs a few percent of a step.)
* loss scale: static (a number / Tensor: an overflowing step is skipped) or dynamic
  (``scale_sense`` a ``DynamicLossScaleUpdateCell``: the step is skipped and the scale lowered);
* gradient clipping by global norm, merged with the loss-scale division into one multiplication;
* MFTrainOneStepCell's ``use_skip_data_by_global_norm``: a step whose global norm reaches
  ``global_norm_spike_threshold`` leaves the weights as they were;
* gradient accumulation inside one call: the batch is split into ``gradient_accumulation_steps``
  micro-batches whose gradients are averaged before one optimizer update (one call = one step, so
  learning-rate schedules, step counters and checkpoints count optimizer updates). MindFormers
  resets ``runner_config.gradient_accumulation_steps`` to 1 outside semi-auto parallel;
  ``tools/run_mindformer.py`` moves it here on CPU.

It is meant for stand-alone and data-parallel runs (CPU, or any device). Under semi-auto parallel
on Ascend, MindFormers' ``MFTrainOneStepCell`` stays the default (its clipping knows about sharded
gradients); ``tools/run_mindformer.py`` only swaps wrappers on CPU.

Outputs follow ``MFTrainOneStepCell``: ``(loss, overflow, loss_scale, learning_rate, global_norm)``,
which MindFormers' ``MFLossMonitor`` and ``CheckpointMonitor`` read.
"""
from __future__ import annotations

from typing import Any, Union

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.communication.management import GlobalComm
from mindspore.context import ParallelMode
from mindspore.parallel._utils import _get_parallel_mode

from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["PortableTrainOneStepCell"]

_scale_grad = ops.MultitypeFuncGraph("portable_scale_grad")
_square_sum = ops.MultitypeFuncGraph("portable_square_sum")
_plain_sum = ops.MultitypeFuncGraph("portable_plain_sum")
_finite = ops.MultitypeFuncGraph("portable_finite")


def _as_float32(grad):
    return grad if grad.dtype == ms.float32 else ops.cast(grad, ms.float32)


def _reduce_all_axes(x):
    """Sum of every element. Reducing the last axis of the tensor seen as 2-D (rows, last axis)
    first is several times faster on CPU than one full reduction (barely parallel) or than the same
    last-axis reduction on a 3-D tensor (stacked expert weights: 5x slower), and as exact."""
    if x.ndim == 0:
        return x
    if x.ndim > 2:
        x = x.reshape(-1, x.shape[-1])
    return x.sum(-1).sum()


@_scale_grad.register("Tensor", "Tensor")
def _scale_one(factor, grad):
    return _as_float32(grad) * factor


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    grad = _as_float32(grad)
    return _reduce_all_axes(grad * grad)


@_plain_sum.register("Tensor")
def _plain_sum_one(grad):
    return _reduce_all_axes(_as_float32(grad))


@_finite.register("Tensor")
def _finite_one(value):
    return ops.IsFinite()(value)


# Keyword arguments MindFormers' trainer passes to every wrapper (base_trainer.create_model_wrapper),
# which have no effect here (print_separate_loss, True by default there: the losses are printed summed).
_ACCEPTED_EXTRA = ("parallel_config", "lr_scheduler", "grouped_lr_scheduler", "print_separate_loss",
                   "micro_batch_num", "use_grad_norm")


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class PortableTrainOneStepCell(nn.TrainOneStepCell):
    """One training step with portable overflow check, loss scale, clipping and accumulation.

    Args:
        network: the network with loss (``network(*inputs)`` returns a scalar loss, or
            ``(numerator, denominator)`` with ``calculate_per_token_loss``).
        optimizer: the optimizer.
        use_clip_grad: clip gradients to ``max_grad_norm`` by global norm.
        max_grad_norm: the global norm bound.
        scale_sense: loss scale: a number or Tensor (static), or a loss-scale update Cell such as
            ``DynamicLossScaleUpdateCell`` (dynamic). Gradients are unscaled before clipping.
        gradient_accumulation_steps: micro-batches per call (the batch dimension of every input
            must be divisible by it).
        calculate_per_token_loss: the network returns ``(sum of token losses, token count)``; the
            step divides by the count summed over micro-batches and, under data parallel, over
            ranks: the loss and the update are the token mean of the whole global batch, whatever
            the number of scored tokens on each rank or micro-batch (the reported loss too).
        use_skip_data_by_global_norm: skip the update of a step whose (unscaled, unclipped) global
            gradient norm is not below ``global_norm_spike_threshold`` (MFTrainOneStepCell's switch;
            needs ``use_clip_grad``, which computes the norm).
        global_norm_spike_threshold: that threshold.
        **kwargs: the other arguments MindFormers passes to wrappers (``parallel_config``,
            ``lr_scheduler``, ...), which have no effect here; MFTrainOneStepCell's ``local_norm`` is
            reported as not done when set.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Cell, use_clip_grad: bool = False,
                 max_grad_norm: float = 1.0, scale_sense: Union[int, float, Tensor, nn.Cell] = 1.0,
                 gradient_accumulation_steps: int = 1, calculate_per_token_loss: bool = False,
                 use_skip_data_by_global_norm: bool = False, global_norm_spike_threshold: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(network, optimizer, sens=None)
        unknown = sorted(set(kwargs) - set(_ACCEPTED_EXTRA) - {"local_norm"})
        if unknown:
            logger.warning("PortableTrainOneStepCell ignores the arguments %s", unknown)
        if kwargs.get("local_norm"):  # MFTrainOneStepCell's per-group gradient norms, returned as extra outputs
            logger.warning("runner_wrapper.local_norm: %r is not done by PortableTrainOneStepCell (an "
                           "MFTrainOneStepCell diagnostic); training runs as without it", kwargs["local_norm"])
        self.skip_spikes = bool(use_skip_data_by_global_norm)
        if self.skip_spikes and not use_clip_grad:
            raise ValueError("runner_wrapper.use_skip_data_by_global_norm: True needs use_clip_grad: True, which "
                             "computes the global gradient norm it compares with global_norm_spike_threshold")
        self.spike_threshold = float(global_norm_spike_threshold)
        steps = 1 if gradient_accumulation_steps is None else int(gradient_accumulation_steps)
        if steps < 1:
            raise ValueError(f"runner_wrapper.gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.accumulation_steps = steps
        self.per_token_loss = bool(calculate_per_token_loss)
        self.use_clip_grad = bool(use_clip_grad)
        if float(max_grad_norm) <= 0:
            raise ValueError(f"runner_wrapper.max_grad_norm must be positive, got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        self.loss_scaling_manager = None
        if isinstance(scale_sense, nn.Cell):
            self.loss_scaling_manager = scale_sense
            initial = scale_sense.get_loss_scale()
        elif isinstance(scale_sense, Tensor):
            if scale_sense.shape not in ((), (1,)):
                raise ValueError(f"runner_wrapper.scale_sense must be a scalar, got shape {scale_sense.shape}")
            initial = float(scale_sense.asnumpy().reshape(()))
        elif isinstance(scale_sense, (int, float)) and not isinstance(scale_sense, bool):
            initial = float(scale_sense)
        else:
            raise TypeError("runner_wrapper.scale_sense must be a number, a Tensor or a loss-scale Cell "
                            f"(e.g. DynamicLossScaleUpdateCell), got {type(scale_sense).__name__}")
        if initial <= 0:
            raise ValueError(f"runner_wrapper.scale_sense must be positive, got {initial}")
        # Same parameter name as MFTrainOneStepCell, so checkpoints and resume carry the scale.
        self.scale_sense = Parameter(Tensor(initial, ms.float32), name="scale_sense")
        # A static loss scale of 1 without accumulation leaves the gradients as they are: skip the
        # (memory-bound) unscaling pass unless clipping rescales them anyway.
        self.unit_scale = (self.loss_scaling_manager is None and initial == 1.0 and steps == 1
                           and not self.per_token_loss)
        self.is_distributed = _get_parallel_mode() != ParallelMode.STAND_ALONE
        if self.is_distributed:
            self.allreduce = ops.AllReduce(group=GlobalComm.WORLD_COMM_GROUP)
        # Per-token loss under data parallel: the token mean of the global batch. The reducer leaves
        # the sum of the ranks' gradients (divided by the rank count with gradients_mean), so the
        # divisor is the token count summed over ranks (times the same 1 / rank count).
        self.global_token_mean = self.per_token_loss and self.reducer_flag
        self.reduced_share = 1.0 / self.degree if self.global_token_mean and self.mean else 1.0
        self.hyper_map = ops.HyperMap()
        self.learning_rate = self.optimizer.learning_rate

    def set_sense_scale(self, sens: Tensor) -> None:
        """Set the loss scale (MindSpore's ``TrainOneStepWithLossScaleCell`` API)."""
        value = float(ops.cast(sens, ms.float32).asnumpy().reshape(()))
        if self.unit_scale and value != 1.0:
            raise ValueError("this PortableTrainOneStepCell was built with a static loss scale of 1, which its "
                             "graph does not apply; build it with the scale_sense to use")
        self.scale_sense.set_data(Tensor(value, ms.float32))

    def _micro(self, inputs: tuple, index: int) -> tuple:
        """The ``index``-th of ``accumulation_steps`` equal slices of every input along axis 0."""
        out = ()
        for x in inputs:
            if x.shape[0] % self.accumulation_steps != 0:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by runner_wrapper."
                                 f"gradient_accumulation_steps {self.accumulation_steps}")
            size = x.shape[0] // self.accumulation_steps
            out = out + (x[index * size:(index + 1) * size],)
        return out

    def _loss_and_grads(self, scale: Tensor, inputs: tuple):
        """(loss numerator, denominator, scaled gradients) of one micro-batch.

        Without per-token loss the denominator is 1 per micro-batch, so the sum over micro-batches
        turns the summed losses and gradients into their means."""
        if self.per_token_loss:
            numerator, denominator = self.network(*inputs)
            sens = (ops.ones_like(numerator) * ops.cast(scale, numerator.dtype),
                    ops.zeros_like(denominator))
            grads = self.grad(self.network, self.weights)(*inputs, sens)
            return numerator, ops.cast(denominator, ms.float32), grads
        loss = self.network(*inputs)
        sens = ops.ones_like(loss) * ops.cast(scale, loss.dtype)
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        return loss, ops.ones((), ms.float32), grads

    def construct(self, *inputs):
        scale = self.scale_sense.value()
        if self.accumulation_steps == 1:
            numerator, denominator, grads = self._loss_and_grads(scale, inputs)
        else:
            numerator, denominator, grads = self._loss_and_grads(scale, self._micro(inputs, 0))
            for i in range(1, self.accumulation_steps):
                num_i, den_i, grads_i = self._loss_and_grads(scale, self._micro(inputs, i))
                numerator = numerator + num_i
                denominator = denominator + den_i
                grads = self.hyper_map(ops.add, grads, grads_i)
        numerator = ops.cast(numerator, ms.float32)
        if self.global_token_mean:
            # every rank divides by the same global count (the local one made the ranks diverge)
            numerator = self.allreduce(numerator)
            count = self.allreduce(denominator)
            loss = numerator / count
            denominator = count * self.reduced_share
        else:
            loss = numerator / denominator
        grads = self.grad_reducer(grads)
        unscale = 1.0 / (scale * denominator)

        # One reduction per gradient gives both the finite check and the global norm: a square sum
        # (or a plain sum without clipping) is inf / NaN exactly when the gradient holds one.
        if self.use_clip_grad:
            partial = self.hyper_map(_square_sum, grads)
            global_norm = ops.sqrt(ops.addn(partial)) * unscale
            factor = unscale * ops.minimum(self.max_grad_norm / (global_norm + 1e-6), 1.0)
        else:
            partial = self.hyper_map(_plain_sum, grads)
            global_norm = ops.zeros((), ms.float32)
            factor = unscale
        finite = ops.ReduceAll(keep_dims=False)(ops.stack(self.hyper_map(_finite, partial)))
        flag = ops.cast(ops.logical_not(finite), ms.float32)
        if self.is_distributed:
            flag = self.allreduce(flag)
        overflow = flag > 0
        if self.loss_scaling_manager is not None:
            overflow = self.loss_scaling_manager(self.scale_sense, overflow)
        if self.use_clip_grad or not self.unit_scale:
            grads = self.hyper_map(ops.partial(_scale_grad, factor), grads)

        learning_rate = self.learning_rate
        if self.optimizer.dynamic_lr:
            if self.optimizer.is_group_lr:
                learning_rate = self.learning_rate[-1](self.optimizer.global_step).reshape(())
            else:
                learning_rate = self.learning_rate(self.optimizer.global_step).reshape(())

        if not overflow:
            if self.skip_spikes:
                if global_norm < self.spike_threshold:
                    loss = ops.depend(loss, self.optimizer(grads))
            else:
                loss = ops.depend(loss, self.optimizer(grads))
        return loss, overflow, scale, learning_rate, global_norm
