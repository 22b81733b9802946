"""Memory and time of one Adafactor step on a LLaMA-like parameter list (issue 15's GPU check).

The list has LLaMA-7B's shapes (embedding and LM head [32000, 4096]; per layer q/k/v/o
[4096, 4096], gate/up [11008, 4096], down [4096, 11008] and two [4096] norms; 32 layers), with
every dimension divided by ``--shrink`` and ``--layers`` layers. After a first step (which creates
the states), the allocator's peak over a second step minus what was allocated before it is the
step's own workspace: the figure the CUDA AdaFactor must keep at O(rows + columns).
    usage: python benchmarks/adafactor_memory.py [--device cuda] [--dtype bfloat16] [--shrink 1] [--layers 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from dldna_fused import optim


def llama_shapes(shrink: int, layers: int) -> list[tuple[int, ...]]:
    d, ff, vocab = 4096 // shrink, 11008 // shrink, 32000 // shrink
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shrink", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = llama_shapes(args.shrink, args.layers)
    params = [torch.nn.Parameter(torch.randn(s, device=args.device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = optim.Adafactor(params)
    opt.step()  # creates the states
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    numel = sum(p.numel() for p in params)
    param_bytes = numel * params[0].element_size()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t))
    print(f"{len(params)} tensors, {numel / 1e9:.3f} G params ({args.dtype}, {param_bytes / 2**30:.2f} GiB), "
          f"states {state_bytes / 2**20:.1f} MiB, step {elapsed * 1e3:.1f} ms")
    if cuda:
        workspace = torch.cuda.max_memory_allocated() - before
        print(f"step workspace (peak over the step): {workspace / 2**20:.1f} MiB = "
              f"{100 * workspace / param_bytes:.3f}% of the params' bytes")


if __name__ == "__main__":
    main()
