"""``dldna-fused bench --hessian``: the loss Hessian's top eigenpairs and trace on the digits MLP
and the toolkit's CNN (full batch, briefly trained), by our Lanczos, by power iteration with
deflation (what ``hessian_eigenvectors`` did before Lanczos), by PyHessian and by curvlinops'
operator under scipy's ``eigsh`` (optional rows, where installed). Each row gives the time, the
Hessian-vector products, the largest relative error of the eigenvalues against a tight Lanczos
solve in float64 (residual 1e-10) and the largest relative residual ||Hv - lambda v|| / |lambda| of the vectors
returned, measured with our operator."""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class HessianRow:
    model: str
    task: str  # "top-3 eigenpairs" or "trace"
    implementation: str
    seconds: float
    products: int
    max_relative_error: float | None  # eigenvalues against the tight solve; None for the trace
    max_residual: float | None
    value: str  # what it found: the eigenvalues, or the trace estimate and its standard error


def models(names: list[str], train_epochs: int = 3) -> dict:
    """{name: (model, loss_func, loader of one full batch)} on digits' training split, each trained
    briefly (AdamW) so that its Hessian is a trained model's."""
    from dldna_fused.experiments.data import get_dataset
    from dldna_fused.experiments.models import SimpleNetwork, SmallCNN
    from dldna_fused.optim import AdamW

    train = get_dataset("digits")[0]
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([int(train[i][1]) for i in range(len(train))])
    builders = {"mlp": lambda: SimpleNetwork(input_shape=64, hidden_shape=(256, 256), num_labels=10),
                "cnn": lambda: SmallCNN(in_channels=1, num_labels=10, width=24)}
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = builders[name]()
        loss_func = nn.CrossEntropyLoss()
        opt = AdamW(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        for _ in range(train_epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss_func(model(xb), yb).backward()
                opt.step()
        model.eval()
        label = f"{name} ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params, {len(x)} samples)"
        out[label] = (model, loss_func, [(x, y)])
    return out


def _residuals(model, loss_func, data, values, vectors) -> float:
    from dldna_fused.landscape.hessian import HessianOperator

    H = HessianOperator(model, loss_func, data, torch.device("cpu"))
    flat = torch.stack([torch.cat([t.reshape(-1) for t in v]).to(H.dtype) for v in vectors])
    flat = flat / flat.norm(dim=1, keepdim=True)
    hv = H(flat)
    return max(float((hv[i] - values[i] * flat[i]).norm()) / abs(values[i]) for i in range(len(values)))


def power_iteration(model, loss_func, data, top_n: int, tol: float, max_iter: int = 1000, seed: int = 0):
    """Power iteration with deflation, stopping when both the relative eigenvalue change and the
    relative residual are below ``tol``: what ``hessian_eigenvectors`` did before Lanczos, kept
    here as the baseline of its speed-up. Returns (values, vectors, products)."""
    from dldna_fused.landscape.hessian import HessianOperator

    H = HessianOperator(model, loss_func, data, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    values, found = [], []
    for _ in range(top_n):
        v = H.random(generator)
        lam = None
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = H(v)
            for u in found:
                hv = hv - (u @ hv) * u
            new = float(v @ hv)
            residual = float((hv - new * v).norm()) / max(abs(new), 1e-30)
            change = abs(new - lam) / max(abs(new), 1e-30) if lam is not None else math.inf
            lam, v = new, hv
            if change < tol and residual < tol:
                break
        values.append(lam)
        found.append(v / v.norm())
    return values, [H.unflatten(u) for u in found], H.products


def _pyhessian_rows(label, model, loss_func, data, reference, top_n, tol) -> list:
    if importlib.util.find_spec("pyhessian") is None:
        return []
    # The module (pyhessian's package attribute "hessian" is the class of the same name).
    pyh = importlib.import_module("pyhessian.hessian")

    count = [0]
    product = pyh.hessian_vector_product

    def counted(*args, **kwargs):
        count[0] += 1
        return product(*args, **kwargs)

    pyh.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        h = pyh.hessian(model, loss_func, data=data[0], cuda=False)  # the class
        values, vectors = h.eigenvalues(maxIter=1000, tol=tol, top_n=top_n)
        seconds = time.perf_counter() - start
    finally:
        pyh.hessian_vector_product = product
    model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying grads in p.grad
    return [HessianRow(label, f"top-{top_n} eigenpairs", f"PyHessian (power iteration, tol {tol:g} on the value)",
                       seconds, count[0], _relative_error(values, reference),
                       _residuals(model, loss_func, data, values, vectors), _format(values))]


def _curvlinops_rows(label, model, loss_func, data, reference, top_n, tol) -> list:
    if importlib.util.find_spec("curvlinops") is None:
        return []
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    operator = HessianLinearOperator(model, loss_func, params, data).to_scipy()
    count = [0]

    def matvec(v):
        count[0] += 1
        return operator @ v

    wrapped = LinearOperator(operator.shape, matvec=matvec, dtype=operator.dtype)
    values, vectors = eigsh(wrapped, k=top_n, which="LM", tol=tol,
                            v0=np.random.default_rng(0).standard_normal(operator.shape[0]))
    seconds = time.perf_counter() - start
    order = np.argsort(-np.abs(values))
    values = [float(values[i]) for i in order]
    sizes = [p.numel() for p in params]
    vectors = [[torch.as_tensor(t.copy(), dtype=torch.float32).reshape(p.shape)
                for t, p in zip(np.split(vectors[:, i], np.cumsum(sizes)[:-1]), params)] for i in order]
    return [HessianRow(label, f"top-{top_n} eigenpairs", f"curvlinops + scipy eigsh (tol {tol:g})", seconds, count[0],
                       _relative_error(values, reference), _residuals(model, loss_func, data, values, vectors),
                       _format(values))]


def _our_operator_eigsh_row(label, model, loss_func, data, reference, top_n, tol) -> HessianRow:
    """Our operator under scipy's ARPACK (implicitly restarted Lanczos), the other way the
    issue named: the comparison for writing Lanczos ourselves."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    from dldna_fused.landscape.hessian import HessianOperator, eval_mode

    start = time.perf_counter()
    with eval_mode(model):
        H = HessianOperator(model, loss_func, data, torch.device("cpu"))
        operator = LinearOperator((H.size, H.size), dtype=np.float64,
                                  matvec=lambda v: H(torch.as_tensor(v.ravel(), dtype=H.dtype)).double().numpy())
        values, vectors = eigsh(operator, k=top_n, which="LM", tol=tol,
                                v0=np.random.default_rng(0).standard_normal(H.size))
    seconds = time.perf_counter() - start
    order = np.argsort(-np.abs(values))
    values = [float(values[i]) for i in order]
    vectors = [H.unflatten(torch.as_tensor(vectors[:, i], dtype=H.dtype)) for i in order]
    return HessianRow(label, f"top-{top_n} eigenpairs", f"dldna_fused operator + scipy eigsh (tol {tol:g})", seconds,
                      H.products, _relative_error(values, reference), _residuals(model, loss_func, data, values, vectors),
                      _format(values))


def _relative_error(values, reference) -> float:
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference))


def _format(values) -> str:
    return ", ".join(f"{v:.6g}" for v in values)


def run(names: list[str], top_n: int = 3, tol: float = 1e-5, trace_products: int = 99) -> list[HessianRow]:
    from dldna_fused.landscape.hessian import hessian_eigenvectors, hessian_trace

    rows: list[HessianRow] = []
    for label, (model, loss_func, data) in models(names).items():
        # The reference: Lanczos in float64 to a residual of 1e-10 (float32 products stop near 1e-7).
        exact = copy.deepcopy(model).double()
        reference = hessian_eigenvectors(exact, loss_func, [(x.double(), y) for x, y in data], top_n=top_n,
                                         tol=1e-10, max_iter=1000)[0]
        start = time.perf_counter()
        values, vectors, report = hessian_eigenvectors(model, loss_func, data, top_n=top_n, tol=tol,
                                                       return_report=True)
        seconds = time.perf_counter() - start
        rows.append(HessianRow(label, f"top-{top_n} eigenpairs", f"dldna_fused Lanczos (tol {tol:g} on the residual)",
                               seconds, report[0]["products"], _relative_error(values, reference),
                               _residuals(model, loss_func, data, values, vectors), _format(values)))
        start = time.perf_counter()
        values, vectors, products = power_iteration(model, loss_func, data, top_n, tol)
        seconds = time.perf_counter() - start
        rows.append(HessianRow(label, f"top-{top_n} eigenpairs", f"power iteration + deflation (tol {tol:g}, before)",
                               seconds, products, _relative_error(values, reference),
                               _residuals(model, loss_func, data, values, vectors), _format(values)))
        rows.append(_our_operator_eigsh_row(label, model, loss_func, data, reference, top_n, tol))
        rows += _pyhessian_rows(label, model, loss_func, data, reference, top_n, tol)
        rows += _curvlinops_rows(label, model, loss_func, data, reference, top_n, tol)
        for method in ("hutchinson", "hutch++"):
            start = time.perf_counter()
            estimate, stderr = hessian_trace(model, loss_func, data, n_samples=trace_products, method=method)
            rows.append(HessianRow(label, "trace", f"dldna_fused {method}", time.perf_counter() - start,
                                   trace_products, None, None, f"{estimate:.6g} +- {stderr:.3g}"))
    return rows


def format_table(rows: list[HessianRow]) -> str:
    width = max(len(r.implementation) for r in rows) + 2
    header = f"{'implementation':<{width}}{'seconds':>9}{'products':>10}{'max rel err':>13}{'max resid':>11}  result"
    lines = []
    for label in dict.fromkeys(r.model for r in rows):
        lines += [label, header, "-" * (len(header) + 30)]
        for r in (r for r in rows if r.model == label):
            err = "-" if r.max_relative_error is None else f"{r.max_relative_error:.1e}"
            res = "-" if r.max_residual is None else f"{r.max_residual:.1e}"
            lines.append(f"{r.implementation:<{width}}{r.seconds:>9.2f}{r.products:>10}{err:>13}{res:>11}  {r.value}")
        lines.append("")
    return "\n".join(lines)
