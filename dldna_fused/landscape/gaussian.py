"""A 2-D Gaussian fitted to a loss surface, and optimizers run on the fitted surface (the
chapter's way to compare optimizer paths on a smooth stand-in for the real landscape)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from dldna_fused._plotting import finish_figure


class GaussianFitError(ValueError):
    """No 2-D Gaussian fits the data (the fit failed or explains too little of its variance)."""


def gaussian_surface(x, y, A, x0, y0, sigma1, sigma2, offset):
    """A exp(-((x - x0)^2 / (2 sigma1^2) + (y - y0)^2 / (2 sigma2^2))) + offset, for numpy arrays or
    torch tensors. A < 0 is a bowl (a minimum at (x0, y0)), A > 0 a hill."""
    lib = torch if isinstance(x, torch.Tensor) else np
    return A * lib.exp(-((x - x0) ** 2 / (2 * sigma1**2) + (y - y0) ** 2 / (2 * sigma2**2))) + offset


def get_opt_params(x, y, z, min_r2: float = 0.5, maxfev: int = 20000):
    """Fits ``z ~ gaussian_surface(x, y, A, x0, y0, sigma1, sigma2, offset)`` with
    ``scipy.optimize.curve_fit`` and returns ``(popt, pcov, offset)``: ``popt`` = [A, x0, y0,
    sigma1, sigma2], ``pcov`` the 6 x 6 covariance of (A, x0, y0, sigma1, sigma2, offset).

    The fit starts twice, from a bowl centred on the minimum (A < 0) and from a hill on the
    maximum (A > 0), with the offset from the median of the border and widths of a quarter of the
    grid's extent, and keeps the better R^2. Bounds keep the centre within one extent of the grid
    and the widths in (extent/1000, 10 extent). Raises ``GaussianFitError`` when curve_fit fails
    or the best fit's R^2 is below ``min_r2``.
    """
    from scipy.optimize import curve_fit

    x, y, z = (np.asarray(a, dtype=float).ravel() for a in (x, y, z))
    if not (x.size == y.size == z.size) or x.size < 6:
        raise GaussianFitError(f"need x, y, z of one size >= 6, got {x.size}, {y.size}, {z.size}")
    if not np.all(np.isfinite(z)):
        raise GaussianFitError("z has nan or inf values")
    span_x, span_y = np.ptp(x) or 1.0, np.ptp(y) or 1.0
    border = (x == x.min()) | (x == x.max()) | (y == y.min()) | (y == y.max())
    offset0 = float(np.median(z[border])) if border.any() else float(np.median(z))
    lower = [-np.inf, x.min() - span_x, y.min() - span_y, span_x / 1000, span_y / 1000, -np.inf]
    upper = [np.inf, x.max() + span_x, y.max() + span_y, 10 * span_x, 10 * span_y, np.inf]
    xy = np.vstack([x, y])
    total = ((z - z.mean()) ** 2).sum()

    def model(xy, A, x0, y0, s1, s2, offset):
        return gaussian_surface(xy[0], xy[1], A, x0, y0, s1, s2, offset)

    # Two starts: a bowl centred on the minimum (A < 0) and a hill on the maximum (A > 0); the
    # better fit wins. One start alone misreads a bowl whose corners rise far above its border.
    best, errors = None, []
    for i0 in (int(np.argmin(z)), int(np.argmax(z))):
        guess = [z[i0] - offset0, x[i0], y[i0], span_x / 4, span_y / 4, offset0]
        try:
            popt, pcov = curve_fit(model, xy, z, p0=guess, bounds=(lower, upper), maxfev=maxfev)
        except (RuntimeError, ValueError) as e:
            errors.append(str(e))
            continue
        r2 = 1.0 - ((z - model(xy, *popt)) ** 2).sum() / total if total > 0 else 0.0
        if best is None or r2 > best[0]:
            best = (r2, popt, pcov)
    if best is None:
        raise GaussianFitError(f"no Gaussian fits this surface: curve_fit failed ({'; '.join(errors)})")
    r2, popt, pcov = best
    if r2 < min_r2:
        raise GaussianFitError(f"no Gaussian fits this surface: the best fit explains R^2 = {r2:.3f} of its "
                               f"variance (min_r2 = {min_r2})")
    if np.isclose(popt[3], upper[3]) or np.isclose(popt[4], upper[4]):
        warnings.warn("get_opt_params: a width reached its bound (10 x the grid's extent): the surface does not "
                      "level off within the grid, and the fit is the Gaussian's quadratic limit there", stacklevel=2)
    return popt[:5], pcov, float(popt[5])


def visualize_gaussian_fit(x, y, z, popt, offset, d_min=None, d_max=None, d_num=None, elev=None, azim=None,
                           title: str | None = None, save_path: str | Path | None = None, size=(7, 5.5)):
    """The surface's points and the fitted Gaussian (on ``d_num`` points per axis over
    [d_min, d_max], by default the data's own range and 50 points), in 3-D seen from ``elev``,
    ``azim``. Returns the figure."""
    import matplotlib.pyplot as plt

    x, y, z = (np.asarray(a, dtype=float) for a in (x, y, z))
    lo = float(min(x.min(), y.min())) if d_min is None else d_min
    hi = float(max(x.max(), y.max())) if d_max is None else d_max
    grid = np.linspace(lo, hi, d_num or 50)
    gx, gy = np.meshgrid(grid, grid)
    fig = plt.figure(figsize=size)
    ax = fig.add_subplot(projection="3d")
    ax.scatter(x.ravel(), y.ravel(), z.ravel(), s=4, color="C0", alpha=0.6, label="loss surface")
    ax.plot_surface(gx, gy, gaussian_surface(gx, gy, *popt, offset), color="C3", alpha=0.35, linewidth=0)
    ax.view_init(elev=elev, azim=azim)
    ax.set_xlabel("lambda 1")
    ax.set_ylabel("lambda 2")
    ax.set_zlabel("loss")
    A, x0, y0, s1, s2 = popt
    # Two lines: on one, the numbers ran past both edges of a 7-inch figure.
    return finish_figure(fig, title or f"Gaussian fit: A={A:.3g}, centre=({x0:.3g}, {y0:.3g})\n"
                                       f"sigma=({s1:.3g}, {s2:.3g}), offset={offset:.3g}", save_path)


def train_loss_surface(optimizer_factory, start_range, steps: int, gaussian_params=None, start=None, seed: int = 0,
                       surface=None) -> np.ndarray:
    """Runs ``optimizer_factory([p])`` (any torch.optim-style optimizer: dldna_fused's, the
    references, torch's) for ``steps`` steps on a point p = (x, y) minimizing the fitted surface
    ``gaussian_surface(x, y, *gaussian_params)`` (``gaussian_params`` = (*popt, offset)), or the
    differentiable ``surface(p)`` when given. The start is ``start``, or uniform in
    ``start_range`` = [low, high] on both axes (seeded). Returns the ``(steps + 1) x 2`` path, an
    array whose ``label`` names the optimizer (e.g. "SGD lr=0.05 momentum=0.8"), which
    :func:`visualize_optimization_path` uses for its legend when given no labels."""
    if surface is None:
        if gaussian_params is None or len(gaussian_params) != 6:
            raise ValueError("gaussian_params must be (A, x0, y0, sigma1, sigma2, offset), e.g. (*popt, offset)")
        params = tuple(float(v) for v in gaussian_params)

        def surface(p):
            return gaussian_surface(p[0], p[1], *params)

    if start is None:
        low, high = start_range
        generator = torch.Generator().manual_seed(seed)
        start = low + (high - low) * torch.rand(2, generator=generator, dtype=torch.float64)
    point = torch.nn.Parameter(torch.as_tensor(start, dtype=torch.float32).clone())
    optimizer = optimizer_factory([point])
    path = [point.detach().clone().numpy()]
    for _ in range(steps):
        optimizer.zero_grad()
        surface(point).backward()
        optimizer.step()
        path.append(point.detach().clone().numpy())
    return OptimizerPath(np.stack(path), optimizer_label(optimizer))


class OptimizerPath(np.ndarray):
    """A path of points (an ndarray) that carries the name of the optimizer that made it."""

    def __new__(cls, points: np.ndarray, label: str):
        path = np.asarray(points).view(cls)
        path.label = label
        return path

    def __array_finalize__(self, obj):
        self.label = getattr(obj, "label", None)


def optimizer_label(optimizer) -> str:
    """The optimizer's class name and the hyperparameters that tell runs apart (lr, and momentum or
    betas when set), e.g. "SGD lr=0.05 momentum=0.8"."""
    group = optimizer.param_groups[0]
    parts = [type(optimizer).__name__]
    if "lr" in group and group["lr"] is not None:
        parts.append(f"lr={float(group['lr']):g}")
    if group.get("momentum"):
        parts.append(f"momentum={group['momentum']:g}")
    return " ".join(parts)


def visualize_optimization_path(x, y, z, popt, offset, paths, labels=None, act_name: str = "", levels: int = 20,
                                title: str | None = None, save_path: str | Path | None = None, size=(7, 6)):
    """The paths (arrays of points, as ``train_loss_surface`` returns) over the fitted surface's
    contours, each with its start (circle) and end (star). Returns the figure."""
    import matplotlib.pyplot as plt

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    everything = np.concatenate([np.asarray(p) for p in paths] + [np.c_[x.ravel(), y.ravel()]])
    lo, hi = everything.min(axis=0), everything.max(axis=0)
    pad = 0.05 * (hi - lo + 1e-12)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 200), np.linspace(lo[1] - pad[1], hi[1] + pad[1], 200))
    fig, ax = plt.subplots(figsize=size)
    filled = ax.contourf(gx, gy, gaussian_surface(gx, gy, *popt, offset), levels=levels, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="fitted loss")
    labels = labels or [getattr(p, "label", None) or f"path {i + 1}" for i, p in enumerate(paths)]
    for k, (path, label) in enumerate(zip(paths, labels)):
        path = np.asarray(path)
        color = f"C{(k + 1) % 10}"
        ax.plot(path[:, 0], path[:, 1], "-", color=color, linewidth=1.5, label=label)
        ax.plot(*path[0], "o", color=color, markersize=7, markeredgecolor="k")
        ax.plot(*path[-1], "*", color=color, markersize=13, markeredgecolor="k")
    ax.set_xlabel("lambda 1")
    ax.set_ylabel("lambda 2")
    ax.legend(fontsize=8)
    return finish_figure(fig, title or f"optimizer paths on the fitted surface {act_name}".strip(), save_path)
