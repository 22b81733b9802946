"""Typed Python entry points of the native ops, and their fake (meta) kernels.

The schemas live in csrc/ops.cpp; importing this module loads ``dldna_fused._C`` so that
``torch.ops.dldna_fused.*`` exist. The fake kernels let torch.compile trace the ops without running
them: the ops mutate their inputs in place and return nothing, so a fake kernel only validates.

Eager calls go through ``_C.EagerOp``, the same dispatcher call as torch.ops with less overhead
per tensor (see [Note: eager calls] in csrc/python_module.cpp); under torch.compile the wrappers
call torch.ops so that Dynamo sees the op.
"""

from __future__ import annotations

import functools
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

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.overload(*args, **kwargs)
        return self.eager(*args, **kwargs)


_adam = _Op("fused_adam_")
_adam_tensor_lr = _Op("fused_adam_", "tensor_lr")
_lion = _Op("fused_lion_")
_sophia = _Op("fused_sophia_")
_sophia_hessian = _Op("fused_sophia_hessian_")
_adafactor = _Op("fused_adafactor_")
_grad_norm = _Op("fused_grad_norm")
_scale = _Op("fused_scale_")
_adam_lowbit = _Op("fused_adam_lowbit_")
_adam_lowbit_tensor_lr = _Op("fused_adam_lowbit_", "tensor_lr")
_lion_lowbit = _Op("fused_lion_lowbit_")


def freeze(tensors: Sequence[torch.Tensor]):
    """``tensors`` converted once for many eager op calls (a ``_C.FrozenTensorList``); the ops'
    eager wrappers take it wherever they take a list. See [Note: eager calls] in
    csrc/python_module.cpp."""
    return _C.FrozenTensorList(list(tensors))


def as_list(tensors) -> list:
    """A Python list of the tensors of ``tensors`` (a list, or a list made by ``freeze``)."""
    return tensors.tensors if isinstance(tensors, _C.FrozenTensorList) else list(tensors)


def grads_of(params: Sequence[torch.Tensor]) -> tuple[list, bool, bytes]:
    """``[p.grad for p in params]`` (None where a param has no grad), whether any grad is not a
    dense (strided) tensor, and a key of which params have a grad and their dtypes and devices (a
    bytes object, 3 per param, zero without a grad; a tuple of bools while compiling, which Dynamo
    traces without a graph break): one native pass."""
    if torch.compiler.is_compiling():
        grads = [p.grad for p in params]
        return (grads, any(g is not None and g.layout != torch.strided for g in grads),
                tuple(g is not None for g in grads))
    return _C.grads_of(params if isinstance(params, list) else list(params))


# The dtypes every kernel takes for params and grads (states may be float32 too).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    clip_coef: torch.Tensor | None = None,
    kahan_comps: Sequence[torch.Tensor] | None = None,
    sr_keys: Sequence[int] | None = None,
) -> None:
    """One Adam (``decoupled_weight_decay=False``) or AdamW step over lists of tensors, in place.

    All lists hold one tensor per parameter (``max_exp_avg_sqs`` may be empty unless ``amsgrad``);
    params share one dtype (float32, bfloat16 or float16) and device; states have the params' dtype
    or float32; ``state_steps`` are float32 one-element tensors on the params' device and are
    incremented by the op. ``grad_scale``/``found_inf`` are GradScaler's: grads are divided by
    ``grad_scale`` (and left so in ``grads`` afterwards, as torch's fused optimizers leave them),
    and a nonzero ``found_inf`` leaves everything untouched. ``clip_coef`` (float32, one element)
    multiplies the gradient the update sees and is never written into ``grads`` (a folded
    ``clip_grad_norm_``).

    For bfloat16 params, ``kahan_comps`` (one compensation per param, of its dtype and shape,
    updated in place) or ``sr_keys`` (one int64 key per param) change how the new params are
    written: Kahan-compensated or stochastically rounded ([Note: bf16 param writes] in
    csrc/common/rounding_math.h; dldna_fused.optim passes them for ``kahan_sum=True`` and
    ``bf16_stochastic_round=True``). Every step op below takes the two as well.
    """
    overload = _adam_tensor_lr if isinstance(lr, torch.Tensor) else _adam
    overload(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
        grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        kahan_comps=kahan_comps, sr_keys=sr_keys,
    )


def fused_lion_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    kahan_comps: Sequence[torch.Tensor] | None = None,
    sr_keys: Sequence[int] | None = None,
) -> None:
    """One Lion step over lists of tensors, in place: ``p *= 1 - lr*wd``,
    ``p -= lr * sign(beta1*m + (1-beta1)*g)``, ``m = beta2*m + (1-beta2)*g``. Lists, dtypes,
    ``state_steps`` (incremented), GradScaler tensors and ``clip_coef`` as in :func:`fused_adam_`."""
    _lion(params, grads, exp_avgs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
          weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
          clip_coef=clip_coef, kahan_comps=kahan_comps, sr_keys=sr_keys)


