"""Lion as a plain per-tensor loop of the authors' update (Chen et al. 2023).

The ground truth of the parity tests and the version to read; same constructor and state layout
as dldna_fused.optim.Lion.
"""

from __future__ import annotations

import torch

from dldna_fused._closure import closure_loss
from dldna_fused._rounding import add_write_options, read_param, store_param
from dldna_fused.reference._state_dtype import StateDtypeLoading


class Lion(StateDtypeLoading):
    r"""Lion: :math:`\theta \leftarrow \theta(1-\gamma\lambda) - \gamma\,\mathrm{sign}(\beta_1 m +
    (1-\beta_1) g)`, then :math:`m \leftarrow \beta_2 m + (1-\beta_2) g`. The math runs in the
    state's dtype (the param's, or ``state_dtype``)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 state_dtype=None, bf16_stochastic_round=False, kahan_sum=False, seed=None):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        if state_dtype is not None:
            defaults["state_dtype"] = state_dtype
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group_index, group in enumerate(self.param_groups):
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                dtype = group.get("state_dtype") or p.dtype
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                m = state["exp_avg"]
                g = p.grad.to(dtype)
                if group["maximize"]:
                    g = -g
                theta = read_param(state, group, p, dtype) * (1 - lr * wd)
                update = (m * beta1 + g * (1 - beta1)).sign()
                theta = theta - lr * update
                m.mul_(beta2).add_(g * (1 - beta2))
                store_param(state, group, p, theta, group_index, position)
        return loss
