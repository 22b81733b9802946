"""Fused Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

import torch

from dldna_fused import ops
from dldna_fused._closure import closure_loss
from dldna_fused.optim._fused import FusedOptimizer, check_betas, check_lr, check_weight_decay, scalar


class Lion(FusedOptimizer):
    r"""Lion with a fused multi-tensor kernel on the CPU and on CUDA: the sign of an interpolated
    momentum, one state tensor per parameter. Per parameter, with gradient :math:`g_t` (divided by
    GradScaler's scale when one is in use):

    .. math::
        \begin{aligned}
        g_t &\leftarrow -g_t \quad \text{if maximize} \\
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        \theta_t &= \theta_{t-1} - \gamma\, \operatorname{sign}\big(\beta_1 m_{t-1} + (1-\beta_1) g_t\big) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t
        \end{aligned}

    with :math:`\operatorname{sign}(0) = \operatorname{sign}(\mathrm{NaN}) = 0`, as ``torch.sign``
    computes it: a NaN gradient leaves its coordinates where weight decay puts them (and makes
    their momentum NaN, so they stay there), as in the reference and lion-pytorch. Weight decay
    is decoupled and scaled by lr, as in the authors' code. Because every coordinate moves by
    exactly lr, Lion wants a 3-10x smaller lr than AdamW and a correspondingly larger weight_decay.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate :math:`\gamma` (default 1e-4).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.99)).
        weight_decay: :math:`\lambda` (default 0).
        maximize: ascend the objective.
        state_dtype: ``None`` keeps ``exp_avg`` in the params' dtype; ``torch.float32`` keeps it
            in fp32 for bf16/fp16 params.
        max_grad_norm: clip the global 2-norm of the gradients inside the step (see
            :class:`dldna_fused.optim.Adam`).
        bf16_stochastic_round, kahan_sum, seed: how bf16 params are written (see
            :class:`dldna_fused.optim.Adam`).

    State per parameter: ``step`` (float32 0-dim tensor) and ``exp_avg``.
    """

    _state_keys = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
                 bf16_stochastic_round: bool = False, kahan_sum: bool = False, seed: int | None = None):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, foreach=None, differentiable=False, fused=None,
                         state_dtype=state_dtype, max_grad_norm=max_grad_norm,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)

    @staticmethod
    def _check_options(options: dict) -> None:
        # The kernel takes lr as a float: a one-element CPU tensor (e.g. from a scheduler) is read.
        check_lr(options["lr"], allow_tensor=True)
        check_betas(options["betas"])
        check_weight_decay(options["weight_decay"])

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = closure_loss(closure)
        calls = self._collect_calls(lambda g: self._build_state_lists(g, self._state_keys),
                                    lambda g: (g.get("state_dtype"),), clip=True)
        amp_cache: dict = {}
        for group, (device, _, _), grads, (params, exp_avgs, steps), clip_coef, writes in calls:
            grad_scale, found_inf = self._amp_tensors(device, amp_cache)
            beta1, beta2 = map(scalar, group["betas"])
            ops.fused_lion_(params, grads, exp_avgs, steps, lr=scalar(group["lr"]), beta1=beta1,
                            beta2=beta2, weight_decay=group["weight_decay"], maximize=group["maximize"],
                            grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, **writes)
        return loss
