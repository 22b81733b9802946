"""Figures of loss surfaces and interpolations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dldna_fused._plotting import finish_figure


def visualize_loss_surface(data, name: str, color: str = "C0", alpha: float = 0.6, plot_3d: bool = True,
                           levels: int = 20, size=None, save_path: str | Path | None = None, labels=None):
    """One panel per (X, Y, Z) surface in ``data`` (e.g. one per pair of Hessian eigenvectors):
    a 3-D surface (``plot_3d``) or filled contours with labelled contour lines. ``labels`` name
    the panels' directions (default "directions 1-2", "3-4", ...). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(data)
    fig = plt.figure(figsize=size or (5 * n, 4.4))
    for k, (X, Y, Z) in enumerate(data):
        label = labels[k] if labels else f"directions {2 * k + 1}-{2 * k + 2}"
        if plot_3d:
            ax = fig.add_subplot(1, n, k + 1, projection="3d")
            ax.plot_surface(X, Y, Z, color=color, alpha=alpha, linewidth=0, antialiased=True)
            ax.set_zlabel("loss")
            # Fewer, smaller ticks: the default ones ran into each other at this size.
            for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
                axis.set_major_locator(MaxNLocator(4))
            ax.tick_params(labelsize=7)
        else:
            ax = fig.add_subplot(1, n, k + 1)
            filled = ax.contourf(X, Y, Z, levels=levels, cmap="viridis")
            lines = ax.contour(X, Y, Z, levels=levels, colors="k", linewidths=0.4)
            # Every third line labelled: all of them piled up where the lines crowd (the corners).
            ax.clabel(lines, lines.levels[::3], inline=True, fontsize=6, fmt="%.2f")
            fig.colorbar(filled, ax=ax, label="loss")
            ax.plot(0, 0, "r+", markersize=10)
        ax.set_xlabel("lambda 1")
        ax.set_ylabel("lambda 2")
        ax.set_title(f"{name}: {label}")
    return finish_figure(fig, None, save_path)


def visualize_linear_interpolation(alphas, losses, accuracies, name: str, size=(6, 4),
                                   save_path: str | Path | None = None):
    """Loss (left axis) and accuracy (right axis) along the interpolation. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.plot(alphas, losses, "o-", color="C0", markersize=3, label="loss")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss", color="C0")
    twin = ax.twinx()
    twin.plot(alphas, np.asarray(accuracies) * 100, "s-", color="C1", markersize=3, label="accuracy")
    twin.set_ylabel("accuracy (%)", color="C1")
    ax.grid(alpha=0.3)
    return finish_figure(fig, f"linear interpolation: {name}", save_path)
