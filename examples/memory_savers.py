"""The two ways dldna_fused takes optimizer memory off the model's device, on scikit-learn's
digits, each against the plain loop it replaces:

* ``CPUOffloadOptimizer``: fp32 masters and 8-bit states in host memory, stepped there bucket by
  bucket (on a GPU when there is one; without one, CPU params stand in, which runs the same code
  except the host-device copies);
* ``step_in_backward``: the step inside backward, each bucket's grads freed as soon as applied.

    .venv/bin/python examples/memory_savers.py [--epochs 30]

It prints the final losses of each pair of runs; the offloaded AdamW8bit and the plain one on
fp32 copies agree to rounding, and the step inside backward equals backward() then step().
"""

import argparse
import copy

import torch
from sklearn.datasets import load_digits

from dldna_fused import optim
from dldna_fused.offload import CPUOffloadOptimizer


def data(device):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32, device=device) / 16.0
    return x, torch.tensor(digits.target, device=device)


def train(model, x, y, step, epochs: int) -> float:
    """``step(loss)`` does everything after the forward pass; returns the last loss."""
    loss = None
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        step(loss)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = data(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)

    # 1. Offload: the device keeps only the params and grads.
    offloaded, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    opt = CPUOffloadOptimizer(offloaded.parameters(), optim.AdamW8bit, lr=1e-2, min_8bit_size=0, max_grad_norm=1.0)
    plain = optim.AdamW8bit(plain_model.parameters(), lr=1e-2, min_8bit_size=0, max_grad_norm=1.0)

    def offloaded_step(loss):
        loss.backward()  # the hooks copy each grad to the host as it is ready
        opt.step()  # one fused host step per bucket, then the params go back
        opt.zero_grad()

    def plain_step(loss):
        loss.backward()
        plain.step()
        plain.zero_grad()

    a = train(offloaded, x, y, offloaded_step, args.epochs)
    b = train(plain_model, x, y, plain_step, args.epochs)
    state = opt.state[next(offloaded.parameters())]
    print(f"offloaded AdamW8bit on {device}: loss {a:.5f}, states on {state['exp_avg_codes'].device} "
          f"({', '.join(sorted(state))}); the same optimizer on the device: loss {b:.5f}")

    # 2. The step inside backward: a training step is loss.backward().
    in_backward, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    opt = optim.AdamW(in_backward.parameters(), lr=1e-2)
    handle = optim.step_in_backward(in_backward, opt, bucket_bytes=8 << 10)  # 2 buckets here
    plain = optim.AdamW(plain_model.parameters(), lr=1e-2)
    a = train(in_backward, x, y, lambda loss: loss.backward(), args.epochs)
    b = train(plain_model, x, y, plain_step, args.epochs)
    freed = all(p.grad is None for p in in_backward.parameters())
    print(f"AdamW stepped inside backward: loss {a:.5f} in {handle.steps} bucket steps, grads freed: {freed}; "
          f"backward() then step(): loss {b:.5f}")
    handle.remove()


if __name__ == "__main__":
    main()
