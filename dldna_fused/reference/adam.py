"""Adam and AdamW as plain per-tensor loops of the textbook formula.

Boring on purpose: no fusion, no fast paths, one line per equation. These are the ground truth of
the parity tests and the versions to read. They take the constructor arguments of
dldna_fused.optim.Adam/AdamW and keep the same state layout.
"""

from __future__ import annotations

import math

import torch

from dldna_fused._closure import closure_loss
from dldna_fused._rounding import add_write_options, read_param, store_param
from dldna_fused.reference._state_dtype import StateDtypeLoading


class Adam(StateDtypeLoading):
    r"""Adam (``decoupled_weight_decay=False``, L2 added to the gradient) or AdamW.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}
                   \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` under amsgrad. The math runs in the states'
    dtype (the param's, or ``state_dtype``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, state_dtype=None, beta1=None, beta2=None,
                 bf16_stochastic_round=False, kahan_sum=False, seed=None):
        # The chapter's keywords: Adam(params, lr=..., beta1=0.9, beta2=0.999, eps=...).
        betas = (betas[0] if beta1 is None else beta1, betas[1] if beta2 is None else beta2)
        if float(lr) < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        if state_dtype is not None:
            defaults["state_dtype"] = state_dtype
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group_index, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            wd = group["weight_decay"]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                dtype = group.get("state_dtype") or p.dtype
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                t = state["step"].item()

                theta = read_param(state, group, p, dtype)
                g = p.grad.to(dtype)
                if group["maximize"]:
                    g = -g
                if wd != 0:
                    if group["decoupled_weight_decay"]:
                        theta = theta * (1 - lr * wd)
                    else:
                        g = g + wd * theta
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_((1 - beta1) * g)
                v.mul_(beta2).add_((1 - beta2) * g * g)
                v_hat = v
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                    v_hat = state["max_exp_avg_sq"]
                bias_correction1 = 1 - beta1**t
                bias_correction2 = 1 - beta2**t
                denom = v_hat.sqrt() / math.sqrt(bias_correction2) + group["eps"]
                theta = theta - (lr / bias_correction1) * m / denom
                store_param(state, group, p, theta, group_index, position)
        return loss



class AdamW(Adam):
    """Adam with decoupled weight decay (default 1e-2), as torch.optim.AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 state_dtype=None, beta1=None, beta2=None, bf16_stochastic_round=False, kahan_sum=False, seed=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, state_dtype=state_dtype, beta1=beta1, beta2=beta2,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)
