"""[Note: flat state]: optimizer states laid out as views of one buffer per (state key, device,
dtype), and the helpers that make and fill them."""

from __future__ import annotations

import math

import torch

# [Note: flat state]
# Optimizer states are created (and, after load_state_dict, re-packed) as views into one buffer
# per (state key, device, dtype), in the order of the params, with each param's segment padded to
# 64 bytes. state_dict keeps torch.optim's layout, one tensor per param and key (torch.save writes
# a shared buffer once). Why: with per-param allocations the states of 2000 small params lie
# scattered between other allocations, and a step spent most of its time in memory latency
# rather than bandwidth: in the kernel (~5-7 ms vs ~3.8 ms for the same bytes laid out in order,
# 2000 x 2048 fp32 on 2 cores) and in reading ~10000 TensorImpls/StorageImpls for checks and
# pointers. Params that are tensor subclasses (e.g. DTensor) or not dense get their own tensors.
_SEGMENT_BYTES = 64


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill exactly t.numel() consecutive slots (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _packable(p: torch.Tensor) -> bool:
    return type(p) in (torch.Tensor, torch.nn.Parameter) and p.layout == torch.strided and _dense(p)


def _packed_like(tensors: list, dtype: torch.dtype, sources: list | None = None) -> list:
    """One tensor per ``tensors[i]`` (its shape and strides, on its device, ``dtype``) as views of one
    zero-filled buffer, holding ``sources[i]`` when given. Tensors must share a device."""
    views = _packed([(t.shape, t.stride()) for t in tensors], dtype, tensors[0].device)
    if sources is not None:
        torch._foreach_copy_(views, sources)
    return views


def _packed(layouts: list, dtype: torch.dtype, device: torch.device) -> list:
    """Zero tensors of the (shape, strides) ``layouts`` (strides None: contiguous) as views of one
    buffer, each segment 64-byte aligned ([Note: flat state])."""
    align = max(1, _SEGMENT_BYTES // torch.empty((), dtype=dtype).element_size())
    offsets, total = [], 0
    for shape, _ in layouts:
        offsets.append(total)
        total += -(-math.prod(shape) // align) * align
    buffer = torch.zeros(total, dtype=dtype, device=device)
    return [buffer.as_strided(shape, stride if stride is not None else _contiguous_strides(shape), offset)
            for (shape, stride), offset in zip(layouts, offsets)]


def _contiguous_strides(shape) -> tuple:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def _packed_steps(device: torch.device, sources: list) -> list:
    """0-dim float32 step counters on ``device`` holding ``sources`` (numbers or tensors), as views
    of one buffer."""
    buffer = torch.tensor([float(s) for s in sources], dtype=torch.float32, device=device)
    return list(buffer.unbind())
