"""``PortableAdamW``: MindFormers' AdamW with its update fused into one operator per parameter.

MindFormers' ``AdamW`` spells the update out in about fifteen element-wise operators per
parameter; on CPU each one is a separate memory pass (no kernel fusion), which made the optimizer
two thirds of a 168M-parameter training step. MindSpore's ``Adam`` operator (``ApplyAdam``: CPU, GPU
and Ascend kernels) updates the weight and both moments in place in one pass, with the bias
correction of the step size; giving it ``eps_t`` and decaying the weight first gives exactly
MindFormers' / PyTorch's AdamW::

    p <- p - (lr * weight_decay) * p                        (decoupled decay, one in-place pass)
    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t),  eps_t = eps * sqrt(1 - beta2^t)
    p <- p - lr_t * m / (sqrt(v) + eps_t)
       = p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

The decay is ``ApplyGradientDescent`` with the weight as its own gradient: it rewrites the weight
where it lies, where a multiply and an ``assign`` wrote a temporary and copied it back. For 25M
parameters on one CPU thread the whole update takes 25-31 ms, against 40-42 ms with the multiply and
assign, and 99 ms with MindSpore's ``AdamWeightDecay`` operator (the correction folded into its
scalars), whose kernel is not vectorised.

State (``adam_m.*``, ``adam_v.*``, ``global_step``) is MindFormers' AdamW's, so checkpoints and
resume are interchangeable. float32 parameters only; with other parameter dtypes, or MindFormers'
parallel optimizer, it runs MindFormers' own update. ``tools/run_mindformer.py`` selects it on CPU.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from mindformers.core.optim.adamw import AdamW
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["PortableAdamW"]

_fused_adamw = ops.MultitypeFuncGraph("portable_fused_adamw")
_decay = ops.ApplyGradientDescent()  # p <- p - (lr * weight_decay) * p, in place in one pass


@_fused_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Bool")
def _fused_update(opt, beta1, beta2, eps, step, lr, weight_decay, param, grad, exp_avg, exp_avg_sq, optim_filter):
    """One parameter's AdamW step: the decoupled decay, then the fused Adam operator (see the module
    docstring); both write ``param`` in place, in this order (MindSpore orders side effects on one
    parameter as written)."""
    if not optim_filter:
        return ops.cast(grad, param.dtype)
    beta1_power, beta2_power = ops.pow(beta1, step), ops.pow(beta2, step)
    _decay(param, lr * weight_decay, param)
    return opt(param, exp_avg, exp_avg_sq, beta1_power, beta2_power, lr, beta1, beta2,
               eps * ops.sqrt(1.0 - beta2_power), ops.cast(grad, ms.float32))


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class PortableAdamW(AdamW):
    """MindFormers' ``AdamW`` (same arguments and state) with a fused, in-place update."""

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, swap=False):
        super().__init__(params, learning_rate=learning_rate, betas=tuple(float(b) for b in betas), eps=float(eps),
                         weight_decay=float(weight_decay), swap=swap)
        self.fused = all(p.dtype == ms.float32 for p in self._parameters) and not swap
        self.fused_op = ops.Adam()
        self.beta1_scalar = ops.reshape(self.beta1, ())
        self.beta2_scalar = ops.reshape(self.beta2, ())
        self.eps_scalar = ops.reshape(self.eps, ())

    def construct(self, gradients):
        if not self.fused or self.use_parallel:
            return super().construct(gradients)
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = ops.cast(ops.reshape(self.global_step, ()), ms.float32)
        opt, beta1, beta2, eps = self.fused_op, self.beta1_scalar, self.beta2_scalar, self.eps_scalar
        if self.is_group:
            if self.is_group_lr:
                return self.hyper_map(ops.partial(_fused_adamw, opt, beta1, beta2, eps, step), lr, weight_decay,
                                      self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
            return self.hyper_map(ops.partial(_fused_adamw, opt, beta1, beta2, eps, step, lr), weight_decay,
                                  self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
        return self.hyper_map(ops.partial(_fused_adamw, opt, beta1, beta2, eps, step, lr, weight_decay),
                              self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)
