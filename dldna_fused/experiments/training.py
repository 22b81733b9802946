"""Training and evaluation loops with per-epoch metrics, and the checkpoints the landscape and
initialization tools read back (``load_model``, ``load_models_by_pattern``)."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from torch import nn

from dldna_fused.bench import optimizer_state_bytes
from dldna_fused.experiments.checkpoints import (CheckpointFormatError, load_weights, read_checkpoint,
                                                 save_checkpoint)
from dldna_fused.experiments.models import activation_name, build_model, fit_to_data

DEFAULT_SAVE_DIR = "./tmp/models"


def model_name(model: nn.Module) -> str:
    """``<class>-<activation>``, e.g. ``SimpleNetwork-ReLU``: the stem of the model's checkpoints."""
    act = getattr(model, "act_func", None)
    return f"{type(model).__name__}-{activation_name(act)}" if act is not None else type(model).__name__


def _is_sophia(optimizer) -> bool:
    return hasattr(optimizer, "should_update_hessian") and hasattr(optimizer, "update_hessian")


def _update_sophia_hessian(optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_func) -> None:
    """Sophia's Hessian EMA every k steps, with the estimator of its first group: GNB (labels
    sampled from the model's softmax) or Hutchinson (the batch loss's grads, with a graph, from
    autograd.grad)."""
    from dldna_fused.optim.sophia import gnb_loss

    if not optimizer.should_update_hessian():
        return
    optimizer.zero_grad(set_to_none=True)
    if optimizer.param_groups[0].get("estimator", "gnb") == "gnb":
        gnb_loss(model(x)).backward()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss_func(model(x), y), params, create_graph=True)
        for p, g in zip(params, grads):
            p.grad = g
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)


def train_epoch(model: nn.Module, loader, optimizer, device, loss_func=None) -> dict:
    """One pass over ``loader``: mean loss and accuracy over the samples, the mean over steps of
    the total gradient L2 norm (before the step), and each step's loss (``step_losses``).
    Sophia's Hessian is updated every k steps."""
    loss_func = loss_func or nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen, norm_sum, step_losses = 0.0, 0, 0, 0.0, []
    sophia = _is_sophia(optimizer)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_func(logits, y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm_sum += torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item() if grads else 0.0
        if sophia:
            optimizer.step(bs=len(x))
            _update_sophia_hessian(optimizer, model, x, y, loss_func)
        else:
            optimizer.step()
        step_losses.append(loss.item())
        total_loss += step_losses[-1] * len(x)
        correct += (logits.argmax(dim=-1) == y).sum().item()
        seen += len(x)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "gradient_norm": norm_sum / max(len(step_losses), 1), "step_losses": step_losses}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, loss_func=None) -> dict:
    """Mean loss and accuracy of ``model`` (in eval mode, restored after) over ``loader``."""
    loss_func = loss_func or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += loss_func(logits, y).item() * len(x)
            correct += (logits.argmax(dim=-1) == y).sum().item()
            seen += len(x)
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


