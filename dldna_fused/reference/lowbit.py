"""Blockwise 8-bit and 4-bit optimizer states, written out in torch ops.

The ground truth of the low-bit kernels ([Note: blockwise quantized states] in
csrc/common/quantization.h) and the version to read: the code maps, quantize/dequantize, and
AdamW/Adam/Lion that keep their states quantized between steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from dldna_fused._closure import closure_loss
from dldna_fused._rounding import add_write_options, read_param, store_param


def dynamic_map(bits: int, signed: bool) -> torch.Tensor:
    """The dynamic (tree) quantization map of Dettmers et al. (2022), ascending, float32.

    With E = bits - 1 exponents, exponent i covers the decade up to 10^(i-E+1) with n_i levels:
    the midpoints of n_i equal steps of [0.1, 1], scaled by 10^(i-E+1); n_i = 2^i for a signed
    map (each level with both signs) and 2^(i+1) for an unsigned one. 0 and 1 complete the map.
    """
    exponents = bits - 1
    values = []
    for i in range(exponents):
        levels = 2**i if signed else 2 ** (i + 1)
        scale = 10.0 ** (i - exponents + 1)
        for j in range(levels):
            level = scale * (0.1 + 0.9 * (j + 0.5) / levels)
            values += [level, -level] if signed else [level]
    values += [0.0, 1.0]
    assert len(values) == 2**bits
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_map_without_zero(bits: int) -> torch.Tensor:
    """(k + 1) / 2^bits for k = 0 .. 2^bits - 1: the 4-bit second-moment map of Li et al. (2023).
    Without 0, a small v is never rounded to 0, where m / (sqrt(v) + eps) would explode."""
    levels = 2**bits
    return torch.tensor([(k + 1) / levels for k in range(levels)], dtype=torch.float32)


def quantization_map(bits: int, signed: bool) -> torch.Tensor:
    """The map of a state kind: signed (exp_avg) is dynamic; unsigned (exp_avg_sq) is dynamic at
    8 bits and linear without zero at 4."""
    if bits == 4 and not signed:
        return linear_map_without_zero(4)
    return dynamic_map(bits, signed)


def quantize_blockwise(x: torch.Tensor, bits: int, signed: bool, block_size: int):
    """(codes, absmax) of x flattened: per block of ``block_size`` elements, absmax = max |x| and
    code = the number of map midpoints below x / absmax (the nearest code, ties to the lower one).
    4-bit codes are packed two per byte, the even element in the low nibble."""
    values = quantization_map(bits, signed).to(x.device)
    midpoints = (values[:-1] + values[1:]) / 2
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)  # NaN propagates
    scale = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))
    y = torch.nan_to_num(blocks * scale[:, None], nan=1.0, posinf=1.0, neginf=-1.0)
    y = y.clamp(-1.0 if signed else 0.0, 1.0)
    codes = torch.searchsorted(midpoints, y.contiguous()).reshape(-1)[:n].to(torch.uint8)
    if bits == 4:
        codes = F.pad(codes, (0, n % 2)).view(-1, 2)
        codes = codes[:, 0] | (codes[:, 1] << 4)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool,
                         block_size: int, numel: int) -> torch.Tensor:
    """float32 values of ``numel`` elements: map[code] * the absmax of the code's block."""
    values = quantization_map(bits, signed).to(codes.device)
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
    index = codes[:numel].long()
    scale = absmax.repeat_interleave(block_size)[:numel]
    return values[index] * scale


class _LowBit(Optimizer):
    """Shared plumbing: states of params with at least ``min_8bit_size`` elements are quantized
    (``<key>_codes``, ``<key>_absmax``); smaller ones keep float32 states under ``<key>``."""

    _keys: tuple[tuple[str, bool], ...] = ()  # (state key, signed map)

    def _quantized(self, group, p) -> bool:
        return p.numel() >= group["min_8bit_size"]

    def _load(self, group, p):
        """The float32 states of p, flat, and its step count after this step."""
        state = self.state[p]
        n = p.numel()
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key, _ in self._keys:
                if self._quantized(group, p):
                    bits, block = group["bits"], group["block_size"]
                    state[f"{key}_codes"] = torch.zeros(math.ceil(n * bits / 8), dtype=torch.uint8, device=p.device)
                    state[f"{key}_absmax"] = torch.zeros(math.ceil(n / block), dtype=torch.float32, device=p.device)
                else:
                    state[key] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        if not self._quantized(group, p):
            return [state[key].reshape(-1) for key, _ in self._keys], state["step"].item()
        return [dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_absmax"], group["bits"], signed,
                                     group["block_size"], n) for key, signed in self._keys], state["step"].item()

    def _store(self, group, p, values):
        state = self.state[p]
        for (key, signed), value in zip(self._keys, values):
            if self._quantized(group, p):
                codes, absmax = quantize_blockwise(value, group["bits"], signed, group["block_size"])
                state[f"{key}_codes"].copy_(codes)
                state[f"{key}_absmax"].copy_(absmax)
            else:
                state[key].copy_(value.view_as(state[key]))


class AdamW8bit(_LowBit):
    """AdamW whose exp_avg / exp_avg_sq live as blockwise codes between steps: dequantize, the
    float32 AdamW step of reference.AdamW, quantize with the new absmax."""

    _keys = (("exp_avg", True), ("exp_avg_sq", False))
    _bits = 8
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, maximize=False,
                 block_size=None, min_8bit_size=4096, bf16_stochastic_round=False, kahan_sum=False, seed=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        bits=self._bits, block_size=block_size or (256 if self._bits == 8 else 128),
                        min_8bit_size=min_8bit_size)
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group_index, group in enumerate(self.param_groups):
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                (m, v), t = self._load(group, p)
                theta = read_param(self.state[p], group, p, torch.float32).reshape(-1)
                g = p.grad.reshape(-1).float()
                if group["maximize"]:
                    g = -g
                if wd != 0:
                    if self._decoupled:
                        theta = theta * (1 - lr * wd)
                    else:
                        g = g + wd * theta
                m = m * beta1 + (1 - beta1) * g
                v = v * beta2 + (1 - beta2) * g * g
                denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
                theta = theta - (lr / (1 - beta1**t)) * m / denom
                store_param(self.state[p], group, p, theta, group_index, position)
                self._store(group, p, (m, v))
        return loss


class Adam8bit(AdamW8bit):
    """Adam (L2 weight decay added to the gradient, default 0) with 8-bit states."""

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class AdamW4bit(AdamW8bit):
    """AdamW with 4-bit states in blocks of 128."""

    _bits = 4


class Lion8bit(_LowBit):
    """Lion whose exp_avg lives as blockwise 8-bit codes between steps."""

    _keys = (("exp_avg", True),)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, block_size=256,
                 min_8bit_size=4096, bf16_stochastic_round=False, kahan_sum=False, seed=None):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, bits=8,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group_index, group in enumerate(self.param_groups):
            lr, wd = float(group["lr"]), group["weight_decay"]
            beta1, beta2 = group["betas"]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                (m,), _ = self._load(group, p)
                g = p.grad.reshape(-1).float()
                if group["maximize"]:
                    g = -g
                theta = read_param(self.state[p], group, p, torch.float32).reshape(-1) * (1 - lr * wd)
                theta = theta - lr * (m * beta1 + g * (1 - beta1)).sign()
                m = m * beta2 + g * (1 - beta2)
                store_param(self.state[p], group, p, theta, group_index, position)
                self._store(group, p, (m,))
        return loss
