"""Topology of a loss surface: sublevel-set persistent homology of the 2-D grid (gudhi's cubical
complexes), the bottleneck distance between diagrams, and a summary.

[Note: cubical construction]
The grid's values sit on the vertices of the cubical complex (gudhi ``CubicalComplex(vertices=)``):
each value is the loss at a sampled point, edges join 4-neighbours, and an edge or square enters
the filtration at the largest value of its vertices (the lower-star filtration). A sublevel set's
connected components are therefore 4-connected, and two basins meet at the lowest saddle on a path
along grid lines. Treating values as top-dimensional cells (pixels) instead would connect
diagonal neighbours and give a different H0 diagram on the same grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dldna_fused._plotting import finish_figure


def persistence_diagram(z, dims=(0, 1)) -> dict:
    """``{dim: array of (birth, death) rows}`` of the sublevel-set filtration of the grid ``z``
    (see [Note: cubical construction]); a feature that never dies has death = inf (the global
    minimum's component in H0)."""
    import gudhi

    z = np.asarray(z, dtype=float)
    if z.ndim != 2:
        raise ValueError(f"z must be a 2-D grid, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z has nan or inf values")
    complex_ = gudhi.CubicalComplex(vertices=z)
    complex_.compute_persistence()
    return {d: np.asarray(complex_.persistence_intervals_in_dimension(d), dtype=float).reshape(-1, 2) for d in dims}


def bottleneck_distance(d1, d2, dim: int | None = None):
    """The bottleneck distance between two diagrams (arrays of (birth, death) rows). Points that
    never die are matched among themselves by birth (sorted order is optimal on a line); if the
    two diagrams have different numbers of them the distance is inf. The finite points are matched
    by gudhi's exact algorithm, each may also go to the diagonal.

    Given what :func:`persistence_diagram` returns (``{dim: array}``), as in
    ``bottleneck_distance(persistence_diagram(a), persistence_diagram(b))``: the distance in
    dimension ``dim`` when given, else ``{dim: distance}`` for every dimension of both."""
    if isinstance(d1, dict) or isinstance(d2, dict):
        if not (isinstance(d1, dict) and isinstance(d2, dict)):
            raise TypeError("bottleneck_distance: give two diagrams, or two {dim: diagram} dicts "
                            "(what persistence_diagram returns), not one of each")
        if dim is not None:
            return bottleneck_distance(d1.get(dim, np.empty((0, 2))), d2.get(dim, np.empty((0, 2))))
        return {d: bottleneck_distance(d1.get(d, np.empty((0, 2))), d2.get(d, np.empty((0, 2))))
                for d in sorted(set(d1) | set(d2))}
    return _bottleneck(d1, d2)


def _bottleneck(d1, d2) -> float:
    import gudhi

    d1, d2 = (np.asarray(d, dtype=float).reshape(-1, 2) for d in (d1, d2))
    inf1, inf2 = np.isinf(d1[:, 1]), np.isinf(d2[:, 1])
    if inf1.sum() != inf2.sum():
        return math.inf
    essential = float(np.abs(np.sort(d1[inf1, 0]) - np.sort(d2[inf2, 0])).max()) if inf1.any() else 0.0
    # e=0: gudhi's exact algorithm (its default allows an error in the last bits, so identical
    # diagrams came out ~1e-308 apart).
    finite = float(gudhi.bottleneck_distance(d1[~inf1], d2[~inf2], e=0))
    return max(essential, finite)


def persistence_summary(diagram: dict, threshold: float) -> dict:
    """``minima_above_threshold``: H0 points whose persistence (death - birth) exceeds
    ``threshold``, the never-dying global minimum included; ``longest_finite_lifetime``: the
    largest finite persistence over all dimensions (0 when there is none)."""
    h0 = diagram.get(0, np.empty((0, 2)))
    lifetimes = h0[:, 1] - h0[:, 0]
    finite = [float((d[:, 1] - d[:, 0])[np.isfinite(d[:, 1])].max()) for d in diagram.values()
              if np.isfinite(d[:, 1]).any()]
    return {"minima_above_threshold": int((lifetimes > threshold).sum()),
            "longest_finite_lifetime": max(finite) if finite else 0.0}


def plot_persistence_diagram(diagram: dict, title: str | None = None, save_path: str | Path | None = None,
                             size=(5.5, 5)):
    """Births against deaths per dimension, with the diagonal; points that never die are drawn on
    a line above the others, marked "inf". Returns the figure."""
    import matplotlib.pyplot as plt

    points = np.concatenate([d for d in diagram.values() if len(d)] or [np.zeros((0, 2))])
    finite = points[np.isfinite(points).all(axis=1)]
    lo = float(points[:, 0].min()) if len(points) else 0.0
    hi = float(finite.max()) if len(finite) else lo + 1.0
    top = hi + 0.1 * (hi - lo + 1e-12)
    fig, ax = plt.subplots(figsize=size)
    ax.plot([lo, top], [lo, top], "k--", linewidth=0.8)
    ax.axhline(top, color="0.6", linewidth=0.8)
    ax.text(lo, top, " inf", va="bottom", fontsize=8)
    for dim, d in diagram.items():
        deaths = np.where(np.isinf(d[:, 1]), top, d[:, 1])
        ax.scatter(d[:, 0], deaths, s=18, label=f"H{dim} ({len(d)})", alpha=0.8)
    ax.set_xlabel("birth (loss)")
    ax.set_ylabel("death (loss)")
    ax.legend(fontsize=8)
    return finish_figure(fig, title or "persistence diagram (sublevel sets)", save_path)
