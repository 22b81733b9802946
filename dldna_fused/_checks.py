"""Argument checks shared by the fused optimizers and the references: each raises TypeError or
ValueError naming the argument, and the common ones lead with torch.optim's wording of the same
error, so code (and torch's own error-input tests) that match torch's messages keep working."""

from __future__ import annotations

import numbers
from typing import Any

import torch


def _real(name: str, value: Any, *, allow_tensor: bool) -> float | None:
    """``value`` as a float, or None for a one-element tensor off the CPU (read on its device, so
    reading it here would cost a host sync). Raises TypeError/ValueError naming ``name``."""
    if isinstance(value, torch.Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a float, not a Tensor")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got {value.numel()} elements")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"Tensor {name} must hold a real number, got dtype {value.dtype}")
        return float(value) if value.device.type == "cpu" else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_hyperparameter(name: str, value: Any, low: float, high: float | None = None, *, high_open=True,
                         low_open=False, allow_tensor=False, torch_text: str | None = None) -> None:
    """Raise unless low <= value (< or <=) high (``low_open``: low < value), naming ``name``; NaN
    is never in range. ``torch_text`` leads the message with torch.optim's wording of the same
    error (e.g. "Invalid learning rate"), so code matching torch's messages keeps working."""
    v = _real(name, value, allow_tensor=allow_tensor)
    if v is None:
        return
    ok = (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))
    if not ok:
        if high is not None:
            bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        else:
            bound = f"{'>' if low_open else '>='} {low}"
        lead = f"{torch_text}: {value} ({name} must be {bound})" if torch_text else f"{name} must be {bound}, got {value}"
        raise ValueError(lead)


def check_lr(lr: Any, *, allow_tensor: bool) -> None:
    check_hyperparameter("lr", lr, 0.0, allow_tensor=allow_tensor, torch_text="Invalid learning rate")


def check_weight_decay(weight_decay: Any) -> None:
    check_hyperparameter("weight_decay", weight_decay, 0.0, torch_text="Invalid weight_decay value")


def check_betas(betas, *, allow_tensors: bool = True) -> None:
    """Raise ValueError naming betas unless it is a pair of numbers (or, as torch.optim allows, of
    one-element Tensors) in [0, 1)."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        check_hyperparameter(f"betas[{i}]", beta, 0.0, 1.0, allow_tensor=allow_tensors,
                             torch_text=f"Invalid beta parameter at index {i}")


def scalar(value) -> float:
    """A hyperparameter the ops take as a double: a number, or a one-element tensor read on the
    host (betas given as tensors; a CUDA tensor costs one sync)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
