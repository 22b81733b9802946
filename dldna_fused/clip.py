"""Gradient clipping with the fused multi-tensor norm: a drop-in for
``torch.nn.utils.clip_grad_norm_``, and the norm the optimizers' ``max_grad_norm`` folds into
their step."""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Iterable

import torch

from dldna_fused import _C, ops
from dldna_fused._devices import scalar_to
from dldna_fused._distributed import dtensor_type

# The norms fused_grad_norm computes; others go to torch.
_FUSED_NORMS = (1.0, 2.0, float("inf"))


def _fused_ops_take(tensors: list) -> bool:
    """Whether fused_grad_norm/fused_scale_ take ``tensors`` (of one device and dtype): plain dense
    tensors of a dtype the kernels have, on a device with a kernel. Others (float64 grads) take
    torch's path."""
    return (ops.has_kernel(tensors[0].device.type) and tensors[0].dtype in ops.KERNEL_DTYPES
            and all(type(t) is torch.Tensor and t.layout == torch.strided for t in tensors))


def get_total_norm(tensors: Iterable[torch.Tensor], norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None, *, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The norm of all ``tensors`` together, as ``torch.nn.utils.get_total_norm`` returns it (on
    the first tensor's device, in the tensors' promoted dtype; ``tensor(0.)`` for none).

    Norms 1, 2 and inf of plain tensors on a device with a kernel take one fused pass per (device,
    dtype) (``ops.fused_grad_norm``); other norms and tensor subclasses (DTensor under FSDP2, whose
    norm torch reduces over the mesh) use torch's own. ``grad_scale`` divides the norm (the norm of
    GradScaler-unscaled gradients). ``foreach`` is accepted for compatibility.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    common = None if torch.compiler.is_compiling() else _C.common_device_dtype(tensors)
    if common is not None and norm_type in _FUSED_NORMS and ops.has_kernel(common[0].type) \
            and common[1] in ops.KERNEL_DTYPES:
        # One device, one dtype, plain tensors: one op call, without the grouping below.
        scale = None if grad_scale is None else grad_scale.to(device=common[0], dtype=torch.float32)
        total = ops.fused_grad_norm(tensors, norm_type, grad_scale=scale).to(common[1])
        return _checked(total, norm_type, error_if_nonfinite)
    first_device = tensors[0].device
    result_dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    norms = []
    for (device, _), group in groups.items():
        scale = None if grad_scale is None else scalar_to(grad_scale, device)
        if norm_type in _FUSED_NORMS and _fused_ops_take(group):
            norms.append(ops.fused_grad_norm(group, norm_type, grad_scale=scale))
            continue
        DTensor = dtensor_type()
        if DTensor is not None and any(isinstance(t, DTensor) for t in group):
            norm = torch.nn.utils.get_total_norm(group, norm_type, foreach=foreach)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, norm_type) for t in group]),
                                            norm_type)
        norms.append(norm if scale is None else norm / scale.reshape(()))
    if len(norms) == 1:
        total = norms[0].to(first_device)
    else:
        total = torch.linalg.vector_norm(torch.stack([n.float().to(first_device) for n in norms]), norm_type)
    return _checked(total.to(result_dtype), norm_type, error_if_nonfinite)


def _checked(total: torch.Tensor, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    return total


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))``, torch's clip factor, as a tensor (no host sync)."""
    return torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    r"""Drop-in for :func:`torch.nn.utils.clip_grad_norm_`: computes the norm of all gradients of
    ``parameters`` together, as one vector, and scales them in place by
    :math:`\min(1, \text{max\_norm} / (\lVert g \rVert + 10^{-6}))`. Returns the total norm
    (before clipping) as torch does, with the same edge cases: no gradients give ``tensor(0.)``, a
    non-finite norm raises with ``error_if_nonfinite=True`` and otherwise scales by it.

    The norm (1, 2 or inf) is one fused multi-tensor pass per (device, dtype), accumulated in
    fp32/double and deterministic for any thread count; other norms, and DTensor gradients (FSDP2,
    where the norm is the global one over the mesh), use torch's. The gradients are then scaled
    in place, as torch does (also by a factor of 1: deciding otherwise would read the norm back
    from the device). To skip this second pass over the gradients altogether, give the optimizer
    ``max_grad_norm`` instead: the factor then goes into the step's kernel.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [g for g in _C.grads_of(parameters, check=False)[0] if g is not None]
    DTensor = dtensor_type()
    if DTensor is not None and any(isinstance(g, DTensor) for g in grads):
        # FSDP2: torch's reduces the norm over the mesh and returns it as torch does (a DTensor).
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    if not grads:
        return total_norm
    coefficient = clip_coefficient(total_norm, max_norm)
    common = _C.common_device_dtype(grads)
    if common is not None and ops.has_kernel(common[0].type) and common[1] in ops.KERNEL_DTYPES:
        ops.fused_scale_(grads, coefficient.to(device=common[0], dtype=torch.float32))
        return total_norm
    groups: dict = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        factor = coefficient.to(device=device, dtype=torch.float32)
        if _fused_ops_take(group):
            ops.fused_scale_(group, factor)  # one multi-tensor pass
        else:
            torch._foreach_mul_(group, factor)
    return total_norm
