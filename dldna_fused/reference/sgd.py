"""SGD with momentum, dampening and Nesterov, as a plain loop with torch.optim.SGD's semantics."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from dldna_fused._closure import closure_loss


class SGD(Optimizer):
    r"""SGD as ``torch.optim.SGD`` defines it. Per parameter, with gradient :math:`g_t`:

    .. math::
        \begin{aligned}
        g_t &\leftarrow -g_t \text{ if maximize};\quad g_t \leftarrow g_t + \lambda\theta_{t-1} \\
        b_t &= \begin{cases} g_t & t = 1 \\ \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases},
        \qquad g_t \leftarrow g_t + \mu b_t \text{ (nesterov) or } b_t \quad (\mu \ne 0) \\
        \theta_t &= \theta_{t-1} - \gamma g_t
        \end{aligned}

    with momentum :math:`\mu`, dampening :math:`\tau` and L2 weight decay :math:`\lambda`. The
    chapter's own SGD uses ``dampening = momentum`` (its buffer is an exponential moving average of
    the gradients, ``b = mu b + (1 - mu) g``); pass ``chapter_momentum=True`` (which sets
    ``dampening = momentum``) to reproduce it. The default, ``dampening=0``, is torch's
    heavy-ball momentum.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, chapter_momentum=False):
        if chapter_momentum:
            if dampening not in (0.0, momentum):
                raise ValueError(f"chapter_momentum=True sets dampening = momentum; got dampening={dampening}")
            dampening = momentum
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if momentum < 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            mu, tau = group["momentum"], group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad.clone()
                if group["weight_decay"] != 0:
                    g = g + group["weight_decay"] * p
                if mu != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(mu).add_(g, alpha=1 - tau)
                    buf = state["momentum_buffer"]
                    g = g + mu * buf if group["nesterov"] else buf
                p.add_(g, alpha=-group["lr"])
        return loss
