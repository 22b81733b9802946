"""Pure-PyTorch ``torch._foreach_*`` versions of Lion and SophiaG: the fastest way to run them
without a fused kernel, used as baselines by ``dldna-fused bench``. They take the arguments of
dldna_fused.optim.Lion/Sophia (states in the params' dtype) and follow the same update rules."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def _lists(opt: Optimizer, group: dict, keys: tuple[str, ...]):
    params, grads, states = [], [], [[] for _ in keys]
    for p in group["params"]:
        if p.grad is None:
            continue
        state = opt.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in keys:
                state[key] = torch.zeros_like(p)
        params.append(p)
        grads.append(p.grad)
        for lst, key in zip(states, keys):
            lst.append(state[key])
    return params, grads, states


class ForeachLion(Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, grads, (exp_avgs,) = _lists(self, group, ("exp_avg",))
            if not params:
                continue
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            torch._foreach_mul_(params, 1 - lr * wd)
            update = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(update, grads, alpha=1 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_mul_(exp_avgs, beta2)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


class ForeachSophia(Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, *, bs=1):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, grads, (exp_avgs, hessians) = _lists(self, group, ("exp_avg", "hessian"))
            if not params:
                continue
            lr, beta1, wd = group["lr"], group["betas"][0], group["weight_decay"]
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
            denom = torch._foreach_mul(hessians, group["rho"] * group["bs"])
            torch._foreach_add_(denom, 1e-15)
            ratio = torch._foreach_abs(exp_avgs)
            torch._foreach_div_(ratio, denom)
            torch._foreach_clamp_max_(ratio, 1.0)
            torch._foreach_mul_(ratio, torch._foreach_sign(exp_avgs))
            torch._foreach_add_(params, ratio, alpha=-lr)


class ClipThenStep:
    """``clip(params, max_norm)`` and then ``optimizer.step()``: a training loop's clip-and-step pair,
    timed as one step by ``dldna-fused bench --clip``. Without an optimizer, the clip alone."""

    def __init__(self, params, clip, max_norm: float, optimizer: Optimizer | None = None):
        self.params = list(params)
        self.clip = clip
        self.max_norm = max_norm
        self.optimizer = optimizer

    @property
    def state(self) -> dict:
        return self.optimizer.state if self.optimizer is not None else {}

    def step(self) -> None:
        self.clip(self.params, self.max_norm)
        if self.optimizer is not None:
            self.optimizer.step()
