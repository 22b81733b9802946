"""What every fused optimizer shares: argument rules, parameter checks, state_dict loading, and
the collection of tensor lists grouped by (device, dtype) for one op call per group."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from dldna_fused import ops

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_hyperparameter(name: str, value: Any, low: float, high: float | None = None, *, high_open=True):
    """Raise ValueError naming ``name`` unless low <= value (< or <=) high."""
    v = float(value)  # a 1-element tensor lr is allowed
    ok = v >= low and (high is None or (v < high if high_open else v <= high))
    if not ok:
        bound = f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


class FusedOptimizer(Optimizer):
    """Base of the dldna_fused optimizers (not for direct use).

    Subclasses set ``_op_name`` (the op, for the device check), ``_state_keys`` (the floating-point
    state tensors each parameter gets) and implement ``step``.
    """

    # GradScaler passes grad_scale/found_inf (as attributes) instead of unscaling the grads itself;
    # the kernels unscale and skip inf/nan steps on the device without a host sync.
    _step_supports_amp_scaling = True
    _op_name = "dldna_fused::fused_adam_"
    _state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, foreach, differentiable, fused, state_dtype):
        if foreach:
            raise ValueError("foreach=True is not supported: dldna_fused optimizers are always fused (pass foreach=None)")
        if differentiable:
            raise ValueError("differentiable=True is not supported: the fused kernels do not record autograd history")
        if fused is False:
            raise ValueError("fused=False is not supported: use the torch.optim optimizer for an unfused step")
        if state_dtype is not None:
            if state_dtype != torch.float32:
                raise ValueError(f"state_dtype must be None (the param's dtype) or torch.float32, got {state_dtype}")
            # Only when asked for, so the default param_groups match torch.optim's key for key.
            defaults["state_dtype"] = state_dtype
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._check_param(p)
        self._invalidate_lists()

    # [Note: cached tensor lists]
    # Rebuilding the per-(device, dtype) lists of params and state tensors costs a few microseconds
    # per parameter, which for 2000 small tensors is as much as the kernel itself. The lists are
    # therefore built once and reused while (a) the same params have gradients, (b) the optimizer's
    # state object is the same, (c) the group options that shape the lists (e.g. amsgrad) are the
    # same and (d) nothing went through load_state_dict/add_param_group, which bump _lists_version. Only the gradients, which autograd may replace every step, are gathered
    # anew each step. Code that swaps state tensors by hand calls _invalidate_lists().
    def _invalidate_lists(self) -> None:
        self._lists_version = getattr(self, "_lists_version", 0) + 1

    def _cached_lists(self, group: dict, grads: list, build, options: tuple):
        """The lists ``build(group)`` made for the params of ``group`` that have a grad.

        Returns [(device, dtype), params_index, lists] entries; ``build`` is called when the cache is
        stale (see [Note: cached tensor lists]); ``options`` are the group options ``build`` reads.
        """
        cache = self.__dict__.setdefault("_lists_cache", {})
        has_grad = (options, tuple(g is not None for g in grads))
        key = id(group)
        entry = cache.get(key)
        version = getattr(self, "_lists_version", 0)
        if (entry is None or entry[0] is not group or entry[1] is not self.state or entry[2] != version
                or entry[3] != has_grad):
            entry = (group, self.state, version, has_grad, build(group))
            cache[key] = entry
        return entry[4]

    def _check_param(self, p: torch.Tensor) -> None:
        name = type(self).__name__
        if p.is_complex():
            raise ValueError(f"{name}: complex params are not supported (got dtype {p.dtype}); use torch.view_as_real")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: params must be float32, bfloat16 or float16, got {p.dtype}")
        if not ops.has_kernel(p.device.type):
            raise ValueError(f"{name}: no fused kernel for params on device '{p.device}' in this build (have: cpu"
                             f"{', cuda' if ops.has_kernel('cuda') else ''})")

    def _state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        return group.get("state_dtype") or p.dtype

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this class or of the torch.optim equivalent.

        torch.optim keeps ``step`` on the CPU unless fused or capturable; the kernels read it on the
        param's device, so it is moved there. States are cast to ``state_dtype`` when set.
        """
        super().load_state_dict(state_dict)
        self._invalidate_lists()
        for group in self.param_groups:
            state_dtype = group.get("state_dtype")
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
                if state_dtype is not None:
                    for key in self._state_keys:
                        if key in state:
                            state[key] = state[key].to(state_dtype)

    def _amp_tensors(self, device: torch.device, cache: dict):
        """GradScaler's (grad_scale, found_inf) for params on ``device``, or (None, None)."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None, None
        if device not in cache:
            cache[device] = tuple(
                None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)
                for t in (grad_scale, found_inf)
            )
        return cache[device]
