"""`dldna-fused init`: the chapter's initialization comparison on a dataset (digits by default):
the table of error rate, convergence speed, condition number, spectral norm, effective-rank ratio
and time per method, and the variance-propagation plot of a deep MLP under each method."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dldna_fused.init.analysis import analyze_initialization, create_detailed_analysis_table
from dldna_fused.init.methods import apply_init, init_methods
from dldna_fused.init.variance import plot_variance_propagation, variance_propagation
from dldna_fused.experiments.runner import unique_stem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dldna_fused.experiments.data import DATASETS, DEFAULT_ROOT

    parser.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default digits)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of local datasets (FashionMNIST, CIFAR-100)")
    parser.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(init_methods),
                        help="comma-separated, of: " + ", ".join(init_methods))
    parser.add_argument("--activation", default="PReLU", help="torch.nn activation of the MLP (default PReLU, "
                        "as in the chapter)")
    parser.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")], default=[512, 64],
                        help="hidden widths of the MLP, comma-separated")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per method")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="dldna_fused Adam's lr")
    parser.add_argument("--depth", type=int, default=16, help="hidden layers of the variance-propagation MLP")
    parser.add_argument("--width", type=int, default=256, help="width of the variance-propagation MLP")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    parser.add_argument("--out", default="results/init", help="folder for the table and figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from dldna_fused import optim
    from dldna_fused.experiments.data import get_data_loaders, num_labels
    from dldna_fused.experiments.models import SimpleNetwork, make_activation

    for name in args.methods:
        if name not in init_methods:
            raise SystemExit(f"--methods: unknown '{name}' (have: {', '.join(init_methods)})")
    methods = {name: init_methods[name] for name in args.methods}
    try:
        train_loader, test_loader = get_data_loaders(args.dataset, args.batch_size, args.root, args.download,
                                                     seed=args.seed)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    x, _ = next(iter(train_loader))
    features = x[0].numel()
    labels = num_labels(train_loader)

    def model_class():
        return SimpleNetwork(make_activation(args.activation), input_shape=features, hidden_shape=args.hidden,
                             num_labels=labels)

    results = analyze_initialization(model_class, methods, train_loader, test_loader, args.epochs, args.device,
                                     lambda params: optim.Adam(params, lr=args.lr), args.seed,
                                     progress=not args.no_progress)
    print(f"SimpleNetwork({args.activation}, hidden {args.hidden}) on {args.dataset}, {args.epochs} epochs, "
          f"Adam lr {args.lr}, seed {args.seed}, device {args.device}")
    create_detailed_analysis_table(results)

    # Variance against depth: a deep MLP of the same activation, on one training batch.
    variance = {}
    for name, method in methods.items():
        torch.manual_seed(args.seed)
        deep = SimpleNetwork(make_activation(args.activation), input_shape=features,
                             hidden_shape=[args.width] * args.depth, num_labels=labels)
        variance[name] = variance_propagation(apply_init(method, deep), x)
    print(f"\nVariance propagation through {args.depth} hidden layers of {args.width} ({args.activation}): "
          "output variance of the last weight layer / the first")
    for name, r in variance.items():
        print(f"  {name:<20} forward {r['forward'][-1] / r['forward'][0]:10.3g}   "
              f"backward (first / last) {r['backward'][0] / r['backward'][-1]:10.3g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # An earlier run's files stay: this run's get a run id (see unique_stem).
    run_id = unique_stem(out / "results", (".json",)).name[len("results"):]
    summary, figure = out / f"results{run_id}.json", out / f"variance{run_id}.png"
    plot_variance_propagation(variance, title=f"{args.depth} x {args.width} {args.activation} MLP",
                              save_path=figure)
    summary.write_text(json.dumps({"analysis": results, "variance": variance}, indent=2))
    print(f"wrote {summary}, {figure}", file=sys.stderr)
    return 0