def fused_sophia_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    bs: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    unclipped: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    kahan_comps: Sequence[torch.Tensor] | None = None,
    sr_keys: Sequence[int] | None = None,
) -> None:
    """One SophiaG step over lists of tensors, in place: ``p *= 1 - lr*wd``,
    ``m = beta1*m + (1-beta1)*g``, ``p -= lr * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1)``.
    ``hessians`` are read only. ``unclipped`` (int64, one element), when given, is increased by the
    number of coordinates whose ratio was below 1. Otherwise as :func:`fused_adam_`."""
    _sophia(params, grads, exp_avgs, hessians, state_steps, lr=lr, beta1=beta1, rho=rho, bs=bs,
            weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
            unclipped=unclipped, clip_coef=clip_coef, kahan_comps=kahan_comps, sr_keys=sr_keys)


def fused_sophia_hessian_(
    hessians: Sequence[torch.Tensor],
    estimates: Sequence[torch.Tensor],
    *,
    beta2: float,
    square: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """SophiaG's Hessian EMA over lists, in place: ``h = beta2*h + (1-beta2)*e`` with
    ``e = (x/grad_scale)**2`` when ``square`` (GNB: ``estimates`` are gradients) and
    ``e = x/grad_scale`` otherwise (Hutchinson: ``estimates`` are ``z * Hz``). A nonzero
    ``found_inf`` leaves the hessians untouched."""
    _sophia_hessian(hessians, estimates, beta2=beta2, square=square, grad_scale=grad_scale,
                    found_inf=found_inf)


def fused_adafactor_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg_sq_rows: Sequence[torch.Tensor],
    exp_avg_sq_cols: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    rms: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | None,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    kahan_comps: Sequence[torch.Tensor] | None = None,
    sr_keys: Sequence[int] | None = None,
) -> None:
    """One AdaFactor step (transformers/fairseq semantics) over lists of tensors, in place.

    A call is factored (``exp_avg_sq_rows``/``exp_avg_sq_cols`` hold each param's row and column
    statistics over its last two dims, ``exp_avg_sqs`` is empty) or unfactored (the reverse).
    ``exp_avgs`` is empty unless ``beta1`` is given; ``rms`` (float32, one element per param)
    receives RMS(p) before the step; ``lr`` is required exactly when ``relative_step`` is false.
    States are float32 whatever the params' dtype. Steps and GradScaler tensors as in
    :func:`fused_adam_`.
    """
    _adafactor(params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, rms, state_steps,
               lr=lr, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold, decay_rate=decay_rate,
               beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
               relative_step=relative_step, warmup_init=warmup_init, grad_scale=grad_scale,
               found_inf=found_inf, clip_coef=clip_coef, kahan_comps=kahan_comps, sr_keys=sr_keys)


