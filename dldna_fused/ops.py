"""Typed Python entry points of the native ops, and their fake (meta) kernels.

The schemas live in csrc/ops.cpp; importing this module loads ``dldna_fused._C`` so that
``torch.ops.dldna_fused.*`` exist. The fake kernels let torch.compile trace the ops without running
them: the ops mutate their inputs in place and return nothing, so a fake kernel only validates.

Eager calls go through ``_C.EagerOp``, the same dispatcher call as torch.ops with less overhead
per tensor (see [Note: eager calls] in csrc/python_module.cpp); under torch.compile the wrappers
call torch.ops so that Dynamo sees the op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dldna_fused import _C  # registers the ops


class _Op:
    """One overload of a dldna_fused op: ``torch.ops`` while compiling (lists must then be Python
    lists), EagerOp otherwise (lists may also be frozen, see ``freeze``)."""

    __slots__ = ("overload", "eager")

    def __init__(self, name: str, overload: str = "default"):
        self.overload = getattr(getattr(torch.ops.dldna_fused, name), overload)
        self.eager = _C.EagerOp(f"dldna_fused::{name}", "" if overload == "default" else overload,
                                self.overload)

    def __call__(self, *args, **kwargs) -> None:
        if torch.compiler.is_compiling():
            self.overload(*args, **kwargs)
        else:
            self.eager(*args, **kwargs)


_adam = _Op("fused_adam_")
_adam_tensor_lr = _Op("fused_adam_", "tensor_lr")


def freeze(tensors: Sequence[torch.Tensor]):
    """``tensors`` converted once for many eager op calls (a ``_C.FrozenTensorList``); the ops'
    eager wrappers take it wherever they take a list. See [Note: eager calls] in
    csrc/python_module.cpp."""
    return _C.FrozenTensorList(list(tensors))


def grads_of(params: Sequence[torch.Tensor]) -> tuple[list, bool, bytes]:
    """``[p.grad for p in params]`` (None where a param has no grad), whether any grad is not a
    dense (strided) tensor, and a bytes object with 1 where a param has a grad: one native pass."""
    if torch.compiler.is_compiling():
        grads = [p.grad for p in params]
        return (grads, any(g is not None and g.layout != torch.strided for g in grads),
                bytes(g is not None for g in grads))
    return _C.grads_of(params if isinstance(params, list) else list(params))


def has_kernel(device_type: str) -> bool:
    """Whether the fused ops have a kernel for ``device_type`` ("cpu", "cuda") in this build."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    # Every op is built for the same devices (csrc/sources.cmake), so one op answers for all.
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dldna_fused::fused_adam_", key
    )


def fused_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One Adam (``decoupled_weight_decay=False``) or AdamW step over lists of tensors, in place.

    All lists hold one tensor per parameter (``max_exp_avg_sqs`` may be empty unless ``amsgrad``);
    params share one dtype (float32, bfloat16 or float16) and device; states have the params' dtype
    or float32; ``state_steps`` are float32 one-element tensors on the params' device and are
    incremented by the op. ``grad_scale``/``found_inf`` are GradScaler's: grads are divided by
    ``grad_scale``, and a nonzero ``found_inf`` leaves everything untouched.
    """
    overload = _adam_tensor_lr if isinstance(lr, torch.Tensor) else _adam
    overload(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def _check_lists_fake(params, grads, *states):
    torch._check(len(grads) == len(params), lambda: "grads must have one tensor per param")
    for p, g in zip(params, grads):
        torch._check(g.shape == p.shape, lambda: f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
    for state in states:
        torch._check(len(state) in (0, len(params)), lambda: "each state list must have one tensor per param")


@torch.library.register_fake("dldna_fused::fused_adam_")
def _fused_adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)


@torch.library.register_fake("dldna_fused::fused_adam_.tensor_lr")
def _fused_adam_tensor_lr_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
