"""Training curves of several runs side by side (the chapter's ``plot_training_results``)."""

from __future__ import annotations

from pathlib import Path

from dldna_fused._plotting import finish_figure

_LABELS = {
    "loss": "loss", "accuracy": "accuracy", "gradient_norm": "gradient norm (mean per step)",
    "memory": "memory (MB)", "state_memory": "optimizer state (MB)", "epoch_time": "time per epoch (s)",
}
_PER_SPLIT = ("loss", "accuracy")


# Each run gets its own dash and marker besides its colour, so runs with equal values (e.g. the
# state memory of Adam and Sophia) stay visible on top of each other.
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 2)), "P")]


def plot_training_results(results: dict, metrics=None, mode: str = "train",
                          title: str | None = None, save_path: str | Path | None = None, size=None):
    """One panel per metric, one line per run, against the epoch.

    ``results`` maps a run's label to its result dict (run_basic_experiment's); "loss" and
    "accuracy" take the ``mode`` split ("train" or "test"), the other metrics are per epoch and
    measured while training, so by default only the train figure shows them (train: loss,
    accuracy, gradient_norm, memory; test: loss, accuracy). Returns the figure; ``save_path``
    also writes it (PNG by the suffix).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    if metrics is None:
        metrics = ("loss", "accuracy", "gradient_norm", "memory") if mode == "train" else ("loss", "accuracy")
    metrics = list(metrics)
    for m in metrics:
        if m not in _LABELS:
            raise ValueError(f"unknown metric {m!r}; have: {', '.join(_LABELS)}")
    fig, axes = plt.subplots(1, len(metrics), figsize=size or (4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        key = f"{mode}_{metric}" if metric in _PER_SPLIT else metric
        for i, (label, run) in enumerate(results.items()):
            values = run.get(key)
            if values:
                dash, marker = _STYLES[i % len(_STYLES)]
                ax.plot(range(1, len(values) + 1), values, linestyle=dash, marker=marker, markersize=4,
                        markerfacecolor="none", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional epochs on short runs
        ax.set_title(f"{mode} {_LABELS[metric]}" if metric in _PER_SPLIT else _LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return finish_figure(fig, title, save_path)
