"""Training dynamics per epoch: loss, gradient norm, parameter change, weight norm and loss
improvement, with the chapter's five-panel figure."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dldna_fused._plotting import finish_figure

KEYS = ("loss", "grad_norm", "param_change", "weight_norm", "loss_improvement")


class TrainingDynamics(dict):
    """The chapter's metrics dict (one list per key of KEYS, one entry per epoch), with the
    figure as ``.figure``."""

    figure = None


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def visualize_training_dynamics(model: nn.Module, optimizer, train_loader, loss_func=None, num_epochs: int = 10,
                                device="cpu", save_path: str | Path | None = None, progress: bool = True):
    """Trains ``model`` for ``num_epochs`` with ``optimizer`` (any optimizer; Sophia's Hessian is
    updated every k steps) and records per epoch:

    - ``loss``: mean training loss over the epoch's batches (weighted by batch size);
    - ``grad_norm``: mean over steps of the total gradient L2 norm;
    - ``param_change``: ||theta_end - theta_start|| over the epoch;
    - ``weight_norm``: ||theta|| at the end of the epoch;
    - ``loss_improvement``: the previous epoch's loss minus this one's; for the first epoch, the
      model's mean loss over the loader before training (in eval mode) minus its loss.

    Returns the metrics dict (``TrainingDynamics``) with the five-panel figure as ``.figure``.
    """
    from tqdm.auto import tqdm

    from dldna_fused.experiments.training import evaluate, train_epoch

    loss_func = loss_func or nn.CrossEntropyLoss()
    model = model.to(device)
    previous = evaluate(model, train_loader, device, loss_func)["loss"]
    metrics = TrainingDynamics({key: [] for key in KEYS})
    for _ in tqdm(range(num_epochs), desc="dynamics", disable=not progress, leave=False):
        before = _flat(model)
        epoch = train_epoch(model, train_loader, optimizer, device, loss_func)
        after = _flat(model)
        metrics["loss"].append(epoch["loss"])
        metrics["grad_norm"].append(epoch["gradient_norm"])
        metrics["param_change"].append((after - before).norm().item())
        metrics["weight_norm"].append(after.norm().item())
        metrics["loss_improvement"].append(previous - epoch["loss"])
        previous = epoch["loss"]
    metrics.figure = plot_training_dynamics(metrics, save_path=save_path)
    return metrics


def plot_training_dynamics(metrics: dict, title: str | None = "training dynamics",
                           save_path: str | Path | None = None):
    """One panel per metric of KEYS against the epoch. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(3.6 * len(KEYS), 3.2))
    for ax, key in zip(axes, KEYS):
        values = metrics[key]
        ax.plot(range(1, len(values) + 1), values, "o-", markersize=3)
        if key == "loss_improvement":
            ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return finish_figure(fig, title, save_path)
