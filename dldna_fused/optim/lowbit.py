"""AdamW, Adam and Lion with 8-bit or 4-bit optimizer states in the fused kernels.

See [Note: blockwise quantized states] in csrc/common/quantization.h for the format.
"""

from __future__ import annotations

import math

import torch

from dldna_fused import ops
from dldna_fused._closure import closure_loss
from dldna_fused._distributed import dtensor_type, to_local
from dldna_fused.optim._flat_state import _packed
from dldna_fused.optim._fused import FusedOptimizer, scalar
from dldna_fused.optim._group_lists import _occurrences
from dldna_fused.optim._state_dict import SIGNED_STATES, dequantize_state
from dldna_fused.optim.adam import Adam
from dldna_fused.optim.lion import Lion


def _check_lowbit_options(options: dict) -> None:
    block = options["block_size"]
    if isinstance(block, bool) or not isinstance(block, int) or not (64 <= block <= 4096) or block & (block - 1):
        raise ValueError(f"block_size must be a power of two from 64 to 4096, got {block!r}")
    threshold = options["min_8bit_size"]
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {threshold!r}")


class _LowBitOptimizer(FusedOptimizer):
    """The state handling of the low-bit optimizers.

    A param with at least ``min_8bit_size`` elements keeps each state ``key`` as
    ``<key>_codes`` (uint8, flat) and ``<key>_absmax`` (float32, one per block); a smaller one keeps
    float32 ``<key>`` tensors of its shape and is stepped by the fp32 kernel, as bitsandbytes does
    (a small tensor's absmax would cost more than its codes save). Either kind converts to the
    other on ``load_state_dict``, so a state_dict of the fp32 optimizer loads into the low-bit one
    and back.
    """

    _bits = 8
    _state_keys = ("exp_avg", "exp_avg_sq")  # Lion: ("exp_avg",)
    _fp32_states_only = True

    def _state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        return torch.float32

    def _fp32_state_keys(self, group: dict) -> tuple[str, ...]:
        return (*self._state_keys, *(f"{key}_absmax" for key in self._state_keys))

    @staticmethod
    def _quantized(group: dict, p: torch.Tensor) -> bool:
        return p.numel() >= group["min_8bit_size"]

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a state_dict of the fp32 optimizer has none of these
            group.setdefault("bits", self._bits)
            group.setdefault("block_size", 256 if self._bits == 8 else 128)
            group.setdefault("min_8bit_size", 4096)

    @staticmethod
    def _quantized_layout(group: dict, numel: int, key: str) -> dict:
        """{<key>_codes: (shape, dtype), <key>_absmax: (shape, dtype)} of a tensor of ``numel``
        elements ([Note: blockwise quantized states] in csrc/common/quantization.h)."""
        return {f"{key}_codes": ((math.ceil(numel * group["bits"] / 8),), torch.uint8),
                f"{key}_absmax": ((math.ceil(numel / group["block_size"]),), torch.float32)}

    def _quantized_state(self, group: dict, local: torch.Tensor, key: str, value: torch.Tensor) -> dict:
        """{<key>_codes, <key>_absmax} of ``value`` quantized, on the device of ``local``."""
        codes, absmax = ops.quantize_blockwise(value.to(local.device), bits=group["bits"], signed=SIGNED_STATES[key],
                                               block_size=group["block_size"])
        return {f"{key}_codes": codes, f"{key}_absmax": absmax}

    def _convert_kind(self, where: str, group: dict, p: torch.Tensor, state: dict, saved: dict) -> None:
        """Quantizes float states (``saved``'s, unrounded) of a param that is quantized now, and
        dequantizes the codes of one that is not: after a load of the other kind's state, or a
        change of min_8bit_size."""
        if not self._quantized(group, p):
            super()._convert_loaded_state(where, group, p, state, saved)
            return
        local = to_local([p])[0]
        for key in self._state_keys:
            if f"{key}_codes" not in state and isinstance(state.get(key), torch.Tensor):
                value = torch.as_tensor(saved.get(key, state[key]))
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{where}: state '{key}' has shape {tuple(value.shape)} but must have shape "
                                     f"{tuple(p.shape)}")
                state.update(self._quantized_state(group, local, key, to_local([value])[0].float()))
                del state[key]

    def _convert_loaded_state(self, where: str, group: dict, p: torch.Tensor, state: dict, saved: dict) -> None:
        self._convert_kind(where, group, p, state, saved)
        if not self._quantized(group, p):
            return
        device = to_local([p])[0].device
        for key in self._state_keys:
            # torch.optim casts every state to a floating param's dtype: take codes and absmax from
            # the state_dict as they were saved (a missing one is named by _check_loaded_state).
            for name, dtype in ((f"{key}_codes", None), (f"{key}_absmax", torch.float32)):
                if isinstance(saved.get(name), torch.Tensor):
                    state[name] = saved[name].to(device, dtype, copy=True)

    def _state_spec(self, group: dict, p: torch.Tensor) -> dict:
        # The quantized states are checked by _check_loaded_state and _check_lists themselves.
        return {"step": ()} if self._quantized(group, p) else super()._state_spec(group, p)

    def _check_loaded_state(self, where: str, group: dict, p: torch.Tensor, state: dict) -> None:
        super()._check_loaded_state(where, group, p, state)
        if not self._quantized(group, p):
            return
        numel = to_local([p])[0].numel()
        for key in self._state_keys:
            for name, layout in self._quantized_layout(group, numel, key).items():
                self._check_quantized_tensor(where, name, state.get(name), layout)

    @staticmethod
    def _check_quantized_tensor(where: str, name: str, t, layout: tuple) -> None:
        shape, dtype = layout
        if t is None:
            raise KeyError(f"{where}: the state has no '{name}'; a state_dict must hold every state of a param "
                           "that has stepped")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: state '{name}' must be a Tensor, got {type(t).__name__}")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{where}: state '{name}' must be {dtype} of shape {shape} (bits and block_size of its "
                             f"group), got {t.dtype} of shape {tuple(t.shape)}")

    def _build_lists(self, group: dict) -> list:
        """[((device, dtype, round, quantized), index, lists)] as _build_state_lists, with the
        quantized params' lists [params, (<key>_codes, <key>_absmax) per key, steps] and the
        others' [params, <key> per key, steps]."""
        params = group["params"]
        keys = self._state_keys
        full_missing: dict = {}
        quantized_missing: dict = {}
        for p in {id(p): p for p in params if p.grad is not None}.values():
            state = self.state[p]
            if state:  # a changed min_8bit_size moves a param between the two kinds
                self._convert_kind(f"{type(self).__name__}: param {tuple(p.shape)}", group, p, state, state)
            if self._quantized(group, p):
                wanted = [name for key in keys for name in (f"{key}_codes", f"{key}_absmax")]
            else:
                wanted = list(keys)
            missing = [name for name in (*wanted, "step") if name not in state]
            if not missing:
                continue
            if not self._quantized(group, p):
                full_missing.setdefault(tuple(missing), []).append(p)
            else:
                quantized_missing.setdefault((to_local([p])[0].device, tuple(missing)), []).append(p)
        # The float32 states of the small params, packed in one buffer per key ([Note: flat state]),
        # and the codes and absmax of the others, one zero buffer per name (zero absmax: zero state).
        for missing, ps in full_missing.items():
            self._init_state(group, ps, tuple(k for k in missing if k != "step"), step="step" in missing)
        for (device, missing), ps in quantized_missing.items():
            for name in missing:
                if name == "step":
                    tensors = [torch.zeros((), dtype=torch.float32, device=p.device) for p in ps]
                else:
                    layouts = [self._quantized_layout(group, to_local([p])[0].numel(), name.rsplit("_", 1)[0])[name]
                               for p in ps]
                    tensors = _packed([(shape, None) for shape, _ in layouts], layouts[0][1], device)
                for p, t in zip(ps, tensors):
                    self.state[p][name] = t
                    self._record_new_state(p, name)
        rounds = _occurrences(params)
        buckets: dict = {}
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            quantized = self._quantized(group, p)
            names = ([name for key in keys for name in (f"{key}_codes", f"{key}_absmax")] if quantized else list(keys))
            index, lists = buckets.setdefault((p.device, p.dtype, rounds[i], quantized),
                                              ([], tuple([] for _ in range(len(names) + 2))))
            index.append(i)
            state = self.state[p]
            lists[0].append(p)
            for k, name in enumerate(names, start=1):
                lists[k].append(state[name])
            lists[-1].append(state["step"])
        everything = list(range(len(params)))
        entries = []
        for key, (index, lists) in sorted(buckets.items(), key=lambda item: (item[0][2], not item[0][3])):
            names = ([n for k in keys for n in (f"{k}_codes", f"{k}_absmax")] if key[3] else list(keys))
            entries.append((key, None if index == everything else index, list(zip(lists, (None, *names, "step")))))
        return entries

    def _check_lists(self, index: int, group: dict, entries: list) -> None:
        super()._check_lists(index, group, [entry for entry in entries if not entry[0][3]])
        where = f"{type(self).__name__}: param group {index}"
        positions = {id(p): i for i, p in enumerate(group["params"])}
        for key, _, lists in entries:
            if not key[3]:
                continue
            params = lists[0][0]
            self._check_bucket_params(where, positions, params)
            for tensors, name in lists[1:]:
                if name in (None, "sr_keys"):
                    continue
                for p, t in zip(params, tensors):
                    label = f"{where}, params[{positions[id(p)]}]"
                    local = to_local([p])[0]
                    if name == "kahan_comp":
                        if not isinstance(t, torch.Tensor) or t.device != p.device:
                            raise ValueError(f"{label}: state 'kahan_comp' must be a Tensor on {p.device}")
                        self._check_comp(f"{label}: state 'kahan_comp'", p, t)
                        continue
                    if name == "step":
                        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1:
                            raise ValueError(f"{label}: state 'step' must be a float32 tensor of one element")
                        continue
                    layout = self._quantized_layout(group, local.numel(), name.rsplit("_", 1)[0])[name]
                    self._check_quantized_tensor(label, name, t, layout)
                    if t.device != local.device or not t.is_contiguous():
                        raise ValueError(f"{label}: state '{name}' must be contiguous and on {local.device}")
            self._check_overlap(where, positions, params, lists)

    def _pack_state(self) -> None:
        """As FusedOptimizer's, and the codes and absmax of each group in one buffer per key."""
        super()._pack_state()
        names = [name for key in self._state_keys for name in (f"{key}_codes", f"{key}_absmax")]
        for group in self.param_groups:
            params = [p for p in {id(p): p for p in group["params"]}.values()
                      if type(p) in (torch.Tensor, torch.nn.Parameter) and names[0] in self.state.get(p, {})]
            for name in names:
                buckets: dict = {}
                for p in params:
                    t = self.state[p].get(name)
                    if isinstance(t, torch.Tensor) and type(t) is torch.Tensor:
                        buckets.setdefault((t.device, t.dtype), []).append(p)
                for (device, dtype), ps in buckets.items():
                    views = _packed([(self.state[p][name].shape, None) for p in ps], dtype, device)
                    for p, view in zip(ps, views):
                        view.copy_(self.state[p][name])
                        self.state[p][name] = view

    def state_dict(self) -> dict:
        """As torch.optim's, except for FSDP2-sharded (DTensor) params: their blocks are the local
        shard's, which no other world size could read, so their states are given dequantized, as
        float32 DTensors placed like the params. torch.distributed.checkpoint then saves and
        reshards them as any fp32 state, and load_state_dict quantizes them again."""
        state_dict = super().state_dict()
        DTensor = dtensor_type()
        if DTensor is None:
            return state_dict
        numbered: dict = {}
        start = 0
        for group in self.param_groups:  # torch.optim's numbering of the params
            for i, p in enumerate(group["params"], start):
                numbered.setdefault(id(p), (i, group, p))
            start += len(group["params"])
        for i, group, p in numbered.values():
            state = state_dict["state"].get(i)
            if not isinstance(p, DTensor) or not state or f"{self._state_keys[0]}_codes" not in state:
                continue
            state = dict(state)  # the live state keeps its codes
            for key in self._state_keys:
                local = dequantize_state(f"{type(self).__name__}.state_dict", group, p, state, key)
                state[key] = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                del state[f"{key}_codes"], state[f"{key}_absmax"]
            state_dict["state"][i] = state
        return state_dict

    def _options(self, group: dict) -> tuple:
        return (group["bits"], group["block_size"], group["min_8bit_size"])

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = closure_loss(closure)
        calls = self._collect_calls(self._build_lists, self._options, clip=True)
        amp_cache: dict = {}
        for group, (device, _, _, quantized), grads, lists, clip_coef, writes in calls:
            grad_scale, found_inf = self._amp_tensors(device, amp_cache)
            self._launch(group, quantized, grads, lists,
                         dict(grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, **writes))
        return loss

    def _launch(self, group: dict, quantized: bool, grads: list, lists: list, amp_and_clip: dict) -> None:
        """One op call: the low-bit op for a quantized bucket, the fp32 one otherwise."""
        raise NotImplementedError


