"""Loading a state_dict into a fused optimizer: all or nothing, from this class, the torch.optim
equivalent or the low-bit classes, re-packed as in [Note: flat state]."""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from dldna_fused import ops
from dldna_fused._distributed import to_local
from dldna_fused.optim._flat_state import _packable, _packed_like, _packed_steps


class StateDictLoading:
    """The load_state_dict half of FusedOptimizer (a mixin, before torch.optim.Optimizer in the
    MRO; it uses the optimizer's ``_state_spec``, ``_check_group`` and ``_invalidate_lists``)."""

    def _pack_state(self) -> None:
        """Re-packs loaded states as in [Note: flat state], with their values."""
        for group in self.param_groups:
            params = list({id(p): p for p in group["params"] if self.state.get(p) and _packable(p)}.values())
            for key in self._state_keys:
                buckets: dict = {}
                for p in params:
                    t = self.state[p].get(key)
                    if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.shape == p.shape:
                        buckets.setdefault((t.device, t.dtype), []).append(p)
                for (_, dtype), ps in buckets.items():
                    sources = [self.state[p][key] for p in ps]
                    for p, t in zip(ps, _packed_like(ps, dtype, sources)):
                        self.state[p][key] = t
            by_device: dict = {}
            for p in params:
                if isinstance(self.state[p].get("step"), torch.Tensor):
                    by_device.setdefault(p.device, []).append(p)
            for device, ps in by_device.items():
                steps = _packed_steps(device, [self.state[p]["step"] for p in ps])
                for p, t in zip(ps, steps):
                    self.state[p]["step"] = t

    def _fp32_state_keys(self, group: dict) -> tuple[str, ...]:
        """The state keys this group keeps in float32 whatever the params' dtype."""
        return self._state_keys if group.get("state_dtype") == torch.float32 else ()

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this class or of the torch.optim equivalent; all or nothing.

        Every param's state must be empty (never stepped) or complete (``_state_spec``: every
        state tensor, of its param's shape, and a finite ``step`` >= 0); anything else raises and
        leaves the optimizer as it was. torch.optim keeps ``step`` on the CPU unless fused or
        capturable; the kernels read it on the param's device, so it is moved there. torch.optim
        casts every floating-point state to its param's dtype, which would round float32 states of
        bf16/fp16 params; those are taken from ``state_dict`` again, unrounded. States are
        re-packed as in [Note: flat state]. The param-write options (bf16_stochastic_round,
        kahan_sum, seed) that a saved group lacks, as torch.optim's do, keep this optimizer's
        values: a plain AdamW checkpoint continues with Kahan summation, its compensation zero
        (with a warning), and a ``kahan_comp`` a group without kahan_sum cannot use is dropped
        (with a warning).
        """
        comps = {"missing": 0, "dropped": 0}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_states = [state_dict["state"].get(i) for i in saved_ids]
        before = {key: self.__dict__[key] for key in ("state", "param_groups")}
        kept = [{key: g[key] for key in _WRITE_OPTIONS if key in g} for g in self.param_groups]
        try:
            super().load_state_dict(state_dict)
            for group, saved, options in zip(self.param_groups, state_dict["param_groups"], kept):
                for key, value in options.items():
                    if key not in saved:
                        group[key] = value
            params = [p for g in self.param_groups for p in g["params"]]
            originals = {p: saved for p, saved in zip(params, saved_states)}
            name = type(self).__name__
            for index, group in enumerate(self.param_groups):
                self._check_group(group)
                fp32_keys = self._fp32_state_keys(group)
                for i, p in enumerate(group["params"]):
                    state = self.state.get(p)
                    if not state:
                        continue
                    where = f"{name}.load_state_dict: param group {index}, params[{i}]"
                    self._convert_loaded_state(where, group, p, state, originals[p] or {})
                    self._check_loaded_state(where, group, p, state)
                    self._load_comp(where, group, p, state, comps)
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
                    for key in fp32_keys:
                        if key in state:
                            saved = originals[p].get(key, state[key])
                            state[key] = torch.as_tensor(saved).to(device=p.device, dtype=torch.float32, copy=True)
            self._pack_state()
        except BaseException:
            self.__dict__.update(before)
            raise
        finally:
            self._invalidate_lists()
        name = type(self).__name__
        if comps["missing"]:
            warnings.warn(f"{name}.load_state_dict: {comps['missing']} bf16 param(s) of groups with kahan_sum=True "
                          "have no 'kahan_comp' in the state_dict (it was saved without Kahan summation, e.g. by "
                          "torch.optim); their compensation starts at zero", stacklevel=2)
        if comps["dropped"]:
            warnings.warn(f"{name}.load_state_dict: dropped the 'kahan_comp' state of {comps['dropped']} param(s) "
                          "whose group has kahan_sum off (or that are not bf16); each loses the part of its value "
                          "below bf16 precision, under half an ulp", stacklevel=2)

    def _load_comp(self, where: str, group: dict, p: torch.Tensor, state: dict, counts: dict) -> None:
        """A loaded state's Kahan compensation ([Note: bf16 param writes] in
        csrc/common/rounding_math.h): checked and moved to the param's device when its group has
        kahan_sum and it is bf16, dropped (counted) otherwise; a missing one is counted and the
        next step starts it at zero."""
        wanted = group.get("kahan_sum", False) and p.dtype == torch.bfloat16
        comp = state.get("kahan_comp")
        if comp is None:
            counts["missing"] += wanted
            return
        if not wanted:
            del state["kahan_comp"]
            counts["dropped"] += 1
            return
        if not isinstance(comp, torch.Tensor) or not comp.is_floating_point():
            raise TypeError(f"{where}: state 'kahan_comp' must be a floating-point Tensor, got "
                            f"{getattr(comp, 'dtype', type(comp).__name__)}")
        if comp.shape != p.shape:
            raise ValueError(f"{where}: state 'kahan_comp' has shape {tuple(comp.shape)} but must have shape "
                             f"{tuple(p.shape)}")
        state["kahan_comp"] = comp.to(device=p.device, dtype=p.dtype, copy=True)

    def _convert_loaded_state(self, where: str, group: dict, p: torch.Tensor, state: dict, saved: dict) -> None:
        """Brings a loaded state into this optimizer's form before it is checked; ``saved`` is the
        state as in the state_dict (before torch.optim cast it). Here: quantized states of a
        low-bit optimizer (``<key>_codes``/``<key>_absmax``, see dldna_fused.optim.lowbit) are
        dequantized, so a run can move from AdamW8bit back to AdamW."""
        for key in self._state_keys:
            if key not in state and f"{key}_codes" in state:
                value = dequantize_state(where, group, p, saved, key)
                state[key] = value.to(self._state_dtype(group, p))
                del state[f"{key}_codes"], state[f"{key}_absmax"]

    # [Note: states an option switches on]
    # Some states exist only while an option asks for them: Adam's max_exp_avg_sq (amsgrad) and
    # Adafactor's exp_avg (beta1). An option switched on mid-run (group["amsgrad"] = True) makes a
    # step create the state, zero-filled, for each param the first time it steps with the option
    # on; until then a param that has stepped without it is a valid state for that option. One rule
    # for the step and the load: load_state_dict accepts a state without these keys, and the next
    # step creates them as it would have (the references do the same). Every other state of a param
    # that has stepped must be present.
    _lazy_state_keys: tuple[str, ...] = ()

    def _check_loaded_state(self, where: str, group: dict, p: torch.Tensor, state: dict) -> None:
        """Raises naming the entry unless ``state`` holds every state ``_state_spec`` asks for, with
        the right shapes, and a well-formed step."""
        for key, shape in self._state_spec(group, p).items():
            if key not in state and key in self._lazy_state_keys:
                continue  # the next step creates it ([Note: states an option switches on])
            if key not in state:
                raise KeyError(f"{where}: the state has no '{key}' (it has {sorted(state)}); a state_dict must hold "
                               f"every state of a param that has stepped")
            value = state[key]
            if key == "step":
                step = value
                if isinstance(step, torch.Tensor):
                    if step.numel() != 1 or not (step.is_floating_point() or step.dtype in (torch.int32, torch.int64)):
                        raise ValueError(f"{where}: 'step' must be a number or a one-element real tensor, got "
                                         f"{step.dtype} with {step.numel()} elements")
                    step = step.item()
                elif isinstance(step, bool) or not isinstance(step, numbers.Real):
                    raise ValueError(f"{where}: 'step' must be a number or a one-element tensor, got "
                                     f"{type(step).__name__} {step!r}")
                if not (math.isfinite(step) and step >= 0):
                    raise ValueError(f"{where}: 'step' must be finite and >= 0, got {step}")
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{where}: state '{key}' must be a Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{where}: state '{key}' must be a floating-point tensor, got {value.dtype}")
            expected = tuple(shape)
            if tuple(value.shape) != expected and not (expected == () and value.numel() == 1):
                raise ValueError(f"{where}: state '{key}' has shape {tuple(value.shape)} but must have shape {expected}")


# The options of [Note: bf16 param writes] (csrc/common/rounding_math.h), which torch.optim's groups lack.
_WRITE_OPTIONS = ("bf16_stochastic_round", "kahan_sum", "seed")


# The map each quantized state uses ([Note: blockwise quantized states] in csrc/common/quantization.h).
SIGNED_STATES = {"exp_avg": True, "exp_avg_sq": False}


def dequantize_state(where: str, group: dict, p: torch.Tensor, saved: dict, key: str) -> torch.Tensor:
    """The float32 tensor (p's shape, on its device) of quantized state ``key`` in ``saved``, with
    the bits and block_size of ``group`` (a low-bit optimizer's saved group)."""
    if "bits" not in group or "block_size" not in group:
        raise ValueError(f"{where}: state '{key}' is quantized but the param group has no 'bits'/'block_size' "
                         "to read it with")
    codes, absmax = saved[f"{key}_codes"], saved[f"{key}_absmax"]
    local = to_local([p])[0]
    try:
        flat = ops.dequantize_blockwise(codes.to(local.device), absmax.to(local.device, torch.float32),
                                        bits=group["bits"], signed=SIGNED_STATES[key],
                                        block_size=group["block_size"], numel=local.numel())
    except RuntimeError as error:
        raise ValueError(f"{where}: quantized state '{key}' does not fit the param: {error}") from None
    return flat.view(local.shape)
