"""The chapter's initialization comparison: train the same model under each method and tabulate
error, convergence speed, spectral diagnostics and time."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from dldna_fused.experiments.data import reseed
from dldna_fused.experiments.models import fit_to_data
from dldna_fused.init.diagnostics import model_diagnostics
from dldna_fused.init.methods import apply_init

COLUMNS = (("error_rate", "Error Rate (%)", "{:.2f}"), ("convergence_speed", "Convergence Speed", "{:.3f}"),
           ("avg_condition_number", "Average Condition Number", "{:.2f}"), ("spectral_norm", "Spectral Norm", "{:.2f}"),
           ("effective_rank_ratio", "Effective Rank Ratio", "{:.2f}"), ("execution_time", "Execution Time (s)", "{:.1f}"))


def convergence_speed(step_losses: list[float]) -> float:
    """The normalized area under the per-step training loss: mean_t(loss_t) / loss_0 over every
    optimizer step of the run. 1 means the loss never fell below its first value, and lower is
    faster; nan when the loss became nan or inf (the run diverged). Unlike "the slope of the
    learning curve" (the chapter's wording) it needs no threshold or window and uses every step."""
    if not step_losses or not all(math.isfinite(v) for v in step_losses) or step_losses[0] <= 0:
        return math.nan
    return sum(step_losses) / len(step_losses) / step_losses[0]


def _train(model, optimizer, train_loader, test_loader, epochs, device):
    from dldna_fused.experiments.training import evaluate, train_epoch

    step_losses, test_accuracies = [], []
    for _ in range(epochs):
        step_losses += train_epoch(model, train_loader, optimizer, device)["step_losses"]
        test_accuracies.append(evaluate(model, test_loader, device)["accuracy"])
    return step_losses, test_accuracies


def analyze_initialization(model_class, init_methods: dict, train_loader, test_loader, epochs: int = 3,
                           device="cpu", optimizer_factory=None, seed: int = 0, progress: bool = True) -> dict:
    """For each method: build ``model_class()``, initialize it (``apply_init``: our model-level
    methods or tensor initializers like ``torch.nn.init.xavier_normal_``), measure its weights,
    train for ``epochs`` with ``optimizer_factory(params)`` (default: dldna_fused's fused Adam,
    lr 1e-3) from the same seed and the same batch order (``reseed``), and record

    - ``error_rate``: final test error in percent;
    - ``convergence_speed``: see :func:`convergence_speed` (lower is faster);
    - ``avg_condition_number``, ``spectral_norm``, ``effective_rank_ratio``: means over the weight
      layers at initialization (``diagnostics_trained`` holds the same after training);
    - ``execution_time``: training wall time in seconds;
    - ``test_accuracies`` per epoch and ``step_losses``.
    """
    from tqdm.auto import tqdm

    from dldna_fused import optim

    optimizer_factory = optimizer_factory or (lambda params: optim.Adam(params, lr=1e-3))
    # One untimed step first, so the first method's time does not include one-off start-up costs
    # (thread pools, kernel selection, lazy imports).
    x, y = next(iter(train_loader))
    warm = fit_to_data(model_class(), x).to(device)
    nn.CrossEntropyLoss()(warm(x.to(device)), y.to(device)).backward()
    optimizer_factory(warm.parameters()).step()
    results = {}
    for name, method in tqdm(init_methods.items(), desc="init methods", disable=not progress):
        torch.manual_seed(seed)
        model = apply_init(method, fit_to_data(model_class(), x)).to(device)
        reseed(train_loader, seed)  # every method sees the same batches
        at_init = model_diagnostics(model)["mean"]
        start = time.perf_counter()
        step_losses, test_accuracies = _train(model, optimizer_factory(model.parameters()), train_loader, test_loader,
                                              epochs, device)
        elapsed = time.perf_counter() - start
        final_loss_ok = math.isfinite(step_losses[-1]) if step_losses else False
        results[name] = {
            "error_rate": 100.0 * (1.0 - test_accuracies[-1]) if final_loss_ok else math.nan,
            "convergence_speed": convergence_speed(step_losses),
            "avg_condition_number": at_init["condition_number"],
            "spectral_norm": at_init["spectral_norm"],
            "effective_rank_ratio": at_init["effective_rank_ratio"],
            "execution_time": elapsed,
            "test_accuracies": test_accuracies,
            "step_losses": step_losses,
            "diagnostics_trained": model_diagnostics(model)["mean"],
        }
    return results


def create_detailed_analysis_table(results: dict, print_table: bool = True) -> str:
    """The chapter's table of ``analyze_initialization``'s results; printed unless told not to,
    and returned."""
    headers = ["Initialization Method"] + [title for _, title, _ in COLUMNS]
    rows = [[name] + [fmt.format(r[key]) for key, _, fmt in COLUMNS] for name, r in results.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    table = "\n".join(lines)
    if print_table:
        print(table)
    return table
