"""Times a 41 x 41 loss surface of the chapter's SimpleNetwork (784-512-64-10, ReLU) on 256
samples: dldna_fused.landscape.xy_perturb_loss against the chapter-style loop, which deep-copies
the model and loads a state_dict per grid point and iterates a DataLoader over a torchvision
FashionMNIST dataset (its per-item transform included).

The 256 images are written to a temporary folder in FashionMNIST's IDX format (random pixels: the
timing does not depend on their values), so both sides read the same real files.

    python benchmarks/landscape_surface.py [--grid 41] [--samples 256]
"""

from __future__ import annotations

import argparse
import copy
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from dldna_fused.experiments import SimpleNetwork, get_dataset
from dldna_fused.landscape import random_directions, xy_perturb_loss


def write_fashion_mnist(root: Path, n: int) -> None:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            with open(raw / f"{prefix}-{kind}-ubyte", "wb") as f:
                f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
                f.write(array.astype(np.uint8).tobytes())


def chapter_style_surface(model, directions, loader, loss_func, lambdas):
    base = copy.deepcopy(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    Z = np.empty((len(lambdas), len(lambdas)))
    for i, b in enumerate(lambdas):
        for j, a in enumerate(lambdas):
            m = copy.deepcopy(model)
            state = copy.deepcopy(base)
            for name, d1, d2 in zip(names, *directions):
                state[name] = base[name] + float(a) * d1 + float(b) * d2
            m.load_state_dict(state)
            m.eval()
            total, n = 0.0, 0
            with torch.no_grad():
                for x, y in loader:
                    total += loss_func(m(x), y).item() * len(x)
                    n += len(x)
            Z[i, j] = total / n
    return Z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=41)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SimpleNetwork(nn.ReLU())
    directions = random_directions(model, 2)
    loss_func = nn.CrossEntropyLoss()
    lambdas = np.linspace(-1, 1, args.grid).astype(np.float32)
    with tempfile.TemporaryDirectory() as root:
        write_fashion_mnist(Path(root), args.samples)
        _, test = get_dataset("FashionMNIST", root=root)
        loader = DataLoader(Subset(test, range(args.samples)), batch_size=256, shuffle=False)
        start = time.perf_counter()
        _, _, ours = xy_perturb_loss(model, directions, loader, loss_func, lambdas, lambdas, "cpu", progress=False)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = chapter_style_surface(model, directions, loader, loss_func, lambdas)
        theirs_s = time.perf_counter() - start
    err = np.abs(ours - theirs).max()
    print(f"{args.grid} x {args.grid} surface, SimpleNetwork 784-512-64-10, {args.samples} samples, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"  xy_perturb_loss      {ours_s:8.2f} s")
    print(f"  chapter-style loop   {theirs_s:8.2f} s")
    print(f"  speed-up             {theirs_s / ours_s:8.1f}x   (max |difference| of the two surfaces: {err:.2e})")


if __name__ == "__main__":
    main()