class AdamW8bit(_LowBitOptimizer):
    r"""AdamW with 8-bit states: a drop-in for :class:`torch.optim.AdamW` (and bitsandbytes'
    ``AdamW8bit``) at a quarter of the state memory.

    The update is :class:`dldna_fused.optim.AdamW`'s, in fp32, on states that live between steps
    as blockwise codes. Per block :math:`B` of ``block_size`` elements of a state :math:`s`:

    .. math::
        \begin{aligned}
        s &= \mathrm{map}[c] \cdot a_B \quad \text{(dequantize)} \\
        &\text{the AdamW step on } m, v \\
        a_B &= \max_{i \in B} |s_i|, \qquad
        c_i = \#\{\, j : \mu_j < s_i / a_B \,\} \quad \text{(requantize)}
        \end{aligned}

    with :math:`\mu_j` the midpoints of the map: the nearest code, ties to the lower one. ``exp_avg``
    uses the signed dynamic map and ``exp_avg_sq`` the unsigned one (Dettmers et al. 2022); at 4
    bits (:class:`AdamW4bit`) ``exp_avg_sq`` uses the linear map without zero (Li et al. 2023).
    State per quantized param: ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``,
    ``exp_avg_sq_absmax`` and ``step``: 2 bytes + 8 / block_size bytes per element at 8 bits.

    Args:
        params, lr, betas, eps, weight_decay, maximize, max_grad_norm, bf16_stochastic_round,
            kahan_sum, seed: as :class:`dldna_fused.optim.AdamW`. ``amsgrad`` must be False.
        block_size: elements per absmax (default 256 at 8 bits, 128 at 4 bits).
        min_8bit_size: params with fewer elements keep float32 states (default 4096).
    """

    _decoupled = True

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 block_size: int | None = None, min_8bit_size: int = 4096, max_grad_norm: float | None = None,
                 bf16_stochastic_round: bool = False, kahan_sum: bool = False, seed: int | None = None):
        if amsgrad:
            raise ValueError(f"{type(self).__name__}: amsgrad=True is not supported with quantized states "
                             "(use dldna_fused.optim.AdamW)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        bits=self._bits, block_size=block_size or (256 if self._bits == 8 else 128),
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults, foreach=None, differentiable=False, fused=None, state_dtype=None,
                         max_grad_norm=max_grad_norm,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)

    @staticmethod
    def _check_options(options: dict) -> None:
        Adam._check_options(options)
        _check_lowbit_options(options)

    def _launch(self, group: dict, quantized: bool, grads: list, lists: list, amp_and_clip: dict) -> None:
        beta1, beta2 = map(scalar, group["betas"])
        common = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                      maximize=group["maximize"], decoupled_weight_decay=self._decoupled, **amp_and_clip)
        if quantized:
            params, m_codes, m_absmax, v_codes, v_absmax, steps = lists
            ops.fused_adam_lowbit_(params, grads, m_codes, m_absmax, v_codes, v_absmax, steps, bits=group["bits"],
                                   block_size=group["block_size"], **common)
        else:
            params, exp_avgs, exp_avg_sqs, steps = lists
            ops.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, **common)


