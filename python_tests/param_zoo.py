"""The param zoo: one set of params that every optimizer test draws from (issue 23).

A bf16 0-d param crashed every optimizer's step because no test crossed that dtype with that
shape. The zoo crosses each dtype (fp32, bf16, fp16, and all three mixed in one group) with
every shape that takes a different path somewhere: 0-d, (1,), empty, lengths around the vector
width and the low-bit block sizes (255, 256, 257, 4095, 4097), a non-contiguous (strided) view,
a view at an odd storage offset, a transposed matrix, a [B, R, C] stack and a [O, I, 1, 1] conv
weight. Params are split over several param groups, so that a failure can sit in the last one.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "mixed": None}
MIXED = (torch.float32, torch.bfloat16, torch.float16)

# name -> a function of (generator, dtype) making the param's start value
SHAPES = {
    "0-d": lambda g, dt: torch.randn((), generator=g).to(dt),
    "(1,)": lambda g, dt: torch.randn(1, generator=g).to(dt),
    "empty": lambda g, dt: torch.randn(0, generator=g).to(dt),
    "255": lambda g, dt: torch.randn(255, generator=g).to(dt),
    "256": lambda g, dt: torch.randn(256, generator=g).to(dt),
    "257": lambda g, dt: torch.randn(257, generator=g).to(dt),
    "4095": lambda g, dt: torch.randn(4095, generator=g).to(dt),
    "4097": lambda g, dt: torch.randn(4097, generator=g).to(dt),
    # Every other element of a buffer: not dense, so it gets its own state tensors.
    "strided-view": lambda g, dt: torch.randn(2 * 129, generator=g).to(dt)[::2],
    # Elements 3..133 of a buffer: dense, but its data does not start at the storage's start.
    "offset-view": lambda g, dt: torch.randn(140, generator=g).to(dt)[3:133],
    "transposed": lambda g, dt: torch.randn(9, 6, generator=g).to(dt).t(),
    "[B,R,C]": lambda g, dt: torch.randn(3, 5, 7, generator=g).to(dt),
    "[O,I,1,1]": lambda g, dt: torch.randn(8, 4, 1, 1, generator=g).to(dt),
}
GROUPS = 3


def zoo(dtype_name: str, seed: int = 0, device: str = "cpu") -> list[list[torch.Tensor]]:
    """The zoo's start values as ``GROUPS`` lists of tensors (one per param group): every shape
    once, dealt round-robin over the groups, in ``DTYPES[dtype_name]`` (for "mixed", fp32, bf16
    and fp16 in turn, so each group holds all three)."""
    g = torch.Generator().manual_seed(seed)
    groups: list[list[torch.Tensor]] = [[] for _ in range(GROUPS)]
    for i, make in enumerate(SHAPES.values()):
        dtype = DTYPES[dtype_name] or MIXED[i % len(MIXED)]
        groups[i % GROUPS].append(make(g, dtype).to(device))
    return groups


def as_params(starts: list[list[torch.Tensor]], dtype: torch.dtype | None = None) -> list[list[torch.nn.Parameter]]:
    """Parameters holding copies of ``starts`` with the same shapes, strides and storage offsets
    (as ``dtype`` when given, e.g. float64 for the exact run)."""
    out = []
    for group in starts:
        params = []
        for t in group:
            base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
            view = base.as_strided(t.shape, t.stride(), t.storage_offset())
            view.copy_(t)
            if dtype is not None:
                base = base.to(dtype)
                view = base.as_strided(t.shape, t.stride(), t.storage_offset())
            params.append(torch.nn.Parameter(view))
        out.append(params)
    return out


def zoo_grads(starts: list[list[torch.Tensor]], steps: int, seed: int = 1) -> list[list[list]]:
    """Per step, per group, per param: a grad (float32 values, cast by the caller) or None. Each
    param goes without a grad on one step in four, staggered."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        per_group = []
        k = 0
        for group in starts:
            grads = []
            for t in group:
                grads.append(None if (k + step) % 4 == 3 else torch.randn(t.shape, generator=g))
                k += 1
            per_group.append(grads)
        out.append(per_group)
    return out
