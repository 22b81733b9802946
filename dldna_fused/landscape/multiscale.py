"""Multi-scale analysis of a loss surface: a 2-D discrete wavelet decomposition (pywt.wavedec2)
into a coarse approximation and per-level details, with the energy of each level as a roughness
figure."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dldna_fused._plotting import finish_figure


def decompose_surface(z, wavelet: str = "db2", levels: int | None = None, mode: str = "symmetric") -> dict:
    """``pywt.wavedec2(z, wavelet, mode, level)`` with the level clamped to ``pywt.dwt_max_level``
    (pywt itself only warns and returns unreliable coefficients beyond it; we clamp and warn).

    Returns ``coefficients`` (pywt's list: approximation, then (H, V, D) details from the coarsest
    level to the finest), ``level``, and ``energy``: the sum of squares of the approximation
    (``approximation``) and of each level's three detail arrays (``details``, coarsest first), the
    surface's own (``total``), and each part as a fraction of all coefficients' energy
    (``fractions``: approximation first, then the details), the roughness profile.

    ``mode`` is pywt's boundary extension. The default, "symmetric" (pywt's), mirrors the surface
    at its borders, so a smooth bowl has almost no detail energy (0.5% of the coefficients'
    energy for a 32 x 32 quadratic bowl with db2); but the extension adds coefficients at every
    level (the level-3 approximation of a 32 x 32 grid is 6 x 6, not 4 x 4), so the parts add up
    to more than ``total``: compare levels by their ``fractions``. With an orthogonal wavelet
    (db*, sym*, coif*, haar), ``mode="periodization"`` and both sizes divisible by 2^level the
    transform is orthogonal and the parts add up to ``total`` exactly, at the price of a seam at
    the borders that shows up as detail energy (1.6% on the same bowl).
    """
    import pywt

    z = np.asarray(z, dtype=float)
    if z.ndim != 2:
        raise ValueError(f"z must be a 2-D grid, got shape {z.shape}")
    w = pywt.Wavelet(wavelet)
    max_level = pywt.dwt_max_level(min(z.shape), w.dec_len)
    if max_level < 1:
        raise ValueError(f"a {z.shape} grid is too small for one level of {wavelet} (filter length {w.dec_len})")
    level = max_level if levels is None else int(levels)
    if level > max_level:
        warnings.warn(f"levels={level} exceeds pywt.dwt_max_level={max_level} for a {z.shape} grid and "
                      f"{wavelet}; using {max_level}", stacklevel=2)
        level = max_level
    if level < 1:
        raise ValueError(f"levels must be >= 1, got {level}")
    coefficients = pywt.wavedec2(z, w, mode=mode, level=level)
    approximation = float((coefficients[0] ** 2).sum())
    details = [float(sum((d**2).sum() for d in triple)) for triple in coefficients[1:]]
    parts = approximation + sum(details)
    return {"coefficients": coefficients, "level": level,
            "energy": {"approximation": approximation, "details": details, "total": float((z**2).sum()),
                       "fractions": [v / parts if parts > 0 else 0.0 for v in [approximation, *details]]}}


def plot_multiscale(decomposition: dict, title: str | None = None, save_path: str | Path | None = None):
    """The approximation and, per level, the detail magnitude sqrt(H^2 + V^2 + D^2). Returns the
    figure."""
    import matplotlib.pyplot as plt

    coefficients = decomposition["coefficients"]
    n = len(coefficients)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    # Every level covers the whole plane: with the surface's grid known, the axes are its lambdas.
    X, Y, _ = decomposition.get("surface", (None, None, None))
    extent = None if X is None else (float(np.min(X)), float(np.max(X)), float(np.min(Y)), float(np.max(Y)))
    image = axes[0][0].imshow(coefficients[0], cmap="viridis", origin="lower", extent=extent, aspect="auto")
    axes[0][0].set_title("approximation")
    fig.colorbar(image, ax=axes[0][0], fraction=0.046)
    level = decomposition["level"]
    for k, triple in enumerate(coefficients[1:], start=1):
        magnitude = np.sqrt(sum(d**2 for d in triple))
        image = axes[0][k].imshow(magnitude, cmap="magma", origin="lower", extent=extent, aspect="auto")
        # pywt lists details coarsest first; level `level` is the coarsest, 1 the finest.
        axes[0][k].set_title(f"details, level {level - k + 1}\nenergy {decomposition['energy']['details'][k - 1]:.3g}")
        fig.colorbar(image, ax=axes[0][k], fraction=0.046)
    for ax in axes[0]:
        ax.set_xlabel("lambda 1" if extent else "coefficient (direction 1)")
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("lambda 2" if extent else "coefficient (direction 2)")
    return finish_figure(fig, title, save_path)


def analyze_loss_surface_multiscale(model=None, data_loader=None, loss_func=None, device=None, wavelet: str = "db2",
                                    levels: int | None = None, grid: int = 32, radius: float = 0.5, surface=None,
                                    directions: str = "hessian", seed: int = 0, plot: bool = True,
                                    mode: str = "symmetric", save_path: str | Path | None = None) -> dict:
    """The chapter's multi-scale analysis. With ``surface`` (a 2-D array, or an (X, Y, Z) triple)
    it is decomposed as given; otherwise the loss of ``model`` over ``data_loader`` is computed on a
    ``grid`` x ``grid`` plane of half-width ``radius`` (32, a multiple of 2^level, as
    ``mode="periodization"`` needs for an exact energy partition) along its top two Hessian eigenvectors
    (``directions="hessian"``) or two filter-normalized random directions (``"random"``).

    Returns ``decompose_surface``'s dict plus ``surface`` (X, Y, Z) and, with ``plot``, ``figure``.
    """
    from dldna_fused.landscape.directions import random_directions
    from dldna_fused.landscape.hessian import hessian_eigenvectors
    from dldna_fused.landscape.surface import xy_perturb_loss

    if surface is None:
        if model is None or data_loader is None or loss_func is None:
            raise ValueError("pass a surface, or a model, a data_loader and a loss_func to compute one")
        if directions == "hessian":
            _, dirs = hessian_eigenvectors(model, loss_func, data_loader, 2, device, seed=seed)
        elif directions == "random":
            dirs = random_directions(model, 2, seed=seed)
        else:
            raise ValueError(f"directions must be 'hessian' or 'random', got {directions!r}")
        lambdas = np.linspace(-radius, radius, grid).astype(np.float32)
        surface = xy_perturb_loss(model, dirs, data_loader, loss_func, lambdas, lambdas, device, progress=False)
    X, Y, Z = surface if isinstance(surface, tuple) else (None, None, np.asarray(surface))
    result = decompose_surface(Z, wavelet, levels, mode)
    result["surface"] = (X, Y, Z)
    if plot:
        result["figure"] = plot_multiscale(result, f"wavelet decomposition ({wavelet}, {result['level']} levels)",
                                           save_path)
    return result