class Adam8bit(AdamW8bit):
    """Adam (L2 weight decay added to the gradient, default 0) with 8-bit states; see
    :class:`AdamW8bit`."""

    _decoupled = False

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class AdamW4bit(AdamW8bit):
    """AdamW with 4-bit states in blocks of 128: an eighth of the fp32 state memory; see
    :class:`AdamW8bit`. Both states are normalized per block (not rank-1 as in Li et al.): a
    block is self-contained, so the step stays one pass and a shard's blocks need no other rank."""

    _bits = 4


class Lion8bit(_LowBitOptimizer):
    r"""Lion with an 8-bit ``exp_avg`` (blockwise, signed dynamic map; see :class:`AdamW8bit`):
    one byte per element of state instead of four. The update is :class:`dldna_fused.optim.Lion`'s.

    Args:
        params, lr, betas, weight_decay, maximize, max_grad_norm, bf16_stochastic_round, kahan_sum,
            seed: as :class:`dldna_fused.optim.Lion`.
        block_size: elements per absmax (default 256).
        min_8bit_size: params with fewer elements keep a float32 ``exp_avg`` (default 4096).
    """

    _state_keys = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 *, maximize: bool = False, block_size: int = 256, min_8bit_size: int = 4096,
                 max_grad_norm: float | None = None, bf16_stochastic_round: bool = False,
                 kahan_sum: bool = False, seed: int | None = None):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, bits=8,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults, foreach=None, differentiable=False, fused=None, state_dtype=None,
                         max_grad_norm=max_grad_norm,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)

    @staticmethod
    def _check_options(options: dict) -> None:
        Lion._check_options(options)
        _check_lowbit_options(options)

    def _launch(self, group: dict, quantized: bool, grads: list, lists: list, amp_and_clip: dict) -> None:
        beta1, beta2 = map(scalar, group["betas"])
        common = dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                      maximize=group["maximize"], **amp_and_clip)
        if quantized:
            params, codes, absmax, steps = lists
            ops.fused_lion_lowbit_(params, grads, codes, absmax, steps, bits=8, block_size=group["block_size"], **common)
        else:
            params, exp_avgs, steps = lists
            ops.fused_lion_(params, grads, exp_avgs, steps, **common)
