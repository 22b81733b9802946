"""Trajectories in weight space: each model flattened to one vector, embedded in 2-D by PCA or
t-SNE (scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dldna_fused._plotting import finish_figure


def flatten_weights(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()]).numpy()


def analyze_weight_space(models: list[nn.Module], labels=None, method: str = "pca", perplexity: float = 30.0,
                         seed: int = 0, return_explained_variance: bool = False):
    """The models' flattened weights embedded in 2-D: an ``n_models x 2`` array.

    ``method="pca"``: the projection on the first two principal components; with
    ``return_explained_variance`` also their explained-variance ratios. ``method="tsne"``:
    scikit-learn's t-SNE with ``perplexity``, which must be below the number of models (checked
    here, with a clear error). ``labels`` are accepted for the chapter's call and unused.
    """
    if len(models) < 2:
        raise ValueError(f"need at least two models, got {len(models)}")
    X = np.stack([flatten_weights(m) for m in models])
    if X.shape[1] != flatten_weights(models[0]).shape[0] or len({x.shape for x in X}) > 1:
        raise ValueError("all models must have the same number of parameters")
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        embedded = pca.fit_transform(X)
        return (embedded, pca.explained_variance_ratio_) if return_explained_variance else embedded
    if method == "tsne":
        from sklearn.manifold import TSNE

        if not 0 < perplexity < len(models):
            raise ValueError(f"t-SNE perplexity must be in (0, number of models = {len(models)}), got {perplexity}; "
                             f"pass e.g. perplexity={max(1, (len(models) - 1) // 3)}")
        return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(X)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def visualize_weight_space(embedded: np.ndarray, labels, method: str = "PCA", explained_variance=None,
                           title: str | None = None, save_path: str | Path | None = None, size=(6, 5)):
    """The embedded models as a path in order (start and end marked), each point labelled; PCA axes
    carry their explained-variance ratio when given. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.plot(embedded[:, 0], embedded[:, 1], "-", color="0.7", zorder=1)
    order = np.arange(1, len(embedded) + 1)
    points = ax.scatter(embedded[:, 0], embedded[:, 1], c=order, cmap="viridis", zorder=2)
    ax.scatter(*embedded[0], marker="s", s=80, facecolors="none", edgecolors="k", label="first")
    ax.scatter(*embedded[-1], marker="*", s=140, color="C3", label="last")
    # Labels alternate above and below their point, so neighbours close together stay readable,
    # and the margins keep the outermost labels inside the axes.
    for i, ((x, y), label) in enumerate(zip(embedded, labels or [])):
        ax.annotate(str(label), (x, y), fontsize=7, xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")
    ax.margins(0.18)
    names = ("component 1", "component 2")
    if explained_variance is not None:
        names = tuple(f"{n} ({100 * r:.1f}%)" for n, r in zip(names, explained_variance))
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    bar = fig.colorbar(points, ax=ax, label="checkpoint, in order (1 = first)")
    bar.set_ticks(order if len(order) <= 12 else np.linspace(1, len(order), 6).round())
    ax.legend(fontsize=8)
    return finish_figure(fig, title or f"weight space ({method})", save_path)
