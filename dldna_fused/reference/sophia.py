"""SophiaG as a plain per-tensor loop of the authors' update (Liu et al. 2023), with both
Hessian-diagonal estimators.

The ground truth of the parity tests and the version to read; same constructor, methods and state
layout as dldna_fused.optim.Sophia.
"""

from __future__ import annotations

import torch

from dldna_fused._closure import closure_loss
from dldna_fused._rounding import add_write_options, read_param, store_param
from dldna_fused.reference._state_dtype import StateDtypeLoading


class Sophia(StateDtypeLoading):
    r"""SophiaG: :math:`\theta \leftarrow \theta(1-\gamma\lambda)`,
    :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
    :math:`\theta \leftarrow \theta - \gamma\,\mathrm{sign}(m)\min(|m| / (\rho b h + 10^{-15}), 1)`;
    :meth:`update_hessian` folds :math:`g \odot g` (GNB) or :math:`z \odot Hz` (Hutchinson) into
    :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h`. The math runs in the states' dtype."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, *, k=10,
                 estimator="gnb", bs=1, maximize=False, seed=None, state_dtype=None,
                 bf16_stochastic_round=False, kahan_sum=False):
        if lr < 0.0 or rho < 0.0 or weight_decay < 0.0 or not bs > 0:
            raise ValueError("lr, rho and weight_decay must be >= 0 and bs > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if estimator not in ("gnb", "hutchinson"):
            raise ValueError(f"estimator must be 'gnb' or 'hutchinson', got {estimator!r}")
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, k=k,
                        estimator=estimator, bs=bs, maximize=maximize)
        if state_dtype is not None:
            defaults["state_dtype"] = state_dtype
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
        super().__init__(params, defaults)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.steps_since_hessian = 0
        self.win_rate = None

    def _state(self, group, p):
        state = self.state[p]
        if len(state) == 0:
            dtype = group.get("state_dtype") or p.dtype
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["hessian"] = torch.zeros_like(p, dtype=dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None, bs=None):
        loss = closure_loss(closure)
        unclipped, total, applied = 0, 0, False
        for group_index, group in enumerate(self.param_groups):
            lr, wd, rho = group["lr"], group["weight_decay"], group["rho"]
            beta1 = group["betas"][0]
            b = bs if bs is not None else group["bs"]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                applied = True
                state = self._state(group, p)
                state["step"] += 1
                m, h = state["exp_avg"], state["hessian"]
                g = p.grad.to(m.dtype)
                if group["maximize"]:
                    g = -g
                theta = read_param(state, group, p, m.dtype) * (1 - lr * wd)
                m.mul_(beta1).add_(g * (1 - beta1))
                ratio = (m.abs() / (rho * b * h + 1e-15)).clamp(max=1)
                theta = theta - lr * m.sign() * ratio
                store_param(state, group, p, theta, group_index, position)
                unclipped += int((ratio < 1).sum())
                total += ratio.numel()
        # A step that applies nothing (no param has a grad) counts for neither; win_rate is the
        # unclipped fraction of the last applied step (0.0 when its params have no elements).
        if applied:
            self.win_rate = unclipped / total if total else 0.0
            self.steps_since_hessian += 1
        return loss

    def should_update_hessian(self):
        return self.steps_since_hessian >= min(g["k"] for g in self.param_groups)

    @torch.no_grad()
    def update_hessian(self):
        for group in self.param_groups:
            beta2 = group["betas"][1]
            params = [p for p in group["params"] if p.grad is not None]
            if group["estimator"] == "gnb":
                estimates = [p.grad * p.grad for p in params]
            else:
                zs = [torch.randint(0, 2, p.shape, generator=self.generator).to(p.device, p.dtype) * 2 - 1
                      for p in params]
                with torch.enable_grad():
                    hvps = torch.autograd.grad([p.grad for p in params], params, grad_outputs=zs)
                estimates = [z * hz for z, hz in zip(zs, hvps)]
            for p, e in zip(params, estimates):
                h = self._state(group, p)["hessian"]
                h.mul_(beta2).add_(e.to(h.dtype) * (1 - beta2))
        self.steps_since_hessian = 0
