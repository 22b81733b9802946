"""The base of every fused optimizer: argument rules, parameter checks, and one step's op calls
(with folded clipping and GradScaler's tensors). The op-call lists live in _group_lists.py,
state_dict loading in _state_dict.py, the flat state layout in _flat_state.py."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from dldna_fused import _C, ops
from dldna_fused._devices import scalar_to
from dldna_fused._rounding import add_write_options
from dldna_fused._distributed import to_local
from dldna_fused.clip import clip_coefficient, get_total_norm
from dldna_fused._checks import (check_betas, check_hyperparameter, check_lr,  # noqa: F401 (re-exported)
                                 check_weight_decay, scalar)
from dldna_fused.optim._group_lists import SUPPORTED_DTYPES, CachedGroupLists
from dldna_fused.optim._state_dict import StateDictLoading


class FusedOptimizer(CachedGroupLists, StateDictLoading, Optimizer):
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
                 max_grad_norm: float | None = None, bf16_stochastic_round: bool = False,
                 kahan_sum: bool = False, seed: int | None = None):
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
        # [Note: bf16 param writes] in csrc/common/rounding_math.h; keys only when asked, likewise.
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
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
        for key in ("bf16_stochastic_round", "kahan_sum"):
            if not isinstance(options.get(key, False), bool):
                raise TypeError(f"{key} must be a bool, got {type(options[key]).__name__}")
        if options.get("bf16_stochastic_round") and options.get("kahan_sum"):
            raise ValueError("bf16_stochastic_round=True and kahan_sum=True were both given; they are two cures for "
                             "the same rounding loss, choose one")
        seed = options.get("seed")
        if options.get("bf16_stochastic_round") and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"bf16_stochastic_round=True needs an int 'seed' in the param group, got {seed!r}")

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

    def _collect_calls(self, build, options, *, clip: bool = False) -> list:
        """[(group, key, grads, lists, clip_coef, writes)]: one entry per op call of this step, for every
        group, built and checked before any tensor changes, so that an error leaves every param,
        state and grad as it was (states created on the way are removed again). ``build(group)``
        makes the lists (see _group_lists); ``options(group)`` are the group options it reads.
        With ``clip``, groups with a ``max_grad_norm`` get their clip factor (else None); see
        [Note: folded clipping]. ``writes`` are the op's kahan_comps/sr_keys keywords
        ([Note: param write lists] in _group_lists.py)."""
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
        self.__dict__.pop("_stale_comps", None)
        try:
            entries = [self._group_lists(index, group, has_grad, build, (options(group), *_write_options(group)))
                       for index, (group, _, has_grad) in enumerate(gathered)]
            factors = self._clip_factors(gathered) if clip else {}
        except BaseException:
            self.__dict__.pop("_stale_comps", None)
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
        self._drop_stale_comps()
        if not compiling and "_state_snapshot" not in self.__dict__:
            self.__dict__["_state_snapshot"] = (self.state, _C.dict_items(self.state))
        self.__dict__["_step_clip_factors"] = factors  # for work outside the op calls (sharded AdaFactor)
        calls = []
        for (group, grads, _), entry in zip(gathered, entries):
            if entry.sharded or compiling:
                grads = to_local(grads)
            factor = factors.get(id(group))
            for key, index, lists, writes in entry.calls:
                coefficient = None if factor is None else scalar_to(factor, key[0])
                calls.append((group, key, grads if index is None else [grads[i] for i in index], lists, coefficient,
                              writes))
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
        # A caller that already has the global norm of these grads (the offload wrapper, which
        # sums its buckets' norms while backward runs) hands it over instead of a second pass.
        norm = self.__dict__.get("_given_grad_norm")
        if norm is None:
            norm = get_total_norm(grads, 2.0, grad_scale=getattr(self, "grad_scale", None))
        self.last_grad_norm = norm
        return {id(group): clip_coefficient(norm, group["max_grad_norm"]).float() for group, _ in clipping}

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


def _write_options(group: dict) -> tuple:
    """The group options that shape its param write lists ([Note: param write lists])."""
    return group.get("kahan_sum", False), group.get("bf16_stochastic_round", False), group.get("seed")
