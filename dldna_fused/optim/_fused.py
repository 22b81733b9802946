"""What every fused optimizer shares: argument rules, parameter checks, state_dict loading, and
the collection of tensor lists grouped by (device, dtype) for one op call per group."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from dldna_fused import ops

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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


# [Note: sharded params]
# Under FSDP2 (fully_shard) params, grads and the states made with zeros_like are DTensors. The
# fused ops are elementwise per tensor, so for Adam/AdamW, Lion and Sophia the step on each rank's
# local shards is the step on the whole tensor, with no communication: the lists handed to the ops
# hold the local tensors (the shard's storage, so updates land in the DTensor). States stay
# DTensors in self.state, which torch.distributed.checkpoint saves and loads by placement.
# AdaFactor's statistics span whole rows, columns and tensors; see Adafactor._sharded_step.


def dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch.distributed is not built."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def to_local(tensors: list) -> list:
    """``tensors`` with each DTensor replaced by its local shard (see [Note: sharded params])."""
    DTensor = dtensor_type()
    if DTensor is None or not any(isinstance(t, DTensor) for t in tensors):
        return tensors
    with torch.no_grad():
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def check_hyperparameter(name: str, value: Any, low: float, high: float | None = None, *, high_open=True):
    """Raise ValueError naming ``name`` unless low <= value (< or <=) high."""
    v = float(value)  # a 1-element tensor lr is allowed
    ok = v >= low and (high is None or (v < high if high_open else v <= high))
    if not ok:
        bound = f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_betas(betas) -> None:
    """Raise ValueError naming betas unless it is a pair of numbers in [0, 1)."""
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_hyperparameter("betas[0]", betas[0], 0.0, 1.0)
    check_hyperparameter("betas[1]", betas[1], 0.0, 1.0)


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
    # therefore built once, with a frozen copy of each for eager calls ([Note: eager calls] in
    # csrc/python_module.cpp), and reused while (a) the same params have gradients, (b) the
    # optimizer's state object is the same, (c) the group options that shape the lists (e.g.
    # amsgrad) are the same and (d) nothing went through load_state_dict/add_param_group, which
    # bump _lists_version. Only the gradients, which autograd may replace every step, are gathered
    # anew each step. Code that swaps state tensors by hand calls _invalidate_lists().
    def _invalidate_lists(self) -> None:
        self._lists_version = getattr(self, "_lists_version", 0) + 1

    def _cached_lists(self, group: dict, has_grad: bytes, build, options: tuple):
        """The lists ``build(group)`` made for the params of ``group`` that have a grad (``has_grad``
        from ``ops.grads_of``).

        Returns [(device, dtype), params_index, lists] entries; ``build`` is called when the cache is
        stale (see [Note: cached tensor lists]); ``options`` are the group options ``build`` reads.
        Outside torch.compile the lists are frozen (``ops.freeze``).
        """
        if torch.compiler.is_compiling():
            return [(key_, index, [to_local(lst) for lst in lists]) for key_, index, lists in build(group)]
        cache = self.__dict__.setdefault("_lists_cache", {})
        has_grad = (options, has_grad)
        key = id(group)
        entry = cache.get(key)
        version = getattr(self, "_lists_version", 0)
        if (entry is None or entry[0] is not group or entry[1] is not self.state or entry[2] != version
                or entry[3] != has_grad):
            frozen = [(key_, index, [ops.freeze(to_local(lst)) for lst in lists]) for key_, index, lists in build(group)]
            entry = (group, self.state, version, has_grad, frozen)
            cache[key] = entry
            # Whether this group's grads need to_local, decided once here rather than per step.
            self.__dict__.setdefault("_sharded_groups", {})[key] = to_local(group["params"]) is not group["params"]
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

    def _init_state(self, group: dict, params: list, keys: tuple[str, ...], *, step: bool = True) -> None:
        """Zero states ``keys`` (and a zero ``step`` when ``step``) for ``params``, laid out as in
        [Note: flat state]."""
        buckets: dict = {}
        for p in params:
            if _packable(p):
                buckets.setdefault((p.device, self._state_dtype(group, p)), []).append(p)
            else:
                state = self.state[p]
                for key in keys:
                    state[key] = torch.zeros_like(p, dtype=self._state_dtype(group, p),
                                                  memory_format=torch.preserve_format)
                if step:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for (device, dtype), ps in buckets.items():
            for key in keys:
                for p, t in zip(ps, _packed_like(ps, dtype)):
                    self.state[p][key] = t
            if step:
                for p, t in zip(ps, _packed_steps(device, [0.0] * len(ps))):
                    self.state[p]["step"] = t

    def _build_state_lists(self, group: dict, keys: tuple[str, ...]) -> list:
        """[((device, dtype), index, [params, *(state[key] for key in keys), steps])] for the params
        of ``group`` that have a grad, creating the states they miss; ``index`` lists the positions
        in group["params"] of each bucket's params (None: all of them, in order)."""
        with_grad = [p for p in group["params"] if p.grad is not None]
        missing: dict = {}
        for p in with_grad:
            state = self.state[p]
            absent = tuple(key for key in (*keys, "step") if key not in state)
            if absent:
                missing.setdefault(absent, []).append(p)
        for absent, ps in missing.items():
            self._init_state(group, ps, tuple(k for k in absent if k != "step"), step="step" in absent)
        buckets: dict = {}
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            index, lists = buckets.setdefault((p.device, p.dtype), ([], tuple([] for _ in range(len(keys) + 2))))
            index.append(i)
            lists[0].append(p)
            for k, key in enumerate(keys, start=1):
                lists[k].append(state[key])
            lists[-1].append(state["step"])
        everything = list(range(len(group["params"])))
        return [(key, None if index == everything else index, list(lists)) for key, (index, lists) in buckets.items()]

    def _collect_calls(self, build, options) -> list:
        """[(group, (device, dtype), grads, lists)]: one entry per op call of this step, for every
        group, built (and so checked) before any tensor changes, so that an error leaves every
        param as it was. ``build(group)`` makes the lists (see _cached_lists); ``options(group)``
        are the group options it reads."""
        calls = []
        for group in self.param_groups:
            grads, any_sparse, has_grad = ops.grads_of(group["params"])
            if any_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            entries = self._cached_lists(group, has_grad, build, options(group))
            if torch.compiler.is_compiling() or self.__dict__.get("_sharded_groups", {}).get(id(group)):
                grads = to_local(grads)
            for key, index, lists in entries:
                calls.append((group, key, grads if index is None else [grads[i] for i in index], lists))
        return calls

    def _pack_state(self) -> None:
        """Re-packs loaded states as in [Note: flat state], with their values."""
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state.get(p) and _packable(p)]
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
        """Loads a state_dict of this class or of the torch.optim equivalent.

        torch.optim keeps ``step`` on the CPU unless fused or capturable; the kernels read it on the
        param's device, so it is moved there. torch.optim casts every floating-point state to its
        param's dtype, which would round float32 states of bf16/fp16 params; those are taken from
        ``state_dict`` again, unrounded. States are re-packed as in [Note: flat state].
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_states = [state_dict["state"].get(i) for i in saved_ids]
        super().load_state_dict(state_dict)
        self._invalidate_lists()
        params = [p for g in self.param_groups for p in g["params"]]
        originals = {p: saved for p, saved in zip(params, saved_states)}
        for group in self.param_groups:
            fp32_keys = self._fp32_state_keys(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
                for key in fp32_keys:
                    if key in state:
                        saved = originals[p].get(key, state[key])
                        state[key] = torch.as_tensor(saved).to(device=p.device, dtype=torch.float32, copy=True)
        self._pack_state()

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
