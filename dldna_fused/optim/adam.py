"""Fused Adam and AdamW: drop-in replacements for torch.optim.Adam / torch.optim.AdamW."""

from __future__ import annotations

import torch

from dldna_fused import ops
from dldna_fused._closure import closure_loss
from dldna_fused.optim._fused import (FusedOptimizer, check_betas, check_hyperparameter, check_lr,
                                     check_weight_decay, scalar)

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Adam(FusedOptimizer):
    r"""Adam with a fused multi-tensor kernel on the CPU and on CUDA.

    Takes the arguments of :class:`torch.optim.Adam` and keeps its ``param_groups`` and
    ``state_dict`` layout (``step`` as a float32 0-dim tensor, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``), so checkpoints move between the two both ways. Per parameter, with
    gradient :math:`g_t` (divided by GradScaler's scale when one is in use), step :math:`t`:

    .. math::
        \begin{aligned}
        g_t &\leftarrow -g_t \quad \text{if maximize} \\
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \quad \text{if decoupled (AdamW)},
            \qquad g_t \leftarrow g_t + \lambda\theta_{t-1} \quad \text{otherwise} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \ \text{if amsgrad, else}\ v_t \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \end{aligned}

    All arithmetic is fp32, whatever the params' dtype. Each step makes one op call per
    (param group, device, dtype); the call updates every tensor of that group at once.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as in
            torch.optim.Adam. ``lr`` may be a one-element tensor (read on the device under CUDA).
        foreach, fused: accepted for compatibility; the step is always fused (``foreach=True`` and
            ``fused=False`` are errors).
        capturable: accepted; the CUDA step is always CUDA-graph capturable (the step counters
            live on the device and are read there).
        differentiable: must be False.
        state_dtype: ``None`` keeps states in the params' dtype, as torch.optim does;
            ``torch.float32`` keeps fp32 states for bf16/fp16 params (more accurate, 2x the state
            memory of bf16 states), which torch's fused kernel cannot do.
        max_grad_norm: clip the global 2-norm of the gradients to this value inside the step, as
            ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before it would, in one pass
            and without rewriting the grads; the norm is kept in :attr:`last_grad_norm`.
        bf16_stochastic_round, kahan_sum, seed: how bf16 params are written (pure-bf16 training
            without fp32 master weights). ``bf16_stochastic_round=True`` rounds each new value up
            or down with probability by distance, so updates below half a bf16 ulp survive on
            average; its random bits come from (``seed``, param, step, element), reproducible and
            the same for any thread count, with ``seed`` kept in the param group (default:
            ``torch.initial_seed()``). ``kahan_sum=True`` keeps a bf16 ``kahan_comp`` state per
            param with what the last write lost and adds it back before the next update. One or
            the other; params of other dtypes are written as always.
    """

    _state_keys = _STATE_KEYS
    _lazy_state_keys = ("max_exp_avg_sq",)  # [Note: states an option switches on]

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        bf16_stochastic_round: bool = False,
        kahan_sum: bool = False,
        seed: int | None = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, foreach=foreach, differentiable=differentiable, fused=fused,
                         state_dtype=state_dtype, max_grad_norm=max_grad_norm,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)

    @staticmethod
    def _check_options(options: dict) -> None:
        check_lr(options["lr"], allow_tensor=True)
        check_hyperparameter("eps", options["eps"], 0.0, torch_text="Invalid epsilon value")
        check_betas(options["betas"])
        check_weight_decay(options["weight_decay"])

    def _state_spec(self, group: dict, p: torch.Tensor) -> dict:
        spec = {"exp_avg": p.shape, "exp_avg_sq": p.shape, "step": ()}
        if group["amsgrad"]:
            spec["max_exp_avg_sq"] = p.shape
        return spec

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None),
                               ("capturable", False), ("differentiable", False), ("fused", None),
                               ("decoupled_weight_decay", False)):
                group.setdefault(key, value)

    def _build_lists(self, group: dict) -> list:
        """_build_state_lists with the op's list order: [params, exp_avgs, exp_avg_sqs,
        max_exp_avg_sqs (empty unless amsgrad), steps]."""
        if group["amsgrad"]:
            # Also when amsgrad is switched on mid-training (torch.optim raises KeyError there).
            return self._build_state_lists(group, _STATE_KEYS)
        return [(key, index, [*lists[:3], ([], None), lists[3]])
                for key, index, lists in self._build_state_lists(group, _STATE_KEYS[:2])]

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = closure_loss(closure)
        calls = self._collect_calls(self._build_lists, lambda g: (g["amsgrad"], g.get("state_dtype")), clip=True)
        amp_cache: dict = {}
        for group, (device, _, _), grads, lists, clip_coef, writes in calls:
            params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
            grad_scale, found_inf = self._amp_tensors(device, amp_cache)
            beta1, beta2 = map(scalar, group["betas"])
            ops.fused_adam_(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, **writes,
            )
        return loss


class AdamW(Adam):
    r"""AdamW (decoupled weight decay) with a fused multi-tensor kernel; a drop-in replacement for
    :class:`torch.optim.AdamW`. The update is :class:`Adam`'s with ``decoupled_weight_decay=True``:
    :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam step, and the default
    ``weight_decay`` is 1e-2 as in torch."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        bf16_stochastic_round: bool = False,
        kahan_sum: bool = False,
        seed: int | None = None,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, state_dtype=state_dtype, max_grad_norm=max_grad_norm,
            bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
