"""`dldna-fused landscape`: loss-landscape figures of the chapter's MLP, from checkpoints written
by train_model or from a quick training run on digits: loss surfaces along the top Hessian
eigenvectors and along filter-normalized random directions (3-D and contour), the linear
interpolation between the first and the last epoch, and the weight-space trajectory by PCA and
t-SNE. With --extras: a Gaussian fitted to the Hessian surface with SGD, momentum SGD and Adam
paths on it (gaussian), its wavelet decomposition (multiscale), its persistence diagram
(topology), and five more epochs of training dynamics (dynamics). Writes the PNGs and
landscape.json (eigenvalues with their convergence report, the Hessian trace, the extras'
numbers) to --out."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

EXTRAS = ["gaussian", "multiscale", "topology", "dynamics"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dldna_fused.experiments.data import DATASETS, DEFAULT_ROOT

    parser.add_argument("--checkpoints", default=None, help="folder of <model>-<act>-epoch<n>.pth files "
                        "(default: train the MLP on --dataset first, into OUT/checkpoints)")
    parser.add_argument("--activation", default="ReLU", help="the checkpoints' activation (default ReLU)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs to train, or to read from --checkpoints")
    parser.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default digits)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of local datasets (FashionMNIST, CIFAR-100)")
    parser.add_argument("--samples", type=int, default=256, help="test samples the losses are computed on")
    parser.add_argument("--grid", type=int, default=41, help="points per axis (odd keeps the centre)")
    parser.add_argument("--eigen-range", type=float, default=0.5, help="lambda range along eigenvectors")
    parser.add_argument("--random-range", type=float, default=1.0, help="lambda range along random directions")
    parser.add_argument("--top-n", type=int, default=4, help="Hessian eigenvectors (pairs make surfaces)")
    parser.add_argument("--perplexity", type=float, default=3.0, help="t-SNE perplexity of the weight-space plot")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to evaluate")
    parser.add_argument("--out", default="results/landscape", help="folder for the figures")
    parser.add_argument("--extras", type=lambda s: EXTRAS if s == "all" else s.split(","), default=[],
                        help="comma-separated, of: " + ", ".join(EXTRAS) + "; or all")
    parser.add_argument("--gaussian-range", type=float, default=1.0,
                        help="half-width of the 31 x 31 Hessian surface the Gaussian is fitted to (the chapter's 1)")
    parser.add_argument("--persistence-threshold", type=float, default=None,
                        help="a loss difference: minima whose persistence (death - birth loss) exceeds it are counted (None: 5%% of the surface's loss range)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train(args, out: Path) -> Path:
    from dldna_fused import optim
    from dldna_fused.experiments.data import get_data_loaders, num_labels
    from dldna_fused.experiments.models import SimpleNetwork, make_activation
    from dldna_fused.experiments.training import train_model

    train_loader, test_loader = get_data_loaders(args.dataset, 64, args.root, seed=args.seed)
    x, _ = next(iter(train_loader))
    torch.manual_seed(args.seed)
    model = SimpleNetwork(make_activation(args.activation), input_shape=x[0].numel(),
                          num_labels=num_labels(train_loader))
    folder = out / "checkpoints"
    train_model(model, train_loader, test_loader, args.device, optimizer=optim.Adam(model.parameters(), lr=1e-3),
                epochs=args.epochs, save_dir=folder, retrain=True, progress=not args.no_progress)
    return folder


def main(args: argparse.Namespace) -> int:
    from dldna_fused.experiments.checkpoints import CheckpointError
    from dldna_fused.experiments.data import get_dataset
    from dldna_fused.experiments.training import load_models_by_pattern
    from dldna_fused.landscape import (analyze_weight_space, hessian_eigenvectors, hessian_trace,
                                       linear_interpolation, random_directions, visualize_linear_interpolation,
                                       visualize_loss_surface, visualize_weight_space, xy_perturb_loss)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(args.checkpoints) if args.checkpoints else _train(args, out)
        models, labels = load_models_by_pattern([args.activation], list(range(1, args.epochs + 1)), folder,
                                                device=args.device)
        _, test = get_dataset(args.dataset, args.root)
    except (FileNotFoundError, CheckpointError) as e:
        # A user's mistake or a bad file: one line naming it, exit status 1, no traceback.
        raise SystemExit(f"dldna-fused landscape: {e}") from None
    loader = DataLoader(Subset(test, range(min(args.samples, len(test)))), batch_size=256)
    loss_func = nn.CrossEntropyLoss()
    final = models[-1]
    name = f"{args.activation}, epoch {args.epochs}"
    progress = None if not args.no_progress else False

    values, vectors, report = hessian_eigenvectors(final, loss_func, loader, args.top_n, args.device,
                                                   seed=args.seed, return_report=True)
    trace, trace_se = hessian_trace(final, loss_func, loader, 99, args.device, seed=args.seed, method="hutch++")
    eigen = np.linspace(-args.eigen_range, args.eigen_range, args.grid).astype(np.float32)
    surfaces = [xy_perturb_loss(final, vectors[2 * k:2 * k + 2], loader, loss_func, eigen, eigen, args.device,
                                progress) for k in range(args.top_n // 2)]
    pairs = [f"eigenvectors {2 * k + 1}-{2 * k + 2}" for k in range(args.top_n // 2)]
    for plot_3d, kind in ((True, "3d"), (False, "contour")):
        visualize_loss_surface(surfaces, name, plot_3d=plot_3d, labels=pairs, save_path=out / f"surface_hessian_{kind}.png")
    rand = np.linspace(-args.random_range, args.random_range, args.grid).astype(np.float32)
    random_surface = xy_perturb_loss(final, random_directions(final, 2, seed=args.seed), loader, loss_func, rand,
                                     rand, args.device, progress)
    for plot_3d, kind in ((True, "3d"), (False, "contour")):
        visualize_loss_surface([random_surface], name, plot_3d=plot_3d, labels=["filter-normalized random"],
                               save_path=out / f"surface_random_{kind}.png")
    alphas, losses, accuracies = linear_interpolation(models[0], final, loader, loss_func, args.device)
    visualize_linear_interpolation(alphas, losses, accuracies, f"epoch 1 -> epoch {args.epochs}",
                                   save_path=out / "interpolation.png")
    pca, explained = analyze_weight_space(models, labels, "pca", return_explained_variance=True)
    visualize_weight_space(pca, labels, "PCA", explained, save_path=out / "weight_space_pca.png")
    tsne = analyze_weight_space(models, labels, "tsne", perplexity=min(args.perplexity, len(models) - 1),
                                seed=args.seed)
    visualize_weight_space(tsne, labels, "t-SNE", save_path=out / "weight_space_tsne.png")

    summary = {"checkpoints": str(folder), "eigenvalues": values, "eigen_report": report,
               "hessian_trace": trace, "hessian_trace_stderr": trace_se,
               "center_loss": float(surfaces[0][2][args.grid // 2, args.grid // 2]) if args.grid % 2 else None,
               "interpolation": {"alphas": alphas.tolist(), "losses": losses, "accuracies": accuracies},
               "pca_explained_variance": explained.tolist()}
    summary.update(_extras(args, out, surfaces[0], vectors, final, loader, loss_func, name))
    (out / "landscape.json").write_text(json.dumps(summary, indent=2))
    print(f"top-{args.top_n} Hessian eigenvalues: " + ", ".join(f"{v:.4g}" for v in values)
          + f" (converged: {[r['converged'] for r in report]})")
    print(f"Hessian trace (Hutch++, 99 products): {trace:.4g} +- {trace_se:.2g}")
    print(f"interpolation loss: epoch 1 {losses[0]:.4f} -> epoch {args.epochs} {losses[-1]:.4f}")
    print(f"PCA explained variance: {explained[0]:.3f}, {explained[1]:.3f}")
    for line in _extras_report(summary):
        print(line)
    print(f"wrote the figures and landscape.json to {out}", file=sys.stderr)
    return 0


def _extras_report(summary: dict) -> list[str]:
    """The lines the extras' numbers get on the terminal (the README quotes them), from what
    _extras put in ``summary``; landscape.json holds them all."""
    lines = []
    fit = summary.get("gaussian_fit")
    if fit is not None:
        A, x0, y0, s1, s2 = fit["popt"]
        lines.append(f"Gaussian fit: A = {A:.4g}, sigma = ({s1:.3g}, {s2:.3g}), centre ({x0:.3g}, {y0:.3g}), "
                     f"offset {fit['offset']:.4g}")
        ends = ", ".join(f"{k} {math.hypot(e[0] - x0, e[1] - y0):.3g}" for k, e in fit["path_ends"].items())
        lines.append(f"after 100 steps on it, distance from the centre: {ends}")
    energy = summary.get("multiscale_energy")
    if energy is not None:
        lines.append(f"wavelet energy in the approximation: {100 * energy['fractions'][0]:.2f}%")
    topology = summary.get("topology")
    if topology is not None:
        lines.append(f"persistence: {topology['minima_above_threshold']} minima above {topology['threshold']:.3g}, "
                     f"longest finite lifetime {topology['longest_finite_lifetime']:.3g}")
    dynamics = summary.get("dynamics")
    if dynamics is not None:
        lines.append(f"{len(dynamics['loss'])} more Adam epochs: training loss {dynamics['loss'][0]:.3g} -> "
                     f"{dynamics['loss'][-1]:.3g}, weight norm {dynamics['weight_norm'][0]:.3g} -> "
                     f"{dynamics['weight_norm'][-1]:.3g}")
    return lines


def _extras(args, out: Path, surface, vectors, model, loader, loss_func, name: str) -> dict:
    """The figures of --extras, from the first Hessian surface (X, Y, Z), the eigenvectors and the
    final model."""
    from dldna_fused import optim, reference
    from dldna_fused.landscape import (analyze_loss_surface_multiscale, get_opt_params, persistence_diagram,
                                       persistence_summary, plot_persistence_diagram, train_loss_surface,
                                       visualize_gaussian_fit, visualize_optimization_path,
                                       visualize_training_dynamics)

    for extra in args.extras:
        if extra not in EXTRAS:
            raise SystemExit(f"--extras: unknown '{extra}' (have: {', '.join(EXTRAS)}, all)")
    X, Y, Z = surface
    found: dict = {}
    if "gaussian" in args.extras:
        from dldna_fused.landscape import xy_perturb_loss

        r = args.gaussian_range
        lambdas = np.linspace(-r, r, 31).astype(np.float32)
        GX, GY, GZ = xy_perturb_loss(model, vectors[:2], loader, loss_func, lambdas, lambdas, args.device, False)
        popt, _, offset = get_opt_params(GX, GY, GZ)
        visualize_gaussian_fit(GX, GY, GZ, popt, offset, -r, r, 31, save_path=out / "gaussian_fit.png")
        params = (*popt, offset)
        optimizers = {"SGD": lambda p: reference.SGD(p, lr=0.1), "SGD momentum": lambda p: reference.SGD(
            p, lr=0.05, momentum=0.8), "Adam (fused)": lambda p: optim.Adam(p, lr=0.1)}
        paths = [train_loss_surface(make, [-r, r], 100, params, seed=args.seed) for make in optimizers.values()]
        visualize_optimization_path(GX, GY, GZ, popt, offset, paths, list(optimizers), act_name=name,
                                    save_path=out / "optimizer_paths.png")
        found["gaussian_fit"] = {"popt": [float(v) for v in popt], "offset": offset,
                                 "path_ends": {k: p[-1].tolist() for k, p in zip(optimizers, paths)}}
    if "multiscale" in args.extras:
        result = analyze_loss_surface_multiscale(model, loader, loss_func, args.device, radius=args.eigen_range,
                                                 seed=args.seed, save_path=out / "multiscale.png")
        found["multiscale_energy"] = result["energy"]
    if "topology" in args.extras:
        diagram = persistence_diagram(Z)
        threshold = args.persistence_threshold if args.persistence_threshold is not None else 0.05 * float(np.ptp(Z))
        plot_persistence_diagram(diagram, save_path=out / "persistence.png")
        found["topology"] = {"threshold": threshold, **persistence_summary(diagram, threshold),
                             "points": {str(d): len(v) for d, v in diagram.items()}}
    if "dynamics" in args.extras:
        from dldna_fused.experiments.data import get_data_loaders

        train_loader, _ = get_data_loaders(args.dataset, 64, args.root, seed=args.seed)
        metrics = visualize_training_dynamics(model, optim.Adam(model.parameters(), lr=1e-3), train_loader, loss_func,
                                              5, args.device, save_path=out / "dynamics.png",
                                              progress=not args.no_progress)
        found["dynamics"] = dict(metrics)
    return found
