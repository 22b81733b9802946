"""How bf16 params are written: stochastic rounding and Kahan summation, in plain torch.

The fused kernels do this inside the step ([Note: bf16 param writes] in
csrc/common/rounding_math.h); this module is the same arithmetic, bit for bit, for the reference
optimizers and the code paths that step in torch ops. ``param_key`` is what the fused classes pass
to the ops as ``sr_keys``.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """splitmix64's output function of ``x`` (a uint64, as a Python int)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def param_key(seed: int, group: int, position: int, rank: int = 0) -> int:
    """The 64-bit key (a signed int64) of the param at ``position`` in param group ``group``: the
    stochastic rounding of different params, seeds and ranks draws different bits."""
    x = splitmix64(seed & _MASK64)
    for part in (group, position, rank):
        x = splitmix64(x ^ (part & _MASK64))
    return _signed(x)


def rounding_salt(key: int, step: float) -> int:
    """rounding_salt of rounding_math.h: the uint64 salt of a param's key at a step count."""
    return splitmix64((key & _MASK64) ^ splitmix64(int(step) & _MASK64))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors x in [0, 2^32), exactly (16-bit halves of c)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + ((x * high) & 0xFFFF) * 65536) & 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _pair_key(salt: int, pair_high: int) -> int:
    """pair_key of rounding_math.h: the 32-bit key of the pairs numbered pair_high * 2^32 on."""
    s = salt if pair_high == 0 else splitmix64(salt ^ pair_high)
    return (s ^ (s >> 32)) & 0xFFFFFFFF


def random_bits16(salt: int, index: torch.Tensor, end: int) -> torch.Tensor:
    """random_bits16 of rounding_math.h for int64 element indices ``index``, all below ``end``:
    int64 in [0, 2^16). Elements 16b + j and 16b + j + 8 share a hash ([Note: paired random
    bits]). ``end`` is a host int, so that no index is read back from the device."""
    pair = (index >> 4) * 8 + (index & 7)
    key = torch.full_like(pair, _pair_key(salt, 0))
    for h in range(1, max(end - 1, 0) // 2 ** 33 + 1):  # pairs past 2^32: params past 2^33 elements
        key = torch.where((pair >> 32) == h, _pair_key(salt, h), key)
    x = _lowbias32(((pair & 0xFFFFFFFF) + key) & 0xFFFFFFFF)
    return torch.where((index & 8) != 0, x >> 16, x & 0xFFFF)


def stochastic_round(x: torch.Tensor, key: int, step: float) -> torch.Tensor:
    """float32 ``x`` (a param's new values, in its shape) stochastically rounded to bfloat16 with the
    bits the fused kernels draw for this key and step; elements are numbered in row-major order."""
    x = x.float().contiguous()
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + random_bits16(rounding_salt(key, step), index, x.numel())) & 0xFFFF0000
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def kahan_write_(p: torch.Tensor, comp: torch.Tensor, x: torch.Tensor) -> None:
    """p = round_nearest(x), comp = round_nearest(x - p), 0 where x - p is NaN (x NaN or infinite)."""
    p.copy_(x)
    c = x.float() - p.float()
    comp.copy_(torch.where(torch.isnan(c), torch.zeros_like(c), c))


def write_param_(p: torch.Tensor, x: torch.Tensor, *, comp: torch.Tensor | None = None,
                 key: int | None = None, step: float | None = None) -> None:
    """Writes float32 ``x`` into param ``p`` as the fused step would: Kahan-compensated with
    ``comp``, stochastically rounded with ``key`` at ``step``, else rounded to nearest."""
    if comp is not None:
        kahan_write_(p, comp, x)
    elif key is not None:
        p.copy_(stochastic_round(x, key, step))
    else:
        p.copy_(x)


def add_write_options(defaults: dict, bf16_stochastic_round: bool, kahan_sum: bool, seed: int | None) -> None:
    """Puts the param-write options into an optimizer's ``defaults``, only when asked for (so the
    default param_groups match torch.optim's key for key). The seed defaults to
    ``torch.initial_seed()``: read, not drawn, so ``torch.manual_seed(s)`` makes a run reproducible
    and the optimizer leaves the user's random stream as it was."""
    if bf16_stochastic_round:
        defaults["bf16_stochastic_round"] = bf16_stochastic_round
        defaults["seed"] = torch.initial_seed() if seed is None else seed
    if kahan_sum:
        defaults["kahan_sum"] = kahan_sum


def write_mode(group: dict, p: torch.Tensor) -> str | None:
    """"kahan", "stochastic" or None (round to nearest): how a step writes ``p`` in ``group``."""
    if p.dtype != torch.bfloat16:
        return None
    if group.get("kahan_sum", False):
        return "kahan"
    return "stochastic" if group.get("bf16_stochastic_round", False) else None


def read_param(state: dict, group: dict, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The param value a reference step updates: ``p`` in ``dtype`` (the math's dtype), or, when
    its writes are stochastic or Kahan-compensated, ``p`` in float32 (plus its ``kahan_comp``,
    created zero-filled on first use), as the fused kernels compute."""
    mode = write_mode(group, p)
    if mode is None:
        return p.to(dtype)
    x = p.float()
    if mode == "kahan":
        if "kahan_comp" not in state:
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        x = x + state["kahan_comp"].float()
    return x


def store_param(state: dict, group: dict, p: torch.Tensor, x: torch.Tensor, group_index: int, position: int) -> None:
    """Writes a reference step's new value ``x`` into ``p`` as the fused step would; ``position``
    is p's index in ``group["params"]``, ``group_index`` the group's in param_groups."""
    mode = write_mode(group, p)
    if mode == "kahan":
        kahan_write_(p, state["kahan_comp"], x.reshape(p.shape))
    elif mode == "stochastic":
        step = state["step"]
        step = step.item() if isinstance(step, torch.Tensor) else step
        p.copy_(stochastic_round(x.reshape(p.shape), param_key(group["seed"], group_index, position), step))
    else:
        p.copy_(x.reshape(p.shape))
