"""Spectral diagnostics of weight matrices: condition number, spectral norm, effective rank
(Roy & Vetterli 2007), its ratio to the full rank, and stable rank; per layer and per model."""

from __future__ import annotations

import math

import torch
from torch import nn

from dldna_fused.init.methods import weight_layers

METRICS = ("condition_number", "spectral_norm", "effective_rank", "effective_rank_ratio", "stable_rank")


def weight_diagnostics(weight: torch.Tensor) -> dict:
    """Diagnostics of one weight from its singular values sigma (float64 SVD).

    A conv weight ``out x in x kh x kw`` is taken as the ``out x (in*kh*kw)`` matrix (each output
    filter a row). Returns ``condition_number`` = sigma_max / sigma_min over the min(m, n) singular
    values (inf when sigma_min = 0), ``spectral_norm`` = sigma_max, ``effective_rank`` =
    exp(-sum p_i ln p_i) with p = sigma / sum(sigma) (Roy & Vetterli 2007; 1 for rank one, n for
    the n x n identity), ``effective_rank_ratio`` = effective_rank / min(m, n) and
    ``stable_rank`` = ||W||_F^2 / sigma_max^2.
    """
    w = weight.detach().reshape(weight.shape[0], -1).double() if weight.dim() > 1 else weight.detach().double()[None]
    sigma = torch.linalg.svdvals(w)
    s_max = sigma.max().item() if sigma.numel() else 0.0
    s_min = sigma.min().item() if sigma.numel() else 0.0
    if s_max == 0.0:
        return dict(condition_number=math.nan, spectral_norm=0.0, effective_rank=0.0, effective_rank_ratio=0.0,
                    stable_rank=0.0)
    p = sigma / sigma.sum()
    p = p[p > 0]
    effective_rank = math.exp(-(p * p.log()).sum().item())
    return dict(
        condition_number=s_max / s_min if s_min > 0 else math.inf,
        spectral_norm=s_max,
        effective_rank=effective_rank,
        effective_rank_ratio=effective_rank / min(w.shape),
        stable_rank=(sigma.square().sum() / s_max**2).item(),
    )


def model_diagnostics(model: nn.Module) -> dict:
    """``{"layers": [{"name", "shape", **weight_diagnostics}], "mean": {metric: mean over layers},
    "max": {...}}`` over the model's Linear and Conv weights."""
    layers = []
    for name, layer in weight_layers(model):
        layers.append({"name": name, "shape": list(layer.weight.shape), **weight_diagnostics(layer.weight)})
    summary = {"layers": layers, "mean": {}, "max": {}}
    for metric in METRICS:
        values = [layer[metric] for layer in layers]
        summary["mean"][metric] = sum(values) / len(values) if values else math.nan
        summary["max"][metric] = max(values) if values else math.nan
    return summary


def format_model_diagnostics(summary: dict) -> str:
    """The per-layer table of ``model_diagnostics`` with its mean row."""
    header = f"{'layer':<20}{'shape':<18}" + "".join(f"{m:>22}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for layer in summary["layers"]:
        lines.append(f"{layer['name']:<20}{'x'.join(map(str, layer['shape'])):<18}"
                     + "".join(f"{layer[m]:>22.4g}" for m in METRICS))
    lines.append(f"{'mean':<38}" + "".join(f"{summary['mean'][m]:>22.4g}" for m in METRICS))
    return "\n".join(lines)
