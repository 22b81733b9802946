"""The chapter's optimizer-comparison experiments: train one model per optimizer from the same
initialization and record per-epoch curves (loss, accuracy, gradient norm, memory, time)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch
from torch import nn

from dldna_fused import optim, reference
from dldna_fused.experiments.data import num_labels, reseed
from dldna_fused.experiments.models import model_for
from dldna_fused.experiments.training import evaluate, memory_snapshot, reset_peak_memory, train_epoch

# name -> (optimizer class, default hyperparameters). The defaults are the chapter's where it
# gives them (SGD lr 0.01 momentum 0.9, Adam 1e-3, Lion 1e-4, Sophia 1e-3 rho 0.04).
OPTIMIZERS = {
    "sgd": (reference.SGD, dict(lr=0.01, momentum=0.9)),
    "adagrad": (reference.AdaGrad, dict(lr=0.01)),
    "rmsprop": (reference.RMSProp, dict(lr=1e-3)),
    "adam": (optim.Adam, dict(lr=1e-3)),
    "adamw": (optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "lion": (optim.Lion, dict(lr=1e-4)),
    "sophia": (optim.Sophia, dict(lr=1e-3, rho=0.04)),
    "adafactor": (optim.Adafactor, dict()),
    "torch-sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9)),
    "torch-adagrad": (torch.optim.Adagrad, dict(lr=0.01)),
    "torch-rmsprop": (torch.optim.RMSprop, dict(lr=1e-3)),
    "torch-adam": (torch.optim.Adam, dict(lr=1e-3)),
    "torch-adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "torch-adafactor": (torch.optim.Adafactor, dict()),
}

METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "gradient_norm", "memory",
           "state_memory", "peak_rss", "epoch_time")


def _optimizer_name(optimizer_class) -> str:
    """The registered name (``sgd``, ``torch-adam``), or the class name in lower case, so that
    every results file is named ``<optimizer>_<model>`` in one style."""
    for name, (cls, _) in OPTIMIZERS.items():
        if cls is optimizer_class:
            return name
    return getattr(optimizer_class, "__name__", "optimizer").lower()


def unique_stem(stem: str | Path, suffixes=(".csv", ".json")) -> Path:
    """``stem``, or, when a file ``stem + suffix`` already exists, ``stem-<YYYYmmdd-HHMMSS>`` (and
    ``-2``, ``-3``, ... within the same second): a run never overwrites another's results."""
    stem = Path(stem)

    def taken(candidate: Path) -> bool:
        return any(candidate.with_name(candidate.name + s).exists() for s in suffixes)

    if not taken(stem):
        return stem
    base = stem.with_name(f"{stem.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 2
    while taken(candidate):
        candidate, n = base.with_name(f"{base.name}-{n}"), n + 1
    return candidate


def save_results(results: dict, path_stem: str | Path) -> tuple[Path, Path]:
    """Writes one experiment's per-epoch lists as ``<stem>.csv`` (one row per epoch) and
    ``<stem>.json`` (under another stem when those exist, see :func:`unique_stem`); returns both
    paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem = unique_stem(stem)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    keys = [k for k in results if isinstance(results[k], list)]
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for i in range(len(results[keys[0]]) if keys else 0):
            writer.writerow([i + 1, *(results[k][i] for k in keys)])
    json_path.write_text(json.dumps(results, indent=2))
    return csv_path, json_path


def run_experiment(model: nn.Module, optimizer_class, train_loader, test_loader, config: dict, device,
                   epochs: int, *, name: str | None = None, results_dir: str | Path | None = None,
                   progress=None) -> dict:
    """Trains ``model`` with ``optimizer_class(model.parameters(), **config)`` and returns the
    per-epoch lists of METRICS (``memory`` etc. in MB, see training.memory_snapshot), plus
    ``optimizer``, ``name``, ``config`` and ``parameters``. With ``results_dir``, also writes them as
    ``<results_dir>/<name>.csv`` and ``.json``. ``progress``: a tqdm bar advanced once per epoch."""
    model = model.to(device)
    optimizer = optimizer_class(model.parameters(), **config)
    name = name or _optimizer_name(optimizer_class)
    results = {k: [] for k in METRICS}
    for _ in range(epochs):
        reset_peak_memory(device)
        start = time.perf_counter()
        train = train_epoch(model, train_loader, optimizer, device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        test = evaluate(model, test_loader, device)
        memory = memory_snapshot(model, optimizer, device)
        results["train_loss"].append(train["loss"])
        results["train_accuracy"].append(train["accuracy"])
        results["test_loss"].append(test["loss"])
        results["test_accuracy"].append(test["accuracy"])
        results["gradient_norm"].append(train["gradient_norm"])
        results["epoch_time"].append(elapsed)
        for key, value in memory.items():
            results[key].append(value)
        if progress is not None:
            progress.set_postfix_str(f"{name}: test acc {test['accuracy']:.3f}")
            progress.update(1)
    results["optimizer"] = _optimizer_name(optimizer_class)
    results["name"] = name
    results["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    results["parameters"] = sum(p.numel() for p in model.parameters())
    if results_dir is not None:
        save_results(results, Path(results_dir) / name)
    return results


def run_basic_experiment(optimizer_class, train_loader, test_loader, config: dict, device, epochs: int = 5, *,
                         act_func: nn.Module | None = None, seed: int = 0, results_dir: str | Path | None = "results",
                         progress=None) -> dict:
    """The chapter's basic experiment: its MLP (``SimpleNetwork``, sized to the loader's images)
    trained with ``optimizer_class(**config)``, initialized from ``seed``, with the training loader
    reshuffled from ``seed`` (so runs of different optimizers see the same batches). Returns per-epoch lists
    ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``gradient_norm``,
    ``memory``, ``epoch_time`` (and ``state_memory``, ``peak_rss``), also written under
    ``results_dir`` (see ``run_advanced_experiment``)."""
    return run_advanced_experiment(optimizer_class, "mlp", train_loader, test_loader, config, device, epochs,
                                   act_func=act_func, seed=seed, results_dir=results_dir, progress=progress)


def run_advanced_experiment(optimizer_class, model_type: str = "cnn", train_loader=None, test_loader=None,
                            config: dict | None = None, device="cpu", epochs: int = 5, *,
                            act_func: nn.Module | None = None, seed: int = 0,
                            results_dir: str | Path | None = "results", progress=None, size: str = "small") -> dict:
    """As ``run_basic_experiment`` with ``model_type`` "mlp", "cnn" (SmallCNN) or "transformer"
    (SmallViT), the latter two at ``size`` "small" or "chapter" (the chapter's parameter counts,
    see ``models.MODEL_SIZES``). As in the chapter, the results are also written, to
    ``<results_dir>/<optimizer>_<model_type>.csv`` and ``.json`` (default ``results/``;
    ``results_dir=None`` writes nothing; an earlier run's files are kept, see ``unique_stem``)."""
    if train_loader is None or test_loader is None:
        raise ValueError("train_loader and test_loader are required (see get_data_loaders)")
    x, _ = next(iter(train_loader))
    torch.manual_seed(seed)
    model = model_for(model_type, tuple(x.shape[1:]), num_labels(train_loader), act_func, size)
    reseed(train_loader, seed)
    name = f"{_optimizer_name(optimizer_class)}_{model_type}"
    return run_experiment(model, optimizer_class, train_loader, test_loader, config or {}, device, epochs,
                          name=name, results_dir=results_dir, progress=progress)
