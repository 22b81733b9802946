"""Hessian spectra of a model's loss: Hessian-vector products (one or a block at a time), the
extreme eigenpairs by Lanczos, the trace by Hutchinson's or the Hutch++ estimator, and the
spectral density by stochastic Lanczos quadrature (SLQ).

[Note: Hessian of a loader]
H is the Hessian of the mean loss over every sample of ``data_loader``: each batch's Hessian is
weighted by its size. The batches are moved to the device once. The model is in eval mode
meanwhile (dropout off, BatchNorm on its running statistics) and its previous mode is restored.
Each batch's gradient graph (``torch.autograd.grad(..., create_graph=True)``, never
``backward(create_graph=True)``, which leaks through param.grad) is built once and reused by
every product while the loader has at most ``max_retained_batches`` batches; a longer loader
rebuilds each batch's graph for each block of products and frees it, so memory stays that of one
batch's graph whatever the loader's length.

[Note: Hessian-vector products]
A product is one double backward through a batch's gradient graph, kept from one product to the
next. The alternatives, measured by benchmarks/hvp_variants.py on this project's 2-core CPU
(2026-12-06, full-batch digits, 1438 samples; ms per product, two runs):

    model                      double backward   graph rebuilt   forward-over-   block of 8:   block of 8:
                               (graph retained)  each product    reverse (func)  batched db    vmap fwd-rev
    MLP 64-256-256-10, 85k     11.4 / 19.2       18.2 / 28.6     24.2 / 25.3     17.1 / 18.6   13.0 / 16.0
    SmallCNN width 24, 54k     97 / 127          176 / 222       202 / 252       206 / 195     256 / 238

Forward-over-reverse keeps no graph, but on the CPU it costs more than rebuilding the graph; a
vmapped block is no faster on the MLP and 2x slower on the CNN (convolutions' double backward
under vmap). So a product is one retained double backward, vector by vector; a loader of more
than ``max_retained_batches`` batches rebuilds each batch's graph once per block of products.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dldna_fused.landscape._vectors import trainable as _params

WHICH = {"LM": "largest magnitude", "LA": "largest (algebraic)", "SA": "smallest (most negative)"}


def resolve_device(model: nn.Module, device=None, is_cuda: bool | None = None) -> torch.device:
    """The device to compute on: ``device`` if given; else "cuda" when the chapter's ``is_cuda=True``
    is passed and CUDA exists (a warning and the CPU when it does not); else the model's."""
    if device is not None:
        return torch.device(device)
    if is_cuda:
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("is_cuda=True but CUDA is not available; computing on the CPU", stacklevel=3)
        return torch.device("cpu")
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class HessianOperator:
    """X -> H X for the mean loss of ``model`` over ``data_loader`` (see [Note: Hessian of a
    loader]), on flat vectors: ``X`` is a (k, n) tensor of k vectors over the n trainable
    parameters (module order), or an (n,) one. ``products`` counts the Hessian-vector products
    so far (k per block). Use inside ``eval_mode(model)``; ``model`` must already be on
    ``device``."""

    def __init__(self, model: nn.Module, loss_func, data_loader, device, *, max_retained_batches: int = 16):
        self.model, self.loss_func = model, loss_func
        self.params = _params(model)
        self.device = device
        self.batches = [(x.to(device), y.to(device)) for x, y in data_loader]
        total = sum(len(x) for x, _ in self.batches)
        if total == 0:
            raise ValueError("data_loader yields no samples")
        self.weights = [len(x) / total for x, _ in self.batches]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.size = sum(self.sizes)
        self.dtype = self.params[0].dtype if self.params else torch.float32
        self.retained = len(self.batches) <= max_retained_batches
        self._graphs = [self._gradient_graph(x, y) for x, y in self.batches] if self.retained else None
        self.products = 0

    def _gradient_graph(self, x, y):
        loss = self.loss_func(self.model(x), y)
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def split(self, X: torch.Tensor) -> list[torch.Tensor]:
        """(k, n) -> per-parameter (k, *shape) views."""
        return [t.reshape(X.shape[0], *s) for t, s in zip(torch.split(X, self.sizes, dim=1), self.shapes)]

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        single = X.dim() == 1
        X = X.reshape(-1, self.size).to(device=self.device, dtype=self.dtype)
        out = torch.zeros_like(X)
        vectors = [v.to(p.dtype) for v, p in zip(self.split(X), self.params)]
        k = X.shape[0]
        for i, ((x, y), w) in enumerate(zip(self.batches, self.weights)):
            grads = self._graphs[i] if self.retained else self._gradient_graph(x, y)
            # One double backward per vector: on the CPU a vmapped block is no faster, and slower
            # for convolutions (see [Note: Hessian-vector products]). A rebuilt graph serves the
            # whole block before it is freed.
            for r in range(k):
                hv = torch.autograd.grad(grads, self.params, grad_outputs=[v[r] for v in vectors],
                                         retain_graph=self.retained or r < k - 1, allow_unused=True)
                out[r].add_(torch.cat([(h if h is not None else torch.zeros(s, device=X.device, dtype=X.dtype))
                                       .reshape(-1).to(X.dtype) for h, s in zip(hv, self.shapes)]), alpha=w)
        self.products += X.shape[0]
        out = out.detach()
        return out[0] if single else out

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """A flat (n,) vector as per-parameter tensors."""
        return [t.reshape(s).clone() for t, s in zip(torch.split(v, self.sizes), self.shapes)]

    def random(self, generator: torch.Generator, k: int | None = None, rademacher: bool = False) -> torch.Tensor:
        """k random vectors (k, n) (an (n,) one when ``k`` is None), Gaussian or Rademacher, drawn
        on the CPU from ``generator`` so that a seed gives the same vectors on any device."""
        shape = (self.size,) if k is None else (k, self.size)
        if rademacher:
            r = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64).to(self.dtype) * 2 - 1
        else:
            r = torch.randn(shape, generator=generator, dtype=torch.float64).to(self.dtype)
        return r.to(self.device)


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the orthonormal rows of ``basis``, twice (classical Gram-Schmidt
    twice is as good as modified Gram-Schmidt in floating point)."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - (basis @ w) @ basis
    return w


