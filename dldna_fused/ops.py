"""Typed Python entry points of the native ops, and their fake (meta) kernels.

The schemas live in csrc/ops.cpp; importing this module loads ``dldna_fused._C`` so that
``torch.ops.dldna_fused.*`` exist. The fake kernels let torch.compile trace the ops without running
them: the ops mutate their inputs in place and return nothing, so a fake kernel only validates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dldna_fused import _C  # noqa: F401  (registers the ops)

_adam = torch.ops.dldna_fused.fused_adam_


def has_kernel(device_type: str) -> bool:
    """Whether the fused ops have a kernel for ``device_type`` ("cpu", "cuda") in this build."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
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
    overload = _adam.tensor_lr if isinstance(lr, torch.Tensor) else _adam.default
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