def memory_snapshot(model: nn.Module, optimizer, device) -> dict:
    """The memory figures of one epoch, in MB. ``memory`` is the optimizer-state bytes plus the
    peak: on CUDA the caching allocator's peak allocation during the epoch (reset by
    ``reset_peak_memory``); on the CPU, which keeps no allocator statistics, the bytes of the
    parameters and their gradients, so activations are not counted there. ``peak_rss`` is the
    process's resident-set high-water mark (all of Python; it never decreases)."""
    state = optimizer_state_bytes(optimizer)
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in model.parameters())
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory": (state + peak) / 2**20, "state_memory": state / 2**20, "peak_rss": rss_kb / 1024}


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train_model(model: nn.Module, train_loader, test_loader, device, optimizer=None, epochs: int = 10,
                save_dir: str | Path = DEFAULT_SAVE_DIR, retrain: bool = False, batch_size: int | None = None,
                loss_func=None, progress: bool = True) -> dict:
    """Trains ``model`` and returns the chapter's dict: ``epochs``, ``train_losses``,
    ``train_accuracies``, ``test_losses``, ``test_accuracies`` (one entry per epoch).

    After every epoch the model is saved to ``save_dir/<class>-<activation>-epoch<n>.pth`` and,
    at the end, to ``<class>-<activation>.pth`` (``load_model`` reads both). Unless ``retrain``,
    an existing final checkpoint is loaded into ``model`` instead of training, and its metrics are
    returned; it is read safely (nothing in it is executed), and one that is unsafe, corrupt or of
    another architecture raises a ``CheckpointError`` naming it and leaves ``model`` unchanged. ``optimizer`` defaults to dldna_fused's fused Adam (lr 1e-3); ``batch_size`` is
    accepted for the chapter's call and unused (the loaders set it).
    """
    from tqdm.auto import tqdm

    from dldna_fused import optim

    model = model.to(device)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    name = model_name(model)
    final = save_dir / f"{name}.pth"
    if final.exists() and not retrain:
        checkpoint = read_checkpoint(final, device)
        fit_to_data(model, next(iter(train_loader))[0])  # a lazily sized model takes its shapes first
        load_weights(model, checkpoint["state_dict"], final)
        print(f"Loaded {final} (trained for {checkpoint['epoch']} epochs); pass retrain=True to train again.")
        return checkpoint["metrics"]
    fit_to_data(model, next(iter(train_loader))[0])  # SimpleNetwork() takes its input size from the data
    optimizer = optimizer if optimizer is not None else optim.Adam(model.parameters(), lr=1e-3)
    metrics = {"epochs": [], "train_losses": [], "train_accuracies": [], "test_losses": [], "test_accuracies": []}
    print(f"Starting training for {name}.")
    start = time.perf_counter()
    # leave=False: the lines around it say when training starts and ends; a finished bar left in a
    # log without a terminal width is a blank line.
    for epoch in tqdm(range(1, epochs + 1), desc=name, disable=not progress, leave=False):
        train = train_epoch(model, train_loader, optimizer, device, loss_func)
        test = evaluate(model, test_loader, device, loss_func)
        metrics["epochs"].append(epoch)
        metrics["train_losses"].append(train["loss"])
        metrics["train_accuracies"].append(train["accuracy"])
        metrics["test_losses"].append(test["loss"])
        metrics["test_accuracies"].append(test["accuracy"])
        save_checkpoint(model, save_dir / f"{name}-epoch{epoch}.pth", epoch, metrics)
    save_checkpoint(model, final, epochs, metrics)
    print(f"Execution completed for {name}, Execution time = {time.perf_counter() - start:.1f} secs")
    return metrics


def load_model(model_file: str, path: str | Path = DEFAULT_SAVE_DIR, device="cpu"):
    """``(model, info)`` from a checkpoint written by ``train_model``: the model rebuilt from its
    recorded class and arguments with the saved weights, and ``info`` = {"epoch", "metrics"}.

    The file is read with ``weights_only=True``: nothing in it is executed. A file that is unsafe,
    truncated, corrupt, not a train_model checkpoint, or whose weights do not fit its recorded
    model raises a ``CheckpointError`` subclass naming it (see dldna_fused.experiments.checkpoints).
    """
    file = Path(path) / model_file
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint {file}; train_model(..., save_dir={str(path)!r}) writes them")
    checkpoint = read_checkpoint(file, device)
    if not isinstance(checkpoint.get("config"), dict) or not isinstance(checkpoint.get("class"), str):
        raise CheckpointFormatError(file, f"does not record how to rebuild its model (class "
                                          f"{checkpoint.get('class')!r}, config {checkpoint.get('config')!r})")
    try:
        model = build_model(checkpoint["class"], checkpoint["config"]).to(device)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointFormatError(file, f"records a model that cannot be built: {error}") from None
    load_weights(model, checkpoint["state_dict"], file)
    return model, {"epoch": checkpoint.get("epoch"), "metrics": checkpoint.get("metrics")}


def load_models_by_pattern(activation_types=("ReLU",), epochs=(1,), path: str | Path = DEFAULT_SAVE_DIR,
                           model_class: str = "SimpleNetwork", device="cpu"):
    """``(models, labels)``: the checkpoints ``<model_class>-<act>-epoch<n>.pth`` for every
    activation and epoch given, in that order, labelled ``"<act> epoch <n>"``. A missing one raises
    FileNotFoundError naming it."""
    models, labels = [], []
    for act in activation_types:
        for epoch in epochs:
            model, _ = load_model(f"{model_class}-{act}-epoch{epoch}.pth", path, device)
            models.append(model)
            labels.append(f"{act} epoch {epoch}")
    return models, labels
