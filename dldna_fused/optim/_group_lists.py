"""The op-call lists of a fused optimizer: built per param group, grouped by (device, dtype),
cached between steps, and checked before any op runs ([Note: cached tensor lists])."""

from __future__ import annotations

import operator
import warnings

import torch

from dldna_fused import _C, ops
from dldna_fused._distributed import to_local
from dldna_fused._rounding import param_key
from dldna_fused.optim._flat_state import _packable, _packed_like, _packed_steps

SUPPORTED_DTYPES = ops.KERNEL_DTYPES  # what a param may be

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


class CachedGroupLists:
    """The list building, caching and checking half of FusedOptimizer (a mixin; it reads
    ``self.state``, ``self.param_groups`` and the optimizer's ``_state_spec``)."""

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
        entries = self._with_param_writes(index, group, build(group))
        if not compiling:  # traced steps are checked by the ops' fake kernels; eager ones here
            self._check_lists(index, group, entries)
        sharded = to_local(group["params"]) is not group["params"]
        if compiling:
            calls = [(key, idx, [to_local(lst) for lst, _ in lists[:-2]], _writes(lists, to_local))
                     for key, idx, lists in entries]
            return _GroupLists(group, self.state, 0, pattern, calls, [], sharded)
        calls, verify = [], []
        for key, idx, lists in entries:
            frozen = [ops.freeze(to_local(lst)) for lst, _ in lists[:-1]]
            calls.append((key, idx, frozen[:-1], _writes(lists, lambda comps: frozen[-1])))
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

    # [Note: param write lists]
    # Every call's lists end with two that say how its params are written ([Note: bf16 param
    # writes] in csrc/common/rounding_math.h): (the params' "kahan_comp" states, "kahan_comp") under
    # kahan_sum and ([their sr_keys], "sr_keys") under bf16_stochastic_round, for bf16 buckets; both
    # are empty otherwise. The compensation is a state like any other (cached, checked, verified);
    # the keys are ints, fixed by the seed, the group's position and the param's position in it,
    # all of which a cache entry is keyed on. _group_lists hands them to the step as the `writes`
    # of each call, {"kahan_comps": ..., "sr_keys": ...}, None where unused.
    def _with_param_writes(self, index: int, group: dict, entries: list) -> list:
        kahan = group.get("kahan_sum", False)
        stochastic = group.get("bf16_stochastic_round", False)
        out = []
        for key, idx, lists in entries:
            params = lists[0][0]
            comps, keys = [], []
            if key[1] == torch.bfloat16 and params and kahan:
                missing = [p for p in params if "kahan_comp" not in self.state[p]]
                for p in missing:
                    self.state[p]["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._record_new_state(p, "kahan_comp")
                comps = [self.state[p]["kahan_comp"] for p in params]
            elif key[1] == torch.bfloat16 and params and any("kahan_comp" in self.state[p] for p in params):
                # kahan_sum switched off: the compensation would be stale if it came back on. It
                # goes once every group has passed its checks (_drop_stale_comps).
                self.__dict__.setdefault("_stale_comps", []).append(
                    (index, [p for p in params if "kahan_comp" in self.state[p]]))
            if key[1] == torch.bfloat16 and params and stochastic and not kahan:
                rank = _shard_rank(params[0])
                keys = [param_key(group["seed"], index, position, rank)
                        for position in (idx if idx is not None else range(len(params)))]
            out.append((key, idx, [*lists, (comps, "kahan_comp" if comps else None), (keys, "sr_keys")]))
        return out

    def _drop_stale_comps(self) -> None:
        """Drops the compensations _with_param_writes found in groups with kahan_sum off, with a
        warning; called when a step's lists have all been built and checked."""
        for index, stale in self.__dict__.pop("_stale_comps", []):
            for p in stale:
                self.state[p].pop("kahan_comp", None)
            warnings.warn(f"{type(self).__name__}: param group {index}: kahan_sum is off; dropped the "
                          f"'kahan_comp' of {len(stale)} param(s), each losing the part of its value below "
                          "bf16 precision", stacklevel=4)

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
                if key is None or key == "sr_keys":
                    continue
                for p, spec, t in zip(params, specs, tensors):
                    shape = spec.get(key)
                    label = f"{where}, params[{positions[id(p)]}]: state '{key}'"
                    if not isinstance(t, torch.Tensor):
                        raise TypeError(f"{label} must be a Tensor, got {type(t).__name__}")
                    if t.device != p.device:
                        raise ValueError(f"{label} is on {t.device} but the param is on {p.device}")
                    if key == "kahan_comp":
                        self._check_comp(label, p, t)
                        continue
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
    def _check_comp(label: str, p: torch.Tensor, t: torch.Tensor) -> None:
        """A param's kahan_comp (already known to be a tensor on its device): its shape and dtype."""
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"{label} must have the param's shape {tuple(p.shape)} and dtype {p.dtype}, "
                             f"got {tuple(t.shape)} and {t.dtype}")

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
        written = [(tensors, key) for tensors, key in lists if key not in ("step", "sr_keys")]
        overlap = _C.find_overlap(to_local([t for tensors, _ in written for t in tensors]))
        if overlap is not None:
            labels = [(positions[id(p)], key or "param") for tensors, key in written
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


def _writes(lists: list, convert) -> dict:
    """The `writes` of one call from its last two lists ([Note: param write lists]); ``convert``
    turns the compensations into what the op takes."""
    (comps, _), (keys, _) = lists[-2:]
    return {"kahan_comps": convert(comps) if comps else None, "sr_keys": keys or None}


def _shard_rank(p: torch.Tensor) -> int:
    """The rank of this process in a DTensor param's mesh (its shard draws its own bits), else 0."""
    mesh = getattr(p, "device_mesh", None)
    return 0 if mesh is None else int(mesh.get_rank())


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
