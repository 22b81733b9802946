"""Does quantizing the optimizer states cost quality? AdamW with fp32, 8-bit and 4-bit states on
the same models, data and seeds, every param's states quantized (min_8bit_size=0, since these
models are small):

* the digits MLP (scikit-learn's digits, 64-128-10), full-batch steps, loss on the test split;
* a 2-layer transformer LM on synthetic sequences: tokens from a fixed random second-order Markov
  chain (vocabulary 32, length 64), next-token loss on held-out sequences.

Prints the final losses (mean over seeds) and their ratio to fp32, and writes the curves.
    usage: python benchmarks/lowbit_quality.py [--out DIR] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from dldna_fused import optim
from dldna_fused.experiments.data import get_dataset

OPTIMIZERS = {
    "AdamW fp32": lambda ps, lr: optim.AdamW(ps, lr=lr),
    "AdamW8bit": lambda ps, lr: optim.AdamW8bit(ps, lr=lr, min_8bit_size=0),
    "AdamW4bit": lambda ps, lr: optim.AdamW4bit(ps, lr=lr, min_8bit_size=0),
}


def digits_curve(make_opt, seed: int, steps: int = 200) -> list[float]:
    train, test = get_dataset("digits")
    x, y = train.tensors[0].flatten(1), train.tensors[1]
    x_test, y_test = test.tensors[0].flatten(1), test.tensors[1]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = make_opt(model.parameters(), 1e-3)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x_test), y_test).item())
    return losses


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def markov_sequences(count: int, length: int = 64, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    """Sequences of a fixed random second-order Markov chain: each pair of tokens has a peaked
    next-token distribution, so a model that learns the table reaches a loss near its entropy."""
    g = torch.Generator().manual_seed(1234)  # the language: the same for every seed
    table = torch.softmax(torch.randn(vocab, vocab, vocab, generator=g) * 3, dim=-1)
    g.manual_seed(seed)
    seqs = torch.empty(count, length, dtype=torch.long)
    seqs[:, :2] = torch.randint(vocab, (count, 2), generator=g)
    for t in range(2, length):
        probs = table[seqs[:, t - 2], seqs[:, t - 1]]
        seqs[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return seqs


def lm_curve(make_opt, seed: int, steps: int = 300, batch: int = 32) -> list[float]:
    train, test = markov_sequences(4096, seed=1), markov_sequences(256, seed=2)
    torch.manual_seed(seed)
    model = TinyLM()
    opt = make_opt(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        tokens = train[torch.randint(len(train), (batch,), generator=g)]
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                model.eval()
                held_out = F.cross_entropy(model(test[:, :-1]).flatten(0, 1), test[:, 1:].flatten()).item()
                model.train()
            losses.append(held_out)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/lowbit_quality")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tasks = {"digits MLP (test loss)": digits_curve, "transformer LM (held-out loss)": lm_curve}
    curves: dict = {}
    for task, curve in tasks.items():
        for name, make_opt in OPTIMIZERS.items():
            curves[(task, name)] = [curve(make_opt, seed) for seed in range(args.seeds)]
    print(f"final loss, mean over {args.seeds} seeds (ratio to fp32)")
    summary = {}
    for task in tasks:
        base = statistics.mean(c[-1] for c in curves[(task, "AdamW fp32")])
        for name in OPTIMIZERS:
            final = statistics.mean(c[-1] for c in curves[(task, name)])
            summary[f"{task} / {name}"] = final
            print(f"  {task:32s} {name:11s} {final:.4f}  ({final / base:.4f})")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 3.8))
    for ax, task in zip(axes, tasks):
        for name in OPTIMIZERS:
            runs = torch.tensor(curves[(task, name)])
            x = torch.arange(1, runs.shape[1] + 1) * (1 if "digits" in task else 10)
            ax.plot(x, runs.mean(0), label=name)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lowbit_quality.png"), dpi=110)
    print(f"curves: {os.path.join(args.out, 'lowbit_quality.png')}")


if __name__ == "__main__":
    main()
