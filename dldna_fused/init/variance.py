"""Variance propagation: how the variance of the signal changes with depth, forward (each weight
layer's output) and backward (the gradient with respect to that output). The chapter's
variance-preservation principle says both should stay flat."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dldna_fused._plotting import finish_figure
from dldna_fused.init.methods import weight_layers


def variance_propagation(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, loss_func=None,
                         seed: int = 0) -> dict:
    """Per weight layer (in module order): ``forward`` = Var of its output (pre-activation) over the
    batch ``x``, and ``backward`` = Var of the gradient with respect to that output.

    The backward pass starts from ``loss_func(model(x), y)`` when both are given, otherwise from a
    standard normal gradient at the model's output (seeded), which isolates the network's own
    backward gain from the loss. The model runs in eval mode and its mode is restored; its
    parameters and their .grad are left as they were.
    """
    layers = weight_layers(model)
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        outputs.append(output)

    handles = [layer.register_forward_hook(keep) for _, layer in layers]
    was_training = model.training
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = None  # backward would accumulate into a saved grad in place
    model.eval()
    try:
        with torch.enable_grad():
            out = model(x)
            if y is not None and loss_func is not None:
                loss_func(out, y).backward()
            else:
                g = torch.Generator(device=out.device).manual_seed(seed)
                out.backward(torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype))
        forward = [o.detach().var().item() for o in outputs]
        backward = [o.grad.var().item() if o.grad is not None else float("nan") for o in outputs]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    return {"layers": [name for name, _ in layers], "forward": forward, "backward": backward}


def plot_variance_propagation(results: dict, title: str | None = None, save_path: str | Path | None = None):
    """Forward and backward variance against depth (log scale), one line per method;
    ``results`` maps a method's name to its ``variance_propagation`` dict. Returns the figure."""
    import matplotlib.pyplot as plt

    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, key, what in zip(axes, ("forward", "backward"), ("forward: Var(layer output)", "backward: Var(dL/d output)")):
        curves = {name: np.asarray(r[key], dtype=float) for name, r in results.items()}
        # A method that explodes (l-momentum reaches ~1e35) would squash the others into a line:
        # the axis spans the methods within 1e8 of their median start, the rest run off it and
        # their legend entries say how far they go.
        starts = np.median([c[np.isfinite(c) & (c > 0)][0] for c in curves.values() if (np.isfinite(c) & (c > 0)).any()])
        sane = [c for c in curves.values() if np.all(np.isfinite(c)) and c.max() < starts * 1e8 and c.min() > starts * 1e-8]
        for name, c in curves.items():
            label = name
            if sane and not any(c is s for s in sane):
                extreme = c.max() if c.max() > starts else c.min()
                label = f"{name} (off scale: {extreme:.0e})"
            ax.plot(range(1, len(c) + 1), c, marker="o", markersize=3, label=label)
        if sane and len(sane) < len(curves):
            low, high = min(s.min() for s in sane), max(s.max() for s in sane)
            ax.set_ylim(low / 10, high * 10)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(what)
        ax.grid(alpha=0.3, which="both")
        # Below the axes: inside, the legend covered the curves of the deep layers.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return finish_figure(fig, title, save_path)
