"""`dldna-fused compare`: train one model per optimizer from the same initialization, print a
table (final and best test accuracy, time per epoch, optimizer-state memory), and write
DIR/results.json, one CSV/JSON per run and the PNG curves."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from pathlib import Path

import torch

from dldna_fused.experiments.data import DATASETS, DEFAULT_ROOT, get_data_loaders
from dldna_fused.experiments.plots import plot_training_results
from dldna_fused.experiments.runner import OPTIMIZERS, run_advanced_experiment, unique_stem


def _setting(text: str) -> tuple[str, str, object]:
    """"adam.lr=3e-3" -> ("adam", "lr", 0.003); values are Python literals ("(0.9, 0.99)", "None")."""
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not (sep and dot and name and key):
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected OPTIMIZER.ARG=VALUE, e.g. adam.lr=3e-3")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name, key, parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default digits)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of the torchvision datasets (default "
                        "$DLDNA_DATA or ./data)")
    parser.add_argument("--download", action="store_true", help="download FashionMNIST/CIFAR100 if missing")
    parser.add_argument("--model", choices=("mlp", "cnn", "transformer"), default="mlp", help="the model trained")
    parser.add_argument("--size", choices=("small", "chapter"), default="small",
                        help="CNN/Transformer size: CPU-sized, or the chapter's (~1.2M / ~64M parameters)")
    parser.add_argument("--optimizers", type=lambda s: s.split(","), default=["sgd", "adam", "lion", "sophia",
                                                                              "adafactor"],
                        help="comma-separated, of: " + ", ".join(OPTIMIZERS))
    parser.add_argument("--set", dest="settings", type=_setting, action="append", default=[],
                        metavar="OPT.ARG=VALUE", help="a hyperparameter, e.g. --set adam.lr=3e-3 (repeatable)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per optimizer")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--train-size", type=int, default=None, help="random training subset of this size")
    parser.add_argument("--test-size", type=int, default=None, help="random test subset of this size")
    parser.add_argument("--seed", type=int, default=0, help="model initialization and shuffling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    parser.add_argument("--out", default="results/compare", help="output folder (default results/compare)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def format_table(results: dict) -> str:
    header = (f"{'optimizer':<16}{'final test acc':>15}{'best test acc':>15}{'final train loss':>18}"
              f"{'s / epoch':>11}{'state MB':>10}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(f"{name:<16}{r['test_accuracy'][-1]:>15.4f}{max(r['test_accuracy']):>15.4f}"
                     f"{r['train_loss'][-1]:>18.4f}{sum(r['epoch_time']) / len(r['epoch_time']):>11.2f}"
                     f"{r['state_memory'][-1]:>10.3f}")
    return "\n".join(lines)


def _check_config(name: str, cls, config: dict) -> None:
    """Exits naming the setting when ``cls(params, **config)`` would fail: an argument ``cls`` does
    not take (listing those it does) or a value it refuses, before any training starts."""
    accepted = [p for p in inspect.signature(cls).parameters.values()
                if p.name != "params" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = {p.name for p in accepted}
    for key in config:
        if key not in names:
            raise SystemExit(f"--set {name}.{key}: {cls.__name__} has no argument '{key}' "
                             f"(have: {', '.join(p.name for p in accepted)})")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **config)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--set {name}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())}) "
                         f"is refused: {error}") from None


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    for name in args.optimizers:
        if name not in OPTIMIZERS:
            raise SystemExit(f"--optimizers: unknown '{name}' (have: {', '.join(OPTIMIZERS)})")
    configs = {name: dict(OPTIMIZERS[name][1]) for name in args.optimizers}
    for name, key, value in args.settings:
        if name not in configs:
            raise SystemExit(f"--set {name}.{key}: '{name}' is not among --optimizers")
        configs[name][key] = value
    for name, config in configs.items():
        _check_config(name, OPTIMIZERS[name][0], config)
    try:
        train_loader, test_loader = get_data_loaders(args.dataset, args.batch_size, args.root, args.download,
                                                     args.train_size, args.test_size, seed=args.seed)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    bar = tqdm(total=len(args.optimizers) * args.epochs, desc="compare", disable=args.no_progress, file=sys.stderr)
    for name in args.optimizers:
        results[name] = run_advanced_experiment(
            OPTIMIZERS[name][0], args.model, train_loader, test_loader, configs[name], args.device, args.epochs,
            seed=args.seed, results_dir=out, progress=bar, size=args.size)
    bar.close()
    title = f"{args.model} on {args.dataset}" if args.model == "mlp" else f"{args.model} ({args.size}) on {args.dataset}"
    print(f"{title}, {args.epochs} epochs, batch {args.batch_size}, device {args.device}, seed {args.seed}")
    print(format_table(results))
    # One run id for this run's summary and figures when an earlier run's are in the folder.
    run_id = unique_stem(out / "results", (".json",)).name[len("results"):]
    summary = out / f"results{run_id}.json"
    summary.write_text(json.dumps(
        {"dataset": args.dataset, "model": args.model, "size": args.size, "epochs": args.epochs,
         "batch_size": args.batch_size,
         "seed": args.seed, "device": str(args.device), "runs": results}, indent=2))
    curves = {mode: out / f"curves_{mode}{run_id}.png" for mode in ("train", "test")}
    for mode, path in curves.items():
        plot_training_results(results, mode=mode, title=f"{title}: {mode}", save_path=path)
    print(f"wrote {summary}, {curves['train']}, {curves['test']}")
    return 0
