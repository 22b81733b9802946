"""Hessian spectra of a model's loss: Hessian-vector products by double backward, the top
eigenpairs by power iteration with deflation, the trace by Hutchinson's estimator, and the
spectral density by stochastic Lanczos quadrature (SLQ).

[Note: Hessian of a loader]
H is the Hessian of the mean loss over every sample of ``data_loader``: each batch's Hessian is
weighted by its size. The batches are moved to the device once, and each batch's gradient graph
is built once (``torch.autograd.grad(..., create_graph=True)``, never
``backward(create_graph=True)``, which leaks through param.grad) and reused by every product, so a
product costs one double-backward per batch. The model is in eval mode meanwhile (dropout off,
BatchNorm on its running statistics) and its previous mode is restored.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dldna_fused.landscape._vectors import axpy as _axpy
from dldna_fused.landscape._vectors import dot as _dot
from dldna_fused.landscape._vectors import norm as _norm
from dldna_fused.landscape._vectors import trainable as _params


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
    """v -> H v for the mean loss of ``model`` over ``data_loader`` (see [Note: Hessian of a
    loader]). Use inside ``eval_mode(model)``; ``model`` must already be on ``device``."""

    def __init__(self, model: nn.Module, loss_func, data_loader, device):
        self.params = _params(model)
        self.device = device
        batches = [(x.to(device), y.to(device)) for x, y in data_loader]
        total = sum(len(x) for x, _ in batches)
        if total == 0:
            raise ValueError("data_loader yields no samples")
        self.grads, self.weights = [], []
        for x, y in batches:
            loss = loss_func(model(x), y)
            self.grads.append(torch.autograd.grad(loss, self.params, create_graph=True))
            self.weights.append(len(x) / total)
        self.size = sum(p.numel() for p in self.params)

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for grads, w in zip(self.grads, self.weights):
            hv = torch.autograd.grad(grads, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
            out = [o + w * (h if h is not None else torch.zeros_like(o)) for o, h in zip(out, hv)]
        return [o.detach() for o in out]

    def random(self, generator: torch.Generator, rademacher: bool = False) -> list[torch.Tensor]:
        out = []
        for p in self.params:
            if rademacher:
                r = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).to(p) * 2 - 1
            else:
                r = torch.randn(p.shape, generator=generator).to(p)
            out.append(r)
        return out


def hessian_eigenvectors(model: nn.Module, loss_func, data_loader, top_n: int = 2, device=None, max_iter: int = 200,
                         tol: float = 1e-5, seed: int = 0, is_cuda: bool | None = None, return_report: bool = False):
    """The ``top_n`` eigenpairs of largest magnitude of the loss Hessian, by power iteration with
    deflation: each new vector is kept orthogonal (Gram-Schmidt) to those already found.

    Iteration k stops when both the relative eigenvalue change |lambda_k - lambda_(k-1)| / |lambda_k|
    and the residual ||Hv - lambda v|| / |lambda| are below ``tol``, or after ``max_iter``
    products. Returns ``(eigenvalues, eigenvectors)``: floats in the order found, and for each a
    list of per-parameter tensors of unit total norm (usable directly as directions for
    ``xy_perturb_loss``). With ``return_report`` a third element lists, per eigenpair, the
    ``iterations``, final ``relative_change`` and ``residual`` and whether it ``converged``; an
    eigenpair that did not converge also raises a warning. ``is_cuda=True`` (the chapter's call)
    selects CUDA when available.
    """
    device = resolve_device(model, device, is_cuda)
    model = model.to(device)
    generator = torch.Generator().manual_seed(seed)
    eigenvalues, eigenvectors, report = [], [], []
    with eval_mode(model):
        H = HessianOperator(model, loss_func, data_loader, device)
        if top_n > H.size:
            raise ValueError(f"top_n ({top_n}) exceeds the number of parameters ({H.size})")
        for k in range(top_n):
            v = H.random(generator)
            lam, change, residual, iterations = None, math.inf, math.inf, 0
            for iterations in range(1, max_iter + 1):
                for u in eigenvectors:  # deflation
                    v = _axpy(-_dot(u, v), u, v)
                v = [x / _norm(v) for x in v]
                hv = H(v)
                for u in eigenvectors:
                    hv = _axpy(-_dot(u, hv), u, hv)
                new = _dot(v, hv).item()
                residual = (_norm(_axpy(-new, v, hv)) / max(abs(new), 1e-30)).item()
                change = abs(new - lam) / max(abs(new), 1e-30) if lam is not None else math.inf
                lam, v = new, hv
                if change < tol and residual < tol:
                    break
            # The last iterate is H v; its normalized form is the eigenvector estimate.
            v = [x / _norm(v) for x in v]
            eigenvalues.append(lam)
            eigenvectors.append([x.detach() for x in v])
            converged = change < tol and residual < tol
            report.append(dict(eigenvalue=lam, iterations=iterations, relative_change=change, residual=residual,
                               converged=converged))
            if not converged:
                warnings.warn(f"hessian_eigenvectors: eigenpair {k} did not converge in {max_iter} iterations "
                              f"(relative change {change:.2g}, residual {residual:.2g}, tol {tol:g})", stacklevel=2)
    return (eigenvalues, eigenvectors, report) if return_report else (eigenvalues, eigenvectors)


def hessian_trace(model: nn.Module, loss_func, data_loader, n_samples: int = 100, device=None, seed: int = 0,
                  is_cuda: bool | None = None) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H): the mean of z^T H z over exactly ``n_samples`` Rademacher
    vectors z, and its standard error (sample std / sqrt(n_samples))."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a standard error, got {n_samples}")
    device = resolve_device(model, device, is_cuda)
    model = model.to(device)
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        H = HessianOperator(model, loss_func, data_loader, device)
        values = []
        for _ in range(n_samples):
            z = H.random(generator, rademacher=True)
            values.append(_dot(z, H(z)).item())
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n_samples))


def hessian_density(model: nn.Module, loss_func, data_loader, n_iter: int = 40, n_runs: int = 4,
                    sigma: float | None = None, grid_points: int = 1000, device=None, seed: int = 0,
                    is_cuda: bool | None = None) -> dict:
    """The Hessian's spectral density by stochastic Lanczos quadrature.

    Each of ``n_runs`` runs starts Lanczos from a normalized Rademacher vector, keeps every Lanczos
    vector orthogonal to all previous ones (full reorthogonalization), and takes the eigenpairs of
    the m x m tridiagonal matrix (``numpy.linalg.eigh``, m = min(n_iter, n)): nodes theta_i and
    weights w_i = (first component of the i-th eigenvector)^2, which sum to 1. The density is the
    average over runs of sum_i w_i N(x; theta_i, sigma^2), with ``sigma`` explicit (default 1% of
    the spread of the nodes) on a grid that extends 5 sigma beyond the extreme nodes.

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
        for _ in range(n_runs):
            v = H.random(generator, rademacher=True)
            v = [x / _norm(v) for x in v]
            basis, alphas, betas = [v], [], []
            for j in range(m):
                w = H(basis[-1])
                alpha = _dot(w, basis[-1]).item()
                alphas.append(alpha)
                for u in basis:  # full reorthogonalization (twice is enough in floating point)
                    w = _axpy(-_dot(u, w), u, w)
                for u in basis:
                    w = _axpy(-_dot(u, w), u, w)
                beta = _norm(w).item()
                if j == m - 1 or beta < 1e-10:
                    break
                betas.append(beta)
                basis.append([x / beta for x in w])
            T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
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
