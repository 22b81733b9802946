"""Fused AdaFactor (Shazeer & Stern 2018) with the semantics of the transformers/fairseq Adafactor."""

from __future__ import annotations

import math

import torch

from dldna_fused import ops
from dldna_fused._closure import closure_loss
from dldna_fused._distributed import dtensor_type
from dldna_fused._rounding import param_key, write_mode, write_param_
from dldna_fused.optim._flat_state import _packable, _packed, _packed_steps
from dldna_fused.optim._fused import FusedOptimizer, scalar
from dldna_fused.optim._group_lists import _occurrences, _shard_rank
from dldna_fused.reference.adafactor import check_adafactor_options


def _factored(p: torch.Tensor) -> bool:
    return p.dim() >= 2


def _is_dtensor(p: torch.Tensor) -> bool:
    DTensor = dtensor_type()
    return DTensor is not None and isinstance(p, DTensor)


def _sharded_zeros(p, key: str, shape) -> torch.Tensor:
    """A zero state of ``shape`` for the DTensor param ``p`` (see [Note: sharded AdaFactor]):
    float32; the column statistics of a matrix replicated, every other state sharded on dim 0 like
    ``p``; ``step`` and ``RMS`` plain tensors (the same on every rank)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    if key in ("step", "RMS"):
        return torch.zeros((), dtype=torch.float32, device=p.to_local().device)
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(f"Adafactor: DTensor params must be sharded on dim 0 over a 1-D mesh (FSDP2's "
                                  f"default), got placements {p.placements} on a {mesh.ndim}-D mesh")
    placements = [Replicate()] if key == "exp_avg_sq_col" and p.dim() == 2 else p.placements
    return dtensor_zeros(tuple(shape), dtype=torch.float32, device_mesh=mesh, placements=placements)


# [Note: Adafactor and lr schedulers]
# With relative_step=True, lr is None (transformers' convention) and the step size is its own
# schedule. A torch lr scheduler would fail inside its constructor's first step on None
# arithmetic ("unsupported operand type(s) for *: 'NoneType' and 'float'"). Before that step, every
# torch scheduler wraps optimizer.step (a wrapper marked _wrapped_by_lr_sched) and assigns it to
# the optimizer; Adafactor.__setattr__ sees that assignment and, when a relative-step group has no
# initial_lr but None, raises a TypeError that says what to do (after removing the None the
# scheduler had just put there). transformers' AdafactorSchedule sets initial_lr first and passes.
# (Dict subclasses for the groups would catch it earlier, but torch.compile cannot trace them.)
SCHEDULER_MESSAGE = (
    "Adafactor(relative_step=True) has lr=None and computes its own relative step size, which an lr scheduler "
    "cannot scale. To use a scheduler, pass relative_step=False and an lr, e.g. Adafactor(params, lr=1e-3, "
    "relative_step=False, scale_parameter=False); to log the relative step, use "
    "transformers.optimization.AdafactorSchedule(optimizer).")


class Adafactor(FusedOptimizer):
    r"""AdaFactor with fused multi-tensor kernels on the CPU and on CUDA: a factored second moment
    (one row and one column vector per matrix instead of a full tensor), relative step sizes and
    update clipping, as in the transformers and fairseq Adafactor that most users call.

    Per parameter :math:`\theta` at step :math:`t` (gradient :math:`g`, divided by GradScaler's scale
    when one is in use), with :math:`G = g \odot g + \epsilon_1`:

    .. math::
        \begin{aligned}
        \rho_t &= \begin{cases} \min\big(10^{-6} t \text{ if warmup\_init else } 10^{-2},\;
                 1/\sqrt{t}\big) & \text{relative\_step} \\ \mathrm{lr} & \text{otherwise}\end{cases} \\
        \alpha_t &= \max\big(\epsilon_2, \mathrm{RMS}(\theta_{t-1})\big)\,\rho_t
                 \quad (\rho_t \text{ without scale\_parameter}) \\
        \hat\beta_{2t} &= 1 - t^{c} \qquad (c = \text{decay\_rate}) \\
        \text{factored:}\quad R_t &= \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\,\mathrm{mean}_{-1}(G),
          \quad C_t = \hat\beta_{2t} C_{t-1} + (1-\hat\beta_{2t})\,\mathrm{mean}_{-2}(G) \\
        U_t &= g \,/\, \sqrt{R_t C_t / \mathrm{mean}(R_t)} \\
        \text{unfactored:}\quad V_t &= \hat\beta_{2t} V_{t-1} + (1-\hat\beta_{2t})\,G,
          \quad U_t = g / \sqrt{V_t} \\
        U_t &\leftarrow \alpha_t\, U_t / \max\big(1, \mathrm{RMS}(U_t)/d\big) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) U_t,\quad U_t \leftarrow m_t \quad (\text{if } \beta_1) \\
        \theta_t &= \theta_{t-1} - \lambda\alpha_t\theta_{t-1} - U_t
        \end{aligned}

    Params with 2 or more dims are factored over their last two dims (leading dims are batched, so
    a conv weight ``out x in x kh x kw`` keeps ``out x in x kh`` row and ``out x in x kw`` column
    statistics); 1-D params keep a full :math:`V`. All statistics are float32 and all math runs in
    fp32, also for bf16/fp16 params. A zero-size param only counts its step. A NaN or inf in a
    param's gradient makes that whole param NaN (through RMS(U) and the clip), as in transformers
    and :class:`dldna_fused.reference.Adafactor`; use GradScaler (which skips such steps) or check
    the gradients when they can be non-finite.

    This is not ``torch.optim.Adafactor``, whose ``lr`` only caps :math:`\rho_t`, which has no
    ``beta1``, ``relative_step`` or ``scale_parameter`` switches and applies :math:`\epsilon_1`
    differently.

    Args:
        params: iterable of parameters or param groups.
        lr: the external learning rate; must be None with ``relative_step=True`` and given
            without it (as in transformers). With ``relative_step=True`` the step size is its own
            schedule: a torch lr scheduler cannot scale ``lr=None`` and its constructor raises a
            TypeError saying to use ``relative_step=False`` with an ``lr`` (see [Note: Adafactor
            and lr schedulers]); ``transformers.optimization.AdafactorSchedule`` (which reads
            :meth:`_get_lr`) reports the relative step to loggers. With Hugging Face's Trainer,
            pass it as the schedule: ``optimizers=(opt, AdafactorSchedule(opt))``; with
            ``(opt, None)`` Trainer's default LambdaLR meets ``lr=None`` behind accelerate's
            wrapper, where this check cannot run, and fails with ``TypeError: unsupported operand
            type(s) for *: 'NoneType' and 'float'``.
        eps: :math:`(\epsilon_1, \epsilon_2)`: regularizes the squared gradient, and floors the
            parameter scale (default (1e-30, 1e-3)).
        clip_threshold: :math:`d`, the RMS the update is clipped to (default 1.0).
        decay_rate: :math:`c` (default -0.8).
        beta1: first-moment coefficient, or None for no first moment (default).
        weight_decay: :math:`\lambda`, scaled by :math:`\alpha_t` (default 0).
        scale_parameter: multiply the step size by RMS(θ) (default True).
        relative_step: time-dependent step size :math:`\rho_t` (default True).
        warmup_init: linear warm-up of :math:`\rho_t` (needs ``relative_step``; default False).
        max_grad_norm: clip the global 2-norm of the gradients inside the step (see
            :class:`dldna_fused.optim.Adam`).
        bf16_stochastic_round, kahan_sum, seed: how bf16 params are written (see
            :class:`dldna_fused.optim.Adam`); with kahan_sum, RMS(θ) is that of θ + its
            compensation.

    State per parameter: ``step`` (float32 0-dim tensor), ``exp_avg_sq_row`` and
    ``exp_avg_sq_col`` (factored) or ``exp_avg_sq``, ``exp_avg`` (with ``beta1``), and ``RMS``
    (float32 0-dim tensor, RMS(θ) before the last step).
    """

    _op_name = "dldna_fused::fused_adafactor_"
    _state_keys = ("exp_avg", "exp_avg_sq")  # the elementwise ones (see [Note: flat state])
    _all_state_keys = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "RMS")

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, max_grad_norm: float | None = None,
                 bf16_stochastic_round: bool = False, kahan_sum: bool = False, seed: int | None = None):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init)
        super().__init__(params, defaults, foreach=None, differentiable=False, fused=None, state_dtype=None,
                         max_grad_norm=max_grad_norm,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)

    _fp32_states_only = True
    _scalar_state_keys = ("step", "RMS")
    _lazy_state_keys = ("exp_avg",)  # beta1 switched on ([Note: states an option switches on])

    _OPTIONS = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "relative_step", "warmup_init")

    def __setattr__(self, name, value):
        if name == "step" and getattr(value, "_wrapped_by_lr_sched", False):  # [Note: Adafactor and lr schedulers]
            unscheduled = [g for g in self.param_groups if g.get("relative_step") and "initial_lr" in g
                           and g["initial_lr"] is None]
            if unscheduled:
                for group in unscheduled:
                    del group["initial_lr"]
                raise TypeError(SCHEDULER_MESSAGE)
        super().__setattr__(name, value)

    @classmethod
    def _check_options(cls, options: dict) -> None:
        check_adafactor_options(*(options[key] for key in cls._OPTIONS))

    def _check_step_options(self, group: dict) -> None:
        check_adafactor_options(*(group[key] for key in self._OPTIONS), construction=False)

    def _state_spec(self, group: dict, p: torch.Tensor) -> dict:
        spec = {"RMS": (), "step": ()}
        if group["beta1"] is not None:
            spec["exp_avg"] = p.shape
        if _factored(p):
            spec["exp_avg_sq_row"] = p.shape[:-1]
            spec["exp_avg_sq_col"] = p.shape[:-2] + p.shape[-1:]
        else:
            spec["exp_avg_sq"] = p.shape
        return spec

    def _state_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        return torch.float32

    @staticmethod
    def _get_lr(param_group: dict, param_state: dict) -> float:
        """The step size :math:`\alpha_t` of a param at its last step, as transformers' Adafactor
        computes it: what ``transformers.optimization.AdafactorSchedule`` reads to report the
        learning rate of a relative-step run (it calls ``optimizer._get_lr(group, state)``)."""
        step = float(param_state["step"])
        rho = param_group["lr"]
        if param_group["relative_step"]:
            rho = min(1e-6 * step if param_group["warmup_init"] else 1e-2, 1.0 / math.sqrt(max(step, 1.0)))
        scale = max(param_group["eps"][1], float(param_state["RMS"])) if param_group["scale_parameter"] else 1.0
        return scale * scalar(rho)

    def _fp32_state_keys(self, group: dict) -> tuple[str, ...]:
        return self._all_state_keys

    def _init_states(self, group: dict, params: list) -> None:
        """Creates the states ``params`` miss, each kind as views of one buffer per device."""
        wanted: dict = {}  # (device, key) -> [(param, shape)]
        for p in params:
            state = self.state[p]
            for key, shape in self._state_spec(group, p).items():
                if key in state:
                    continue
                if _is_dtensor(p):
                    state[key] = _sharded_zeros(p, key, shape)
                    self._record_new_state(p, key)
                elif _packable(p):
                    wanted.setdefault((p.device, key), []).append((p, shape))
                else:
                    state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    self._record_new_state(p, key)
        for (device, key), entries in wanted.items():
            if key in ("step", "RMS"):
                tensors = _packed_steps(device, [0.0] * len(entries))
            else:
                tensors = _packed([(shape, None) for _, shape in entries], torch.float32, device)
            for (p, _), t in zip(entries, tensors):
                self.state[p][key] = t
                self._record_new_state(p, key)

    def _build_lists(self, group: dict) -> list:
        """[((device, dtype, factored, round), index, [(params, None), (rows, "exp_avg_sq_row"), ...,
        (steps, "step")])] for the params of ``group`` with a grad, in the op's list order: params,
        rows, cols, sqs, exp_avgs, rms, steps (see FusedOptimizer._build_state_lists for rounds)."""
        params = group["params"]
        self._init_states(group, list({id(p): p for p in params if p.grad is not None}.values()))
        use_first_moment = group["beta1"] is not None
        rounds = _occurrences(params)
        buckets: dict = {}
        for i, p in enumerate(params):
            if p.grad is None or _is_dtensor(p):  # sharded params: _sharded_step
                continue
            state = self.state[p]
            factored = _factored(p)
            index, lists = buckets.setdefault((p.device, p.dtype, factored, rounds[i]),
                                              ([], tuple([] for _ in range(7))))
            index.append(i)
            lists[0].append(p)
            if factored:
                lists[1].append(state["exp_avg_sq_row"])
                lists[2].append(state["exp_avg_sq_col"])
            else:
                lists[3].append(state["exp_avg_sq"])
            if use_first_moment:
                lists[4].append(state["exp_avg"])
            lists[5].append(state["RMS"])
            lists[6].append(state["step"])
        everything = list(range(len(params)))
        names = (None, "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg", "RMS", "step")
        return [(key, None if index == everything else index,
                 [(lst, name if lst else None) for lst, name in zip(lists, names)])
                for key, (index, lists) in sorted(buckets.items(), key=lambda item: item[0][3])]

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = closure_loss(closure)
        calls = self._collect_calls(self._build_lists, lambda g: (g["beta1"] is not None,), clip=True)
        amp_cache: dict = {}
        for group, (device, _, _, _), grads, lists, clip_coef, writes in calls:
            params, rows, cols, sqs, exp_avgs, rms, steps = lists
            grad_scale, found_inf = self._amp_tensors(device, amp_cache)
            eps1, eps2 = group["eps"]
            ops.fused_adafactor_(
                params, grads, rows, cols, sqs, exp_avgs, rms, steps,
                lr=None if group["relative_step"] else scalar(group["lr"]), eps1=eps1, eps2=eps2,
                clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"], beta1=group["beta1"],
                weight_decay=group["weight_decay"], scale_parameter=group["scale_parameter"],
                relative_step=group["relative_step"], warmup_init=group["warmup_init"],
                grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, **writes)
        for group in self.param_groups:
            sharded = [p for p in group["params"] if p.grad is not None and _is_dtensor(p)]
            if sharded:
                self._init_states(group, sharded)
                self._sharded_step(group, sharded, self._step_clip_factors.get(id(group)))
        return loss

    # [Note: sharded AdaFactor]
    # Under FSDP2 a param is a DTensor sharded on dim 0 over a 1-D mesh. For tensors of 3 or more
    # dims that splits the batch of matrices, so every row and column statistic is whole on its
    # rank. For a matrix it splits the rows: row statistics stay whole, but the column means, the
    # mean of R and the two RMS values need sums over all ranks. Rather than approximating them per
    # shard (the numbers would then depend on the world size), this path computes them exactly:
    # one all-reduce of every partial sum of the step before the updates, one of the sums of U^2
    # after, in plain torch ops on the local shards. So a sharded run matches an unsharded one to
    # rounding; the price is two collectives per step and an unfused step for sharded params.
    # Column statistics of matrices are Replicate DTensors, the rest have the param's placements.
    @torch.no_grad()
    def _sharded_step(self, group: dict, params: list, clip_coef: torch.Tensor | None = None) -> None:
        import torch.distributed as dist

        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError("Adafactor: GradScaler with FSDP2-sharded params is not supported")
        eps1, eps2 = group["eps"]
        beta1 = group["beta1"]
        pg = params[0].device_mesh.get_group()
        # The param writes of the fused step ([Note: bf16 param writes] in rounding_math.h), in torch
        # ops: the same bits for the same key, step and local element.
        group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
        positions = {id(q): i for i, q in enumerate(group["params"])}
        entries = []
        for p in params:
            state = self.state[p]
            state["step"] += 1
            t = state["step"].item()
            theta, g = p.to_local().float(), p.grad.to_local().float()
            if write_mode(group, p) == "kahan":
                if "kahan_comp" not in state:
                    state["kahan_comp"] = torch.zeros_like(p)
                theta = theta + state["kahan_comp"].to_local().float()
            if clip_coef is not None:
                g = g * clip_coef.to(g.device)
            entries.append(dict(p=p, state=state, t=t, theta=theta, g=g, g2=g * g + eps1,
                                matrix=p.dim() == 2, factored=_factored(p)))
        # Phase 1: local statistics, then one all-reduce of every partial sum.
        partial = []
        for e in entries:
            state, t = e["state"], e["t"]
            beta2t = 1.0 - t ** group["decay_rate"]
            e["beta2t"] = beta2t
            partial.append(e["theta"].square().sum().reshape(1))
            if e["factored"]:
                row = state["exp_avg_sq_row"].to_local()
                row.mul_(beta2t).add_(e["g2"].mean(dim=-1), alpha=1.0 - beta2t)
                if e["matrix"]:
                    partial.append(e["g2"].sum(dim=-2))
                    partial.append(row.sum().reshape(1))
                else:
                    state["exp_avg_sq_col"].to_local().mul_(beta2t).add_(e["g2"].mean(dim=-2), alpha=1.0 - beta2t)
            else:
                state["exp_avg_sq"].to_local().mul_(beta2t).add_(e["g2"], alpha=1.0 - beta2t)
        sums = torch.cat(partial)
        dist.all_reduce(sums, group=pg)
        # Phase 2: the update, its RMS by a second all-reduce, then apply.
        offset, updates = 0, []
        for e in entries:
            p, state = e["p"], e["state"]
            e["rms"] = math.sqrt(sums[offset].item() / max(p.numel(), 1))
            offset += 1
            if e["factored"]:
                row = state["exp_avg_sq_row"].to_local()
                if e["matrix"]:
                    rows, cols = p.shape
                    col_mean = sums[offset:offset + cols] / rows
                    offset += cols
                    row_mean = sums[offset] / rows
                    offset += 1
                    col = state["exp_avg_sq_col"].to_local()
                    col.mul_(e["beta2t"]).add_(col_mean, alpha=1.0 - e["beta2t"])
                    r_factor = (row / row_mean).rsqrt().unsqueeze(-1)
                else:
                    col = state["exp_avg_sq_col"].to_local()
                    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                update = (r_factor * col.unsqueeze(-2).rsqrt()) * e["g"]
            else:
                update = state["exp_avg_sq"].to_local().rsqrt() * e["g"]
            updates.append(update)
        u2 = torch.stack([u.square().sum() for u in updates]) if updates else torch.zeros(0)
        dist.all_reduce(u2, group=pg)
        for e, update, u_sq in zip(entries, updates, u2):
            p, state, t = e["p"], e["state"], e["t"]
            state["RMS"].fill_(e["rms"])
            rho = group["lr"]
            if group["relative_step"]:
                rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
            alpha = max(eps2, e["rms"]) * rho if group["scale_parameter"] else rho
            rms_u = math.sqrt(u_sq.item() / max(p.numel(), 1))
            ratio = rms_u / group["clip_threshold"]
            update = update * (alpha / (ratio if ratio > 1.0 or math.isnan(ratio) else 1.0))
            if beta1 is not None:
                m = state["exp_avg"].to_local()
                m.mul_(beta1).add_(update, alpha=1.0 - beta1)
                update = m
            theta = e["theta"]
            if group["weight_decay"] != 0.0:
                theta.add_(theta, alpha=-group["weight_decay"] * alpha)
            theta.sub_(update)
            mode = write_mode(group, p)
            key = (param_key(group["seed"], group_index, positions[id(p)], _shard_rank(p))
                   if mode == "stochastic" else None)
            write_param_(p.to_local(), theta, comp=state["kahan_comp"].to_local() if mode == "kahan" else None,
                         key=key, step=t)
