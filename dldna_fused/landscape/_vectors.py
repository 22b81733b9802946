"""Vectors in weight space as lists of per-parameter tensors, and their arithmetic."""

from __future__ import annotations

import torch
from torch import nn


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters a direction or a Hessian covers: those that require grad, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(a: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(dot(a, a))


def axpy(alpha, x: list[torch.Tensor], y: list[torch.Tensor]) -> list[torch.Tensor]:
    """y + alpha * x."""
    return [yi + alpha * xi for xi, yi in zip(x, y)]