def fused_grad_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0,
                    grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The ``norm_type`` norm (1, 2 or inf) of all ``tensors`` together, as if they were one
    vector: a 0-dim float32 tensor on their device, divided by ``grad_scale`` when given.
    ``tensors`` share one dtype (float32, bfloat16, float16) and device and are not empty.
    Accumulated in fp32 lanes and double partials, in a fixed order: the same bits for any
    thread count. On CUDA nothing is read back to the host."""
    return _grad_norm(tensors, norm_type, grad_scale=grad_scale)


def fused_scale_(tensors: Sequence[torch.Tensor], factor: torch.Tensor) -> None:
    """``tensors *= factor`` in place, in one multi-tensor pass: ``factor`` a float32 tensor of
    one element on their device (read there on CUDA); tensors of one dtype and device."""
    _scale(tensors, factor)


def fused_adam_lowbit_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_absmaxes: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    exp_avg_sq_absmaxes: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    bits: int,
    block_size: int,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    kahan_comps: Sequence[torch.Tensor] | None = None,
    sr_keys: Sequence[int] | None = None,
) -> None:
    """:func:`fused_adam_` (without amsgrad) with blockwise-quantized states: ``exp_avgs`` /
    ``exp_avg_sqs`` are contiguous uint8 codes (one per element at 8 bits, two per byte at 4) and
    the absmax lists float32, one per block of ``block_size`` elements (see
    :func:`dldna_fused.quantization.quantize_blockwise`)."""
    overload = _adam_lowbit_tensor_lr if isinstance(lr, torch.Tensor) else _adam_lowbit
    overload(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes, state_steps,
             lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize,
             decoupled_weight_decay=decoupled_weight_decay, bits=bits, block_size=block_size,
             grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, kahan_comps=kahan_comps, sr_keys=sr_keys)


def fused_lion_lowbit_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_absmaxes: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    bits: int,
    block_size: int,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    kahan_comps: Sequence[torch.Tensor] | None = None,
    sr_keys: Sequence[int] | None = None,
) -> None:
    """:func:`fused_lion_` with a blockwise-quantized ``exp_avg`` (as in :func:`fused_adam_lowbit_`)."""
    _lion_lowbit(params, grads, exp_avgs, exp_avg_absmaxes, state_steps, lr=lr, beta1=beta1, beta2=beta2,
                 weight_decay=weight_decay, maximize=maximize, bits=bits, block_size=block_size,
                 grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, kahan_comps=kahan_comps, sr_keys=sr_keys)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, bits: int, signed: bool,
                         block_size: int, numel: int) -> torch.Tensor:
    """float32 values (``numel``, flat) of blockwise codes; see dldna_fused.quantization."""
    return torch.ops.dldna_fused.dequantize_blockwise(codes, absmax, bits=bits, signed=signed,
                                                      block_size=block_size, numel=numel)


def quantize_blockwise(x: torch.Tensor, *, bits: int, signed: bool, block_size: int):
    """(uint8 codes, float32 absmax) of ``x`` flattened; see dldna_fused.quantization."""
    return torch.ops.dldna_fused.quantize_blockwise(x, bits=bits, signed=signed, block_size=block_size)


# [Note: meta kernels and mixed devices]
# The fake kernels below serve torch.compile (FakeTensors standing for tensors on any device) and
# the Meta dispatch key. The dispatcher picks the Meta kernel whenever any argument is on meta, so
# a call with CPU params and one meta grad reached a kernel that only checks shapes, and returned
# having done nothing. Each fake kernel therefore first checks that no tensor is a real one off
# meta (_check_meta_call); the real kernels check that every tensor is on the params' device
# (csrc/common/checks.cpp), so a meta tensor among CPU or CUDA ones is refused on every path.
_FakeTensor = torch._subclasses.fake_tensor.FakeTensor


def _check_meta_call(qualified: str, args: tuple, kwargs: dict) -> None:
    """Raises naming the argument when a call that dispatched to the Meta kernel has a real tensor
    that is not on meta (see [Note: meta kernels and mixed devices])."""
    name, _, overload = qualified.partition(".")
    op = getattr(getattr(torch.ops.dldna_fused, name.split("::")[1]), overload or "default")
    names = [a.name for a in op._schema.arguments]
    for arg_name, value in [*zip(names, args), *kwargs.items()]:
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and not isinstance(t, _FakeTensor) and t.device.type != "meta":
                where = arg_name if tensors is not value else f"{arg_name}[{i}]"
                raise RuntimeError(f"{qualified}: {where} is on {t.device} but another argument is on meta; "
                                   "every tensor of one call must be on one device")


def _register_fake(qualified: str):
    """torch.library.register_fake for ``qualified``, with the mixed-device check first."""
    def register(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            _check_meta_call(qualified, args, kwargs)
            return fn(*args, **kwargs)
        return torch.library.register_fake(qualified)(checked)
    return register


def _check_lists_fake(params, grads, *states):
    torch._check(len(grads) == len(params), lambda: "grads must have one tensor per param")
    for p, g in zip(params, grads):
        torch._check(g.shape == p.shape, lambda: f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
    for state in states:
        torch._check(len(state) in (0, len(params)), lambda: "each state list must have one tensor per param")


@_register_fake("dldna_fused::fused_adam_")
def _fused_adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::fused_adam_.tensor_lr")
def _fused_adam_tensor_lr_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::fused_lion_")
def _fused_lion_fake(params, grads, exp_avgs, state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::fused_sophia_")
def _fused_sophia_fake(params, grads, exp_avgs, hessians, state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, hessians, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::fused_sophia_hessian_")
def _fused_sophia_hessian_fake(hessians, estimates, **_):
    _check_lists_fake(hessians, estimates)


@_register_fake("dldna_fused::fused_adafactor_")
def _fused_adafactor_fake(params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, rms,
                          state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_sqs, rms, state_steps, kahan_comps or [])
    torch._check(len(exp_avg_sq_rows) == len(exp_avg_sq_cols),
                 lambda: "exp_avg_sq_rows and exp_avg_sq_cols must have the same length")


@_register_fake("dldna_fused::fused_grad_norm")
def _fused_grad_norm_fake(tensors, norm_type, grad_scale=None):
    torch._check(len(tensors) > 0, lambda: "tensors must not be empty")
    return tensors[0].new_empty((), dtype=torch.float32)


@_register_fake("dldna_fused::fused_scale_")
def _fused_scale_fake(tensors, factor):
    torch._check(factor.numel() == 1, lambda: "factor must have one element")


@_register_fake("dldna_fused::fused_adam_lowbit_")
def _fused_adam_lowbit_fake(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                            state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::fused_adam_lowbit_.tensor_lr")
def _fused_adam_lowbit_tensor_lr_fake(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs,
                                      exp_avg_sq_absmaxes, state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::fused_lion_lowbit_")
def _fused_lion_lowbit_fake(params, grads, exp_avgs, exp_avg_absmaxes, state_steps, kahan_comps=None, **_):
    _check_lists_fake(params, grads, exp_avgs, exp_avg_absmaxes, state_steps, kahan_comps or [])


@_register_fake("dldna_fused::quantize_blockwise")
def _quantize_blockwise_fake(input, *, bits, signed, block_size):
    n = input.numel()
    return (input.new_empty((n if bits == 8 else (n + 1) // 2,), dtype=torch.uint8),
            input.new_empty((-(-n // block_size),), dtype=torch.float32))


@_register_fake("dldna_fused::dequantize_blockwise")
def _dequantize_blockwise_fake(codes, absmax, *, bits, signed, block_size, numel):
    return absmax.new_empty((numel,), dtype=torch.float32)
