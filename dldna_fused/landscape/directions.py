"""Directions in weight space for loss surfaces: filter-normalized random directions (Li et al.
2018) and the Hessian's eigenvectors, with optional orthogonalization."""

from __future__ import annotations

import torch
from torch import nn

from dldna_fused.landscape._vectors import dot as _dot
from dldna_fused.landscape._vectors import trainable as _params


def filter_normalize(direction: list[torch.Tensor], model: nn.Module, one_dim: str = "zero") -> list[torch.Tensor]:
    """Li et al. (2018)'s filter normalization, per parameter of ``model``: each output slice
    (a row of a Linear weight, a filter of a conv weight: index 0) of the direction is rescaled to
    the norm of the same slice of the weight, d_i <- d_i * ||theta_i|| / (||d_i|| + 1e-10).
    Parameters of one dimension (biases, norm scales) are zeroed (``one_dim="zero"``, the paper's
    choice) or normalized as a single slice (``"keep"``)."""
    if one_dim not in ("zero", "keep"):
        raise ValueError(f"one_dim must be 'zero' or 'keep', got {one_dim!r}")
    out = []
    for d, p in zip(direction, _params(model)):
        d = d.clone()
        if p.dim() <= 1:
            if one_dim == "zero":
                d.zero_()
            else:
                d.mul_(p.detach().norm() / (d.norm() + 1e-10))
        else:
            theta = p.detach().reshape(p.shape[0], -1)
            flat = d.reshape(d.shape[0], -1)
            flat.mul_((theta.norm(dim=1) / (flat.norm(dim=1) + 1e-10)).unsqueeze(1))
        out.append(d)
    return out


def random_directions(model: nn.Module, n: int = 2, seed: int = 0, normalize: str | None = "filter",
                      one_dim: str = "zero", orthogonalize: bool = False) -> list[list[torch.Tensor]]:
    """``n`` Gaussian directions shaped like ``model``'s parameters, filter-normalized
    (``normalize="filter"``, see ``filter_normalize``) or raw (``None``); with ``orthogonalize``
    each is made orthogonal to the previous ones (Gram-Schmidt over all parameters, then
    normalized again, so the second direction keeps its scale but loses its component along the
    first)."""
    generator = torch.Generator().manual_seed(seed)
    params = _params(model)
    directions = []
    for _ in range(n):
        d = [torch.randn(p.shape, generator=generator).to(p) for p in params]
        if normalize == "filter":
            d = filter_normalize(d, model, one_dim)
        elif normalize is not None:
            raise ValueError(f"normalize must be 'filter' or None, got {normalize!r}")
        directions.append(d)
    if orthogonalize:
        directions = orthogonalize_directions(directions)
    return directions


def orthogonalize_directions(directions: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Gram-Schmidt over the flattened directions: each keeps its norm but loses its components
    along the earlier ones."""
    out: list[list[torch.Tensor]] = []
    for d in directions:
        norm = torch.sqrt(_dot(d, d))
        for u in out:
            coef = _dot(u, d) / _dot(u, u)
            d = [x - coef * y for x, y in zip(d, u)]
        new_norm = torch.sqrt(_dot(d, d))
        out.append([x * (norm / new_norm) for x in d] if new_norm > 0 else d)
    return out
