"""Peak host memory of training steps per parameter, for the memory set-ups of issue 25: fp32 AdamW,
bf16 params with fp32 states, bf16 with AdamW8bit and stochastic rounding, and the same with the
step inside backward (and, for comparison, Kahan summation's extra bf16 state).

Each set-up runs in a fresh process: build the model (a stack of Linear(W, W) layers, ~200M
params at the defaults), take a few training steps on a small batch, and report the peak resident
set (``ru_maxrss``) minus the peak before the model was built (after a warm-up step on a small
model of the same kind), divided by the number of params. The batch is small, so activations are a rounding error next to the params.

    python benchmarks/train_memory.py [--layers 12] [--width 4096] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

STOCHASTIC = {"bf16_stochastic_round": True, "seed": 0}
BACKWARD_ONLY = "bf16 params, backward only, each grad dropped on arrival"
SETUPS = {
    "fp32 params, fp32 AdamW": ("float32", "AdamW", {}, False),
    "bf16 params, AdamW with fp32 states": ("bfloat16", "AdamW", {"state_dtype": "float32"}, False),
    "bf16 params, AdamW8bit, stochastic rounding": ("bfloat16", "AdamW8bit", STOCHASTIC, False),
    "bf16, AdamW8bit, stochastic rounding, step in backward": ("bfloat16", "AdamW8bit", STOCHASTIC, True),
    "bf16, AdamW8bit, Kahan summation, step in backward": ("bfloat16", "AdamW8bit", {"kahan_sum": True}, True),
    # No optimizer: each grad is dropped as it arrives. What remains over the 2 bytes of the params is
    # the backward's own memory: activations, and the transients of one layer's weight gradient.
    BACKWARD_ONLY: ("bfloat16", None, {}, True),
}


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(setup: str, layers: int, width: int, steps: int) -> dict:
    import torch

    from dldna_fused import optim

    dtype_name, cls_name, options, in_backward = SETUPS[setup]
    dtype = getattr(torch, dtype_name)
    options = {k: getattr(torch, v) if k == "state_dtype" else v for k, v in options.items()}
    torch.manual_seed(0)
    x = torch.randn(8, width, dtype=dtype)
    # A warm-up on a small model of the same kind, so that the libraries' lazy loading and thread
    # pools are in the starting resident set rather than counted as the training's memory.
    small = torch.nn.Linear(64, 64, dtype=dtype)
    small_opt = getattr(optim, cls_name or "AdamW")(small.parameters(), lr=1e-4, **options)
    small(torch.randn(2, 64, dtype=dtype)).float().sum().backward()
    small_opt.step()
    del small, small_opt
    before = _rss_bytes()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, dtype=dtype) for _ in range(layers)])
    params = sum(p.numel() for p in model.parameters())
    if cls_name is None:
        opt = None
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    else:
        opt = getattr(optim, cls_name)(model.parameters(), lr=1e-4, **options)
    handle = optim.step_in_backward(model, opt) if in_backward and opt is not None else None
    for _ in range(steps):
        loss = model(x).float().pow(2).mean()
        loss.backward()
        if handle is None and opt is not None:
            opt.step()
            opt.zero_grad()
    peak = _rss_bytes()
    return {"setup": setup, "params": params, "peak_minus_start_bytes": peak - before,
            "bytes_per_param": (peak - before) / params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one set-up
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.width, args.steps)))
        return
    print(f"{args.layers} x Linear({args.width}, {args.width}), {args.steps} steps, batch 8; peak RSS growth per param")
    rows = {}
    for setup in SETUPS:
        out = subprocess.run([sys.executable, __file__, "--one", setup, "--layers", str(args.layers),
                              "--width", str(args.width), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows[setup] = row
        print(f"  {setup:56s} {row['bytes_per_param']:6.2f} bytes/param "
              f"({row['peak_minus_start_bytes'] / 2**30:.2f} GiB for {row['params'] / 1e6:.0f}M params)")

    # The backward's own memory (activations, one layer's gradient transients), above the params.
    backward = rows[BACKWARD_ONLY]["bytes_per_param"] - 2.0
    print(f"the backward's own memory: {backward:.2f} bytes/param; the step-in-backward set-ups above it:")
    for setup, (_, cls_name, _, in_backward) in SETUPS.items():
        if in_backward and cls_name is not None:
            print(f"  {setup:56s} {rows[setup]['bytes_per_param'] - backward:6.2f} bytes/param")


if __name__ == "__main__":
    main()
