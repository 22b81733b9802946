"""What every fused optimizer shares: argument rules, parameter checks, state_dict loading, and
the collection of tensor lists grouped by (device, dtype) for one op call per group."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch.optim import Optimizer

from dldna_fused import _C, ops
from dldna_fused._devices import scalar_to
from dldna_fused._distributed import to_local
from dldna_fused.clip import clip_coefficient, get_total_norm
from dldna_fused._checks import (check_betas, check_hyperparameter, check_lr,  # noqa: F401 (re-exported)
                                 check_weight_decay, scalar)

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


class _GroupLists:
    """The cached op-call lists of one param group and what they were built from (see
    [Note: cached tensor lists])."""

    __slots__ = ("group", "params", "state", "version", "pattern", "calls", "verify", "sharded")

    def __init__(self, group, state, version, pattern, calls, verify, sharded):
        self.group = group
        self.params = list(group["params"])  # a snapshot: the group's list may change in place
        self.state = state
        self.version = version
        self.pattern = pattern
        self.calls = calls
        self.verify = verify
        self.sharded = sharded


class FusedOptimizer(Optimizer):
    """Base of the dldna_fused optimizers (not for direct use).

    Subclasses set ``_op_name`` (the op, for the device check) and ``_state_keys`` (the
    floating-point state tensors each parameter gets), implement ``step`` and
    ``_check_options(options)`` (the hyperparameter rules, raising TypeError/ValueError naming the
    argument), and may override ``_state_spec``.
    """

    # GradScaler passes grad_scale/found_inf (as attributes) instead of unscaling the grads itself;
    # the kernels unscale and skip inf/nan steps on the device without a host sync.
    _step_supports_amp_scaling = True
    _op_name = "dldna_fused::fused_adam_"
    _state_keys: tuple[str, ...] = ()
    # The global gradient norm of the last step that clipped (max_grad_norm), a 0-dim tensor.
    last_grad_norm: torch.Tensor | None = None

    def __init__(self, params, defaults: dict, *, foreach, differentiable, fused, state_dtype,
                 max_grad_norm: float | None = None):
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
        if max_grad_norm is not None:
            defaults["max_grad_norm"] = max_grad_norm  # likewise
        self._check_options(defaults)
        self._check_shared_options(defaults)
        super().__init__(params, defaults)

    # Option checks: _check_options (each optimizer's rules) at construction and in
    # add_param_group; _check_step_options (the same, unless a subclass relaxes rules only a
    # constructor enforces) before a step and after a load; _check_shared_options (what every
    # optimizer takes, such as max_grad_norm) at all of these.
    def _check_options(self, options: dict) -> None:
        raise NotImplementedError

    def _check_step_options(self, group: dict) -> None:
        self._check_options(group)

    @staticmethod
    def _check_shared_options(options: dict) -> None:
        if options.get("max_grad_norm") is not None:
            check_hyperparameter("max_grad_norm", options["max_grad_norm"], 0.0, low_open=True)

    def _check_group(self, group: dict) -> None:
        """The checks of a group's options before a step or after a load."""
        self._check_step_options(group)
        self._check_shared_options(group)

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's, and all or nothing: a group whose params or options are invalid
        raises and is not added."""
        count = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self._check_options(group)
            self._check_shared_options(group)
            for p in group["params"]:
                self._check_param(p)
        except BaseException:
            del self.param_groups[count:]
            raise
        self._invalidate_lists()

    # [Note: cached tensor lists]
    # Rebuilding the per-(device, dtype) lists of params and state tensors costs a few microseconds
    # per parameter, which for 2000 small tensors is as much as the kernel itself. The lists are
    # therefore built once per param group, frozen for eager calls ([Note: eager calls] in
    # csrc/python_module.cpp), and reused while everything they were built from is unchanged:
    # - the group is the same dict at the same position, and its "params" holds the same tensors
    #   in the same order (compared by identity, so in-place edits of the list count);
    # - self.state is the same object holding the same (param, state dict) pairs in the same order
    #   (one native walk over the dict, _C.same_items, against a snapshot taken when lists were
    #   last built), so clear(), del or a new dict for a param rebuild every group;
    # - for every param in the lists, its state dict still holds the very tensors in the lists for
    #   every key the op uses (_C.states_match), so a replaced state tensor rebuilds its group;
    # - the same params have gradients, and the group options that shape the lists are the same;
    # - nothing went through load_state_dict/add_param_group (they bump _lists_version).
    # In-place changes of a state tensor's values need nothing: the lists hold the same tensors.
    # Only the gradients, which autograd may replace every step, are gathered anew each step. The
    # cache holds one entry per group position, so a stale entry is dropped when it is replaced and
    # a load drops them all: nothing keeps replaced states alive.
    def _invalidate_lists(self) -> None:
        self._lists_version = getattr(self, "_lists_version", 0) + 1
        self.__dict__.pop("_lists_cache", None)
        self.__dict__.pop("_state_snapshot", None)

    def _state_unchanged(self) -> bool:
        """Whether self.state holds the same (param, state dict) pairs as when the cached lists
        were last built (see [Note: cached tensor lists])."""
        snapshot = self.__dict__.get("_state_snapshot")
        return snapshot is not None and snapshot[0] is self.state and _C.same_items(self.state, snapshot[1])

    def _fresh(self, entry: _GroupLists | None, group: dict, pattern: tuple) -> bool:
        """Whether ``entry`` still describes ``group`` (see [Note: cached tensor lists])."""
        if (entry is None or entry.group is not group or entry.pattern != pattern or entry.state is not self.state
                or entry.version != getattr(self, "_lists_version", 0)):
            return False
        params = group["params"]
        if len(params) != len(entry.params) or not all(map(operator.is_, params, entry.params)):
            return False
        return all(_C.states_match(states, keys, lists) for states, keys, lists in entry.verify)

    def _group_lists(self, index: int, group: dict, has_grad: bytes, build, options: tuple) -> _GroupLists:
        """The op-call lists of ``group`` (at ``index`` in param_groups) for the params that have a
        grad (``has_grad`` from ``ops.grads_of``): rebuilt by ``build(group)`` when stale, and
        checked (``_check_lists``) whenever built. ``options`` are the group options ``build`` reads.
        A rebuild clears the state snapshot, which _collect_calls then takes anew.
        """
        pattern = (options, has_grad)
        compiling = torch.compiler.is_compiling()
        if not compiling:
            cache = self.__dict__.setdefault("_lists_cache", [])
            del cache[len(self.param_groups):]
            cache.extend([None] * (len(self.param_groups) - len(cache)))
            if self._fresh(cache[index], group, pattern):
                return cache[index]
            cache[index] = None  # drop the stale lists (and the tensors they hold) before building
            self.__dict__.pop("_state_snapshot", None)
        entries = build(group)
        if not compiling:  # traced steps are checked by the ops' fake kernels; eager ones here
            self._check_lists(index, group, entries)
        sharded = to_local(group["params"]) is not group["params"]
        if compiling:
            calls = [(key, idx, [to_local(lst) for lst, _ in lists]) for key, idx, lists in entries]
            return _GroupLists(group, self.state, 0, pattern, calls, [], sharded)
        calls, verify = [], []
        for key, idx, lists in entries:
            frozen = [ops.freeze(to_local(lst)) for lst, _ in lists]
            calls.append((key, idx, frozen))
            named = [(name, lst) for (_, name), lst in zip(lists, frozen) if name is not None and len(lst)]
            if named:
                # Compared against the state dicts, so the lists of the state's own tensors
                # (DTensors stay DTensors there), not their local shards.
                originals = {name: lst for lst, name in lists}
                verify.append(([self.state[p] for p in lists[0][0]], tuple(name for name, _ in named),
                               [originals[name] for name, _ in named]))
        entry = _GroupLists(group, self.state, getattr(self, "_lists_version", 0), pattern, calls, verify, sharded)
        cache[index] = entry
        return entry

    def _check_param(self, p: torch.Tensor) -> None:
        """The checks of a param at construction; the device is checked at step(), as torch.optim's
        fused optimizers do, so a model built on the meta device can be given to the optimizer
        before ``to_empty()``."""
        name = type(self).__name__
        if p.is_complex():
            raise ValueError(f"{name}: complex params are not supported (got dtype {p.dtype}); use torch.view_as_real")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: params must be float32, bfloat16 or float16, got {p.dtype}")

    def _state_spec(self, group: dict, p: torch.Tensor) -> dict:
        """{state key: expected shape} of a param of ``group`` (``step`` included): the states a
        step needs and a loaded state_dict must hold."""
        spec = {key: p.shape for key in self._state_keys}
        spec["step"] = ()  # a float32 0-dim tensor (a loaded state_dict may hold a number)
        return spec

    def _check_lists(self, index: int, group: dict, entries: list) -> None:
        """Checks the lists ``build`` made for group ``index`` before any op runs: params on a
        device with a kernel, states of the expected shape/dtype/device, and no two tensors written
        by one call sharing memory (they would be updated concurrently). Raises naming the param."""
        name = type(self).__name__
        where = f"{name}: param group {index}"
        positions = {id(p): i for i, p in enumerate(group["params"])}
        for _, _, lists in entries:
            params = lists[0][0]
            self._check_bucket_params(where, positions, params)
            specs = [self._state_spec(group, p) for p in params]
            state_dtype = None
            for tensors, key in lists[1:]:
                if key is None:
                    continue
                for p, spec, t in zip(params, specs, tensors):
                    shape = spec.get(key)
                    label = f"{where}, params[{positions[id(p)]}]: state '{key}'"
                    if not isinstance(t, torch.Tensor):
                        raise TypeError(f"{label} must be a Tensor, got {type(t).__name__}")
                    if t.device != p.device:
                        raise ValueError(f"{label} is on {t.device} but the param is on {p.device}")
                    if key in self._scalar_state_keys:
                        if t.dtype != torch.float32 or t.numel() != 1:
                            raise ValueError(f"{label} must be a float32 tensor of one element, got {t.dtype} "
                                             f"with {t.numel()} elements")
                        continue
                    if t.shape != shape:
                        raise ValueError(f"{label} has shape {tuple(t.shape)} but must have shape {tuple(shape)}")
                    allowed = (torch.float32,) if self._fp32_states_only else (p.dtype, torch.float32)
                    if t.dtype not in allowed or (state_dtype is not None and t.dtype != state_dtype):
                        expected = state_dtype or " or ".join(map(str, allowed))
                        raise ValueError(f"{label} has dtype {t.dtype}; the states of one (device, dtype) "
                                         f"bucket must all be {expected}")
                    state_dtype = t.dtype
            self._check_overlap(where, positions, params, lists)

    @staticmethod
    def _check_bucket_params(where: str, positions: dict, params: list) -> None:
        """Raises unless the params of one bucket (one device and dtype, its key, so one look
        answers for all) have a kernel for their device and a supported dtype."""
        if not params:
            return
        label = f"{where}, params[{positions[id(params[0])]}]"
        if not ops.has_kernel(params[0].device.type):
            raise RuntimeError(f"{label}: no fused kernel for params on device '{params[0].device}' in this build "
                               f"(have: cpu{', cuda' if ops.has_kernel('cuda') else ''})")
        if params[0].dtype not in SUPPORTED_DTYPES:
            # E.g. model.double() once the states exist: refused here, before any group steps.
            raise ValueError(f"{label}: params must be float32, bfloat16 or float16, got {params[0].dtype}")

    @staticmethod
    def _check_overlap(where: str, positions: dict, params: list, lists: list) -> None:
        """Raises when two tensors one op call writes (``lists``, [(tensors, key)], params first)
        share memory, naming both."""
        # What the kernels write: the local shards of DTensors.
        overlap = _C.find_overlap(to_local([t for tensors, key in lists if key != "step" for t in tensors]))
        if overlap is not None:
            labels = [(positions[id(p)], key or "param") for tensors, key in lists if key != "step"
                      for p, _ in zip(params, tensors)]
            (i, a), (j, b) = labels[overlap[0]], labels[overlap[1]]
            what = (f"params[{i}] overlaps itself in memory (an expanded view)" if overlap[0] == overlap[1]
                    else f"{a} of params[{i}] and {b} of params[{j}] share memory")
            raise RuntimeError(f"{where}: {what}; one fused step would update the shared elements "
                               "concurrently. Give each param (and state) its own storage, e.g. with .clone()")

    # States of every dtype are float32 (AdaFactor), or the param's dtype or float32 (the rest).
    _fp32_states_only = False
    # States that are one float32 number per param whatever its shape (a 0-d param's other states
    # are 0-d too, but follow the param's dtype like any other).
    _scalar_state_keys: tuple[str, ...] = ("step",)

    def _state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        return group.get("state_dtype") or p.dtype

    def _record_new_state(self, p: torch.Tensor, key: str) -> None:
        """Notes a state entry a step creates, so a step that fails before its first op call can
        remove it again (see _collect_calls)."""
        log = self.__dict__.get("_new_states")
        if log is not None:
            log.append((p, key))

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
                    self._record_new_state(p, key)
                if step:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    self._record_new_state(p, "step")
        for (device, dtype), ps in buckets.items():
            for key in keys:
                for p, t in zip(ps, _packed_like(ps, dtype)):
                    self.state[p][key] = t
                    self._record_new_state(p, key)
            if step:
                for p, t in zip(ps, _packed_steps(device, [0.0] * len(ps))):
                    self.state[p]["step"] = t
                    self._record_new_state(p, "step")

    def _build_state_lists(self, group: dict, keys: tuple[str, ...]) -> list:
        """[((device, dtype, round), index, [(params, None), *((state[key] for the params), key),
        (steps, "step")])] for the params of ``group`` that have a grad, creating the states they
        miss; ``index`` lists the positions in group["params"] of each bucket's params (None: all of
        them, in order).

        A param listed twice in a group (torch.optim warns, then updates it twice in sequence)
        goes into a second round of calls: round r holds the r-th occurrences, and the rounds run in
        order, so the result is torch's sequential one and no call sees the same memory twice.
        """
        params = group["params"]
        with_grad = list({id(p): p for p in params if p.grad is not None}.values())
        missing: dict = {}
        for p in with_grad:
            state = self.state.get(p, {})
            absent = tuple(key for key in (*keys, "step") if key not in state)
            if absent:
                missing.setdefault(absent, []).append(p)
        for absent, ps in missing.items():
            self._init_state(group, ps, tuple(k for k in absent if k != "step"), step="step" in absent)
        rounds = _occurrences(params)
        buckets: dict = {}
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            state = self.state[p]
            index, lists = buckets.setdefault((p.device, p.dtype, rounds[i]), ([], tuple([] for _ in range(len(keys) + 2))))
            index.append(i)
            lists[0].append(p)
            for k, key in enumerate(keys, start=1):
                lists[k].append(state[key])
            lists[-1].append(state["step"])
        everything = list(range(len(params)))
        return [(key, None if index == everything else index, list(zip(lists, (None, *keys, "step"))))
                for key, (index, lists) in sorted(buckets.items(), key=lambda item: item[0][2])]

    def _collect_calls(self, build, options, *, clip: bool = False) -> list:
        """[(group, key, grads, lists, clip_coef)]: one entry per op call of this step, for every
        group, built and checked before any tensor changes, so that an error leaves every param,
        state and grad as it was (states created on the way are removed again). ``build(group)``
        makes the lists (see _group_lists); ``options(group)`` are the group options it reads.
        With ``clip``, groups with a ``max_grad_norm`` get their clip factor (else None); see
        [Note: folded clipping]."""
        name = type(self).__name__
        gathered = []
        for index, group in enumerate(self.param_groups):
            try:
                self._check_group(group)
                grads, any_sparse, has_grad = ops.grads_of(group["params"])
            except (TypeError, ValueError) as error:
                raise type(error)(f"{name}: param group {index}: {error}") from None
            if any_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            gathered.append((group, grads, has_grad))
        compiling = torch.compiler.is_compiling()
        if not compiling and not self._state_unchanged():
            self._invalidate_lists()  # an entry of self.state was added, replaced or removed
        log: list = []
        self.__dict__["_new_states"] = log
        try:
            entries = [self._group_lists(index, group, has_grad, build, options(group))
                       for index, (group, _, has_grad) in enumerate(gathered)]
            factors = self._clip_factors(gathered) if clip else {}
        except BaseException:
            for p, key in reversed(log):
                state = self.state.get(p)
                if state is not None:
                    state.pop(key, None)
                    if not state:
                        del self.state[p]
            self._invalidate_lists()
            raise
        finally:
            self.__dict__["_new_states"] = None
        if not compiling and "_state_snapshot" not in self.__dict__:
            self.__dict__["_state_snapshot"] = (self.state, _C.dict_items(self.state))
        self.__dict__["_step_clip_factors"] = factors  # for work outside the op calls (sharded AdaFactor)
        calls = []
        for (group, grads, _), entry in zip(gathered, entries):
            if entry.sharded or compiling:
                grads = to_local(grads)
            factor = factors.get(id(group))
            for key, index, lists in entry.calls:
                coefficient = None if factor is None else scalar_to(factor, key[0])
                calls.append((group, key, grads if index is None else [grads[i] for i in index], lists, coefficient))
        return calls

    # [Note: folded clipping]
    # max_grad_norm=c makes a step do what torch.nn.utils.clip_grad_norm_(params, c) followed by the
    # step would, with one pass over the grads instead of three: the global 2-norm of the grads of
    # every group that has a max_grad_norm (fused_grad_norm, one pass; of the unscaled grads under
    # GradScaler, whose found_inf still skips the whole step), then min(1, c / (norm + 1e-6)) goes
    # into each op call as clip_coef, which the kernels multiply into the gradient they read. The
    # grads themselves are not rewritten (GradScaler's unscaling aside). The norm is torch's
    # (get_total_norm: same dtype rules, DTensor grads reduced over their mesh) and is kept as
    # last_grad_norm, a tensor, so logging it costs no sync until read.
    def _clip_factors(self, gathered: list) -> dict:
        """{id(group): clip factor (float32 0-dim tensor)} for the groups with a max_grad_norm."""
        clipping = [(group, grads) for group, grads, _ in gathered if group.get("max_grad_norm") is not None]
        if not clipping:
            return {}
        grads = [g for _, group_grads in clipping for g in group_grads if g is not None]
        if len(set(map(id, grads))) != len(grads):  # a param listed twice counts once, as in torch
            grads = list({id(g): g for g in grads}.values())
        norm = get_total_norm(grads, 2.0, grad_scale=getattr(self, "grad_scale", None))
        self.last_grad_norm = norm
        return {id(group): clip_coefficient(norm, group["max_grad_norm"]).float() for group, _ in clipping}

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
        re-packed as in [Note: flat state].
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_states = [state_dict["state"].get(i) for i in saved_ids]
        before = {key: self.__dict__[key] for key in ("state", "param_groups")}
        try:
            super().load_state_dict(state_dict)
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

    def _amp_tensors(self, device: torch.device, cache: dict):
        """GradScaler's (grad_scale, found_inf) for params on ``device``, or (None, None)."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None, None
        if device not in cache:
            cache[device] = tuple(
                None if t is None else scalar_to(t, device)
                for t in (grad_scale, found_inf)
            )
        return cache[device]


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


def _occurrences(params: list) -> list:
    """For each position of ``params``, how many times the same tensor appeared before it."""
    if len({id(p) for p in params}) == len(params):
        return [0] * len(params)
    seen: dict = {}
    rounds = []
    for p in params:
        rounds.append(seen.get(id(p), 0))
        seen[id(p)] = rounds[-1] + 1
    return rounds
