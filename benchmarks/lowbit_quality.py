"""Do low-precision states or params cost quality? On the same models, data and seeds:

* the digits MLP (scikit-learn's digits, 64-128-10), full-batch steps, loss on the test split;
* a 2-layer transformer LM on synthetic sequences: tokens from a fixed random second-order Markov
  chain (vocabulary 32, length 64), next-token loss on held-out sequences.

Default: AdamW with fp32, 8-bit and 4-bit states, every param's states quantized (min_8bit_size=0,
since these models are small). With --bf16, pure-bf16 training (issue 25): fp32 params and AdamW
against bf16 params with fp32 states written to nearest, with stochastic
rounding, with Kahan summation, and with stochastic rounding and AdamW8bit (the MLP computes in
bf16; the LM reads its bf16 weights as fp32, see lm_logits); the LM also runs at a 10x smaller lr,
where writing to nearest loses most updates.

Prints the final losses (mean over seeds) and their ratio to fp32, and writes the curves.
    usage: python benchmarks/lowbit_quality.py [--out DIR] [--seeds N] [--bf16]
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

# name -> (params' dtype, make_opt(params, lr, seed))
OPTIMIZERS = {
    "AdamW fp32": (torch.float32, lambda ps, lr, seed: optim.AdamW(ps, lr=lr)),
    "AdamW8bit": (torch.float32, lambda ps, lr, seed: optim.AdamW8bit(ps, lr=lr, min_8bit_size=0)),
    "AdamW4bit": (torch.float32, lambda ps, lr, seed: optim.AdamW4bit(ps, lr=lr, min_8bit_size=0)),
}
BF16_SETUPS = {
    "fp32 params, AdamW": (torch.float32, lambda ps, lr, seed: optim.AdamW(ps, lr=lr)),
    "bf16, fp32 states, nearest": (torch.bfloat16, lambda ps, lr, seed: optim.AdamW(
        ps, lr=lr, state_dtype=torch.float32)),
    "bf16, stochastic rounding": (torch.bfloat16, lambda ps, lr, seed: optim.AdamW(
        ps, lr=lr, state_dtype=torch.float32, bf16_stochastic_round=True, seed=seed)),
    "bf16, Kahan summation": (torch.bfloat16, lambda ps, lr, seed: optim.AdamW(
        ps, lr=lr, state_dtype=torch.float32, kahan_sum=True)),
    "bf16, stochastic rounding, AdamW8bit": (torch.bfloat16, lambda ps, lr, seed: optim.AdamW8bit(
        ps, lr=lr, min_8bit_size=0, bf16_stochastic_round=True, seed=seed)),
}


def digits_curve(setup, seed: int, steps: int = 200, lr: float = 1e-3) -> list[float]:
    dtype, make_opt = setup
    train, test = get_dataset("digits")
    x, y = train.tensors[0].flatten(1).to(dtype), train.tensors[1]
    x_test, y_test = test.tensors[0].flatten(1).to(dtype), test.tensors[1]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(dtype)
    opt = make_opt(model.parameters(), lr, seed)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x_test).float(), y_test).item())
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


def lm_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The LM's logits in fp32. bf16 params are read as fp32 for the forward (their grads come back
    in bf16): this CPU has no bf16 matmul units, so a bf16 forward would take 4x as long, and the
    set-ups differ only in how the optimizer writes the params, which this keeps whole."""
    params = dict(model.named_parameters())
    if next(iter(params.values())).dtype == torch.float32:
        return model(tokens)
    return torch.func.functional_call(model, {k: v.float() for k, v in params.items()}, (tokens,))


def lm_curve(setup, seed: int, steps: int = 300, batch: int = 32, lr: float = 3e-3) -> list[float]:
    dtype, make_opt = setup
    train, test = markov_sequences(4096, seed=1), markov_sequences(256, seed=2)
    torch.manual_seed(seed)
    model = TinyLM().to(dtype)
    opt = make_opt(model.parameters(), lr, seed)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        tokens = train[torch.randint(len(train), (batch,), generator=g)]
        loss = F.cross_entropy(lm_logits(model, tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                model.eval()
                held_out = F.cross_entropy(lm_logits(model, test[:, :-1]).flatten(0, 1), test[:, 1:].flatten()).item()
                model.train()
            losses.append(held_out)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default results/lowbit_quality (--bf16: results/bf16_quality)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="the pure-bf16 set-ups instead of the low-bit states")
    args = parser.parse_args()
    if args.out is None:
        args.out = "results/bf16_quality" if args.bf16 else "results/lowbit_quality"
    os.makedirs(args.out, exist_ok=True)
    setups = BF16_SETUPS if args.bf16 else OPTIMIZERS
    tasks = {"digits MLP (test loss)": digits_curve, "transformer LM (held-out loss)": lm_curve}
    if args.bf16:
        tasks["transformer LM, lr 3e-4 (held-out loss)"] = lambda setup, seed: lm_curve(setup, seed, lr=3e-4)
    curves: dict = {}
    for task, curve in tasks.items():
        for name, setup in setups.items():
            curves[(task, name)] = [curve(setup, seed) for seed in range(args.seeds)]
    base_name = next(iter(setups))
    print(f"final loss, mean over {args.seeds} seeds (ratio to {base_name}; min and max over seeds)")
    summary = {}
    width = max(map(len, setups))
    for task in tasks:
        print(f"  {task}")
        base = statistics.mean(c[-1] for c in curves[(task, base_name)])
        for name in setups:
            finals = [c[-1] for c in curves[(task, name)]]
            final = statistics.mean(finals)
            summary[f"{task} / {name}"] = {"mean": final, "ratio": final / base, "seeds": finals}
            print(f"    {name:{width}s} {final:.4f}  ({final / base:.4f})  [{min(finals):.4f}, {max(finals):.4f}]")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8))
    for ax, task in zip(axes, tasks):
        for name in setups:
            runs = torch.tensor(curves[(task, name)])
            x = torch.arange(1, runs.shape[1] + 1) * (1 if "digits" in task else 10)
            ax.plot(x, runs.mean(0), label=name)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    image = os.path.join(args.out, "bf16_quality.png" if args.bf16 else "lowbit_quality.png")
    fig.savefig(image, dpi=110)
    print(f"curves: {image}")


if __name__ == "__main__":
    main()