def _pick(values: np.ndarray, top_n: int, which: str) -> np.ndarray:
    """Indices of the ``top_n`` Ritz values ``which`` asks for, in the order reported."""
    if which == "LM":
        return np.argsort(-np.abs(values), kind="stable")[:top_n]
    if which == "LA":
        return np.argsort(-values, kind="stable")[:top_n]
    return np.argsort(values, kind="stable")[:top_n]


def hessian_eigenvectors(model: nn.Module, loss_func, data_loader, top_n: int = 2, device=None, max_iter: int = 200,
                         tol: float = 1e-5, seed: int = 0, is_cuda: bool | None = None, return_report: bool = False,
                         which: str = "LM"):
    """The ``top_n`` eigenpairs of the loss Hessian that ``which`` asks for: ``"LM"`` largest
    magnitude (the default, the chapter's), ``"LA"`` largest, ``"SA"`` smallest (most negative:
    the directions of negative curvature that saddle analyses need).

    By the Lanczos method with full reorthogonalization from a seeded Gaussian start: step m makes
    one Hessian-vector product and the m x m tridiagonal matrix T_m, whose eigenpairs (theta, s)
    give Ritz pairs (theta, V s) with residual ||H V s - theta V s|| = beta_m |s_m|. The run stops
    when every wanted pair's residual is at most ``tol * |theta|``, confirmed by one block product
    of the Ritz vectors (so the reported residual is measured, not estimated), or after
    ``max_iter`` steps. It keeps one vector of the parameters' size per step (``max_iter`` at
    most). Lanczos finds both ends of the spectrum at once and needs a fraction of the products
    of power iteration with deflation (BENCHMARKS.md).

    Returns ``(eigenvalues, eigenvectors)``: floats in ``which``'s order, and for each a list of
    per-parameter tensors of unit total norm (usable directly as directions for
    ``xy_perturb_loss``). With ``return_report`` a third element lists, per eigenpair, the
    ``iterations`` (Lanczos steps, i.e. Hessian-vector products, of the run), the final
    ``relative_change`` of its Ritz value over the last step, its ``residual`` ||Hv - lambda v|| /
    |lambda|, whether it ``converged``, and the run's Hessian-vector ``products`` (the steps and
    the confirming products); an eigenpair that did not converge also raises a warning. ``is_cuda=True`` (the chapter's call) selects CUDA when available.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)} ({', '.join(WHICH.values())}), got {which!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1 (Lanczos steps), got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    device = resolve_device(model, device, is_cuda)
    model = model.to(device)
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        H = HessianOperator(model, loss_func, data_loader, device)
        if top_n > H.size:
            raise ValueError(f"top_n ({top_n}) exceeds the number of parameters ({H.size})")
        values, vectors, report = _lanczos_eigenpairs(H, top_n, which, max_iter, tol, generator)
    for k, r in enumerate(report):
        r["products"] = H.products  # of the whole run, the confirming block included
        if not r["converged"]:
            warnings.warn(f"hessian_eigenvectors: eigenpair {k} did not converge in {r['iterations']} Lanczos "
                          f"iterations (relative change {r['relative_change']:.2g}, residual {r['residual']:.2g}, "
                          f"tol {tol:g})", stacklevel=2)
    eigenvectors = [H.unflatten(v) for v in vectors]
    return (values, eigenvectors, report) if return_report else (values, eigenvectors)


def _lanczos_eigenpairs(H: HessianOperator, top_n: int, which: str, max_iter: int, tol: float, generator):
    n = H.size
    steps = min(max_iter, n)
    basis = torch.zeros(0, n, device=H.device, dtype=H.dtype)
    v = H.random(generator)
    v = v / v.norm()
    alphas: list[float] = []
    betas: list[float] = []
    previous = None
    confirmed = None
    for m in range(1, steps + 1):
        basis = torch.cat([basis, v.unsqueeze(0)])
        w = H(v)
        alphas.append(float(w @ v))
        w = _orthogonalize(w, basis)
        beta = float(w.norm())
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, S = np.linalg.eigh(T)
        chosen = _pick(theta, min(top_n, m), which)
        estimates = beta * np.abs(S[-1, chosen]) / np.maximum(np.abs(theta[chosen]), 1e-30)
        invariant = beta <= 1e-12 * max(np.abs(theta).max(), 1e-30) or m == n
        done = len(chosen) == top_n and (bool(np.all(estimates <= tol)) or invariant)
        if done or m == steps:
            ritz = torch.as_tensor(S[:, chosen].T, device=H.device, dtype=H.dtype) @ basis
            ritz = ritz / ritz.norm(dim=1, keepdim=True)
            hr = H(ritz)
            values = [float(x) for x in theta[chosen]]
            residuals = [float((hr[i] - values[i] * ritz[i]).norm()) / max(abs(values[i]), 1e-30)
                         for i in range(len(values))]
            changes = [math.inf] * len(values)
            if previous is not None:
                prev_theta = previous[_pick(previous, min(top_n, len(previous)), which)]
                for i, value in enumerate(values[:len(prev_theta)]):
                    changes[i] = float(abs(value - prev_theta[i]) / max(abs(value), 1e-30))
            confirmed = (values, ritz, residuals, changes, m)
            if all(r <= tol for r in residuals) or m == steps or invariant:
                break
        previous = theta
        if invariant:
            break
        betas.append(beta)
        v = w / beta
    values, ritz, residuals, changes, m = confirmed
    report = [dict(eigenvalue=value, iterations=m, relative_change=change, residual=residual,
                   converged=bool(residual <= tol))
              for value, residual, change in zip(values, residuals, changes)]
    while len(values) < top_n:  # fewer steps than top_n: the missing pairs are not found
        values.append(float("nan"))
        report.append(dict(eigenvalue=float("nan"), iterations=m, relative_change=math.inf, residual=math.inf,
                           converged=False))
        ritz = torch.cat([ritz, torch.zeros(1, n, device=H.device, dtype=H.dtype)])
    return values, list(ritz), report


TRACE_METHODS = ("hutchinson", "hutch++")


def hessian_trace(model: nn.Module, loss_func, data_loader, n_samples: int = 100, device=None, seed: int = 0,
                  is_cuda: bool | None = None, method: str = "hutchinson", block: int = 16) -> tuple[float, float]:
    """An estimate of tr(H) from exactly ``n_samples`` Hessian-vector products, and its standard
    error. Products run ``block`` vectors at a time.

    ``method="hutchinson"``: the mean of z^T H z over ``n_samples`` Rademacher vectors z; the error
    is their sample std / sqrt(n_samples).

    ``method="hutch++"`` (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace
    Estimation", 2021): a third of the products sketch the range of H (Q = orth(H S), S
    Rademacher), a third give tr(Q^T H Q) exactly, and the rest apply Hutchinson to the deflated
    (I - QQ^T) H (I - QQ^T). The error is the last part's sample std / sqrt(its count): the first
    two parts are exact given Q. A Hessian's few large eigenvalues dominate Hutchinson's variance,
    and the sketch takes them out.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRACE_METHODS)}, got {method!r}")
    least = 2 if method == "hutchinson" else 4
    if n_samples < least:
        raise ValueError(f"n_samples must be >= {least} for a standard error with method={method!r}, got {n_samples}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    device = resolve_device(model, device, is_cuda)
    model = model.to(device)
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        H = HessianOperator(model, loss_func, data_loader, device)
        exact = 0.0
        residual_samples = n_samples
        Q = None
        if method == "hutch++":
            k = max(1, n_samples // 3)
            residual_samples = n_samples - 2 * k
            sketch = torch.cat([H(s) for s in H.random(generator, k, rademacher=True).split(block)])
            Q = torch.linalg.qr(sketch.T.double()).Q.T.to(H.dtype)  # (k, n), orthonormal rows
            exact = float(sum((q * H(q)).sum() for q in Q.split(block)))
        values = []
        for z in H.random(generator, residual_samples, rademacher=True).split(block):
            if Q is not None:
                z = z - (z @ Q.T) @ Q
            values.append((z * H(z)).sum(dim=1).double().cpu())
    values = torch.cat(values).numpy()
    return float(exact + values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def hessian_density(model: nn.Module, loss_func, data_loader, n_iter: int = 40, n_runs: int = 4,
                    sigma: float | None = None, grid_points: int = 1000, device=None, seed: int = 0,
                    is_cuda: bool | None = None) -> dict:
    """The Hessian's spectral density by stochastic Lanczos quadrature.

    The ``n_runs`` runs go side by side, one block product of all their vectors per step. Each
    starts Lanczos from a normalized Rademacher vector, keeps every Lanczos vector orthogonal to
    all its previous ones (full reorthogonalization), and takes the eigenpairs of the m x m
    tridiagonal matrix (``numpy.linalg.eigh``, m = min(n_iter, n)): nodes theta_i and weights
    w_i = (first component of the i-th eigenvector)^2, which sum to 1. The density is the average
    over runs of sum_i w_i N(x; theta_i, sigma^2), with ``sigma`` explicit (default 1% of the
    spread of the nodes) on a grid that extends 5 sigma beyond the extreme nodes.

    Returns a dict: ``grid``, ``density`` (integrates to 1 on the grid), ``nodes`` and
    ``weights`` (one array per run) and ``sigma``.
    """
    device = resolve_device(model, device, is_cuda)
    model = model.to(device)
    generator = torch.Generator().manual_seed(seed)
    all_nodes, all_weights = [], []
    with eval_mode(model):
        H = HessianOperator(model, loss_func, data_loader, device)
        m = min(n_iter, H.size)
        V = H.random(generator, n_runs, rademacher=True)
        V = V / V.norm(dim=1, keepdim=True)
        bases = [V[r:r + 1] for r in range(n_runs)]
        alphas = [[] for _ in range(n_runs)]
        betas = [[] for _ in range(n_runs)]
        active = list(range(n_runs))  # runs whose Krylov space has not closed
        for j in range(m):
            W = H(torch.stack([bases[r][-1] for r in active]))
            still = []
            for row, r in enumerate(active):
                w = W[row]
                alphas[r].append(float(w @ bases[r][-1]))
                w = _orthogonalize(w, bases[r])
                beta = float(w.norm())
                if j == m - 1 or beta < 1e-10:
                    continue
                betas[r].append(beta)
                bases[r] = torch.cat([bases[r], (w / beta).unsqueeze(0)])
                still.append(r)
            active = still
            if not active:
                break
        for r in range(n_runs):
            T = np.diag(alphas[r]) + np.diag(betas[r], 1) + np.diag(betas[r], -1)
            nodes, vectors = np.linalg.eigh(T)
            all_nodes.append(nodes)
            all_weights.append(vectors[0] ** 2)
    flat = np.concatenate(all_nodes)
    spread = float(flat.max() - flat.min())
    if sigma is None:
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(abs(float(flat.max())), 1.0)
    grid = np.linspace(flat.min() - 5 * sigma, flat.max() + 5 * sigma, grid_points)
    density = np.zeros_like(grid)
    for nodes, weights in zip(all_nodes, all_weights):
        gauss = np.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        density += gauss @ weights
    density /= n_runs
    return {"grid": grid, "density": density, "nodes": all_nodes, "weights": all_weights, "sigma": sigma}
