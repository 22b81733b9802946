"""AdaFactor as a plain per-tensor loop (Shazeer & Stern 2018, in the transformers/fairseq form).

The ground truth of the parity tests and the version to read; same constructor and state layout
as dldna_fused.optim.Adafactor.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from dldna_fused._checks import check_hyperparameter, check_lr, check_weight_decay, scalar
from dldna_fused._closure import closure_loss
from dldna_fused._rounding import add_write_options, read_param, store_param


def check_adafactor_options(lr, eps, clip_threshold, decay_rate, beta1, weight_decay, relative_step,
                            warmup_init, *, construction: bool = True) -> None:
    """Raise ValueError for the argument combinations transformers' Adafactor rejects, and
    TypeError/ValueError for values outside their domains (NaN included). With
    ``construction=False`` (a group's options at a step) an lr next to ``relative_step=True`` is
    allowed, since the step ignores it: torch.distributed.checkpoint, for one, sets every group's
    lr to 0 for a step that creates the states."""
    if lr is not None and relative_step and construction:
        raise ValueError("Cannot combine manual `lr` and `relative_step=True` options "
                         "(pass lr=None, or relative_step=False)")
    if lr is None and not relative_step:
        raise ValueError("`relative_step=False` requires a manual `lr`, got lr=None")
    if warmup_init and not relative_step:
        raise ValueError("`warmup_init=True` requires `relative_step=True`")
    if lr is not None:
        check_lr(lr, allow_tensor=True)
    if isinstance(eps, (str, bytes)) or not hasattr(eps, "__len__") or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2) of numbers >= 0, got {eps!r}")
    check_hyperparameter("eps[0]", eps[0], 0.0)
    check_hyperparameter("eps[1]", eps[1], 0.0)
    check_hyperparameter("clip_threshold", clip_threshold, 0.0, low_open=True)
    # beta2_t = 1 - t**decay_rate must stay in [0, 1).
    check_hyperparameter("decay_rate", decay_rate, -math.inf, 0.0, high_open=False)
    if beta1 is not None:
        check_hyperparameter("beta1", beta1, 0.0, 1.0)
    check_weight_decay(weight_decay)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / math.sqrt(x.numel())


class Adafactor(Optimizer):
    r"""AdaFactor, transformers/fairseq semantics; the math runs in fp32 (fp64 for fp64 params).

    Per parameter, at step :math:`t` with gradient :math:`g` and :math:`G = g^2 + \epsilon_1`:
    :math:`\rho_t = \min(10^{-6}t \text{ (warmup) or } 10^{-2}, 1/\sqrt{t})` (or lr),
    :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta))\rho_t` (scale_parameter),
    :math:`\hat\beta_{2t} = 1 - t^{c}`; factored params keep row and column EMAs :math:`R, C` of
    :math:`G`'s means and use :math:`U = g / \sqrt{R C / \mathrm{mean}(R)}`, others an EMA :math:`V`
    and :math:`U = g/\sqrt{V}`; then :math:`U \leftarrow \alpha_t U / \max(1, \mathrm{RMS}(U)/d)`,
    optional momentum, :math:`\theta \leftarrow \theta - \lambda\alpha_t\theta - U`.
    """

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
                 warmup_init=False, *, bf16_stochastic_round=False, kahan_sum=False, seed=None):
        check_adafactor_options(lr, eps, clip_threshold, decay_rate, beta1, weight_decay, relative_step,
                                warmup_init)
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init)
        add_write_options(defaults, bf16_stochastic_round, kahan_sum, seed)
        super().__init__(params, defaults)

    @staticmethod
    def _init_state(state: dict, p: torch.Tensor, group: dict) -> None:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["RMS"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=dtype, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=dtype, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group_index, group in enumerate(self.param_groups):
            eps1, eps2 = group["eps"]
            beta1 = group["beta1"]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(state, p, group)
                if beta1 is not None and "exp_avg" not in state:
                    # beta1 switched on mid-run: the first moment starts now, at 0.
                    state["exp_avg"] = torch.zeros_like(p, dtype=state["RMS"].dtype)
                state["step"] += 1
                t = state["step"].item()
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                theta = read_param(state, group, p, dtype)  # (creates a kahan_comp, empty or not)
                if p.numel() == 0:
                    continue  # nothing to scale; RMS of nothing stays 0
                g = p.grad.to(dtype)

                rms = _rms(theta)
                state["RMS"].copy_(rms)
                rho = group["lr"] if group["relative_step"] else scalar(group["lr"])
                if group["relative_step"]:
                    rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
                alpha = max(eps2, rms.item()) * rho if group["scale_parameter"] else rho
                beta2t = 1.0 - t ** group["decay_rate"]

                g2 = g * g + eps1
                if p.dim() >= 2:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(g2.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(g2.mean(dim=-2), alpha=1.0 - beta2t)
                    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    c_factor = col.unsqueeze(-2).rsqrt()
                    update = (r_factor * c_factor) * g
                else:
                    sq = state["exp_avg_sq"]
                    sq.mul_(beta2t).add_(g2, alpha=1.0 - beta2t)
                    update = sq.rsqrt() * g
                # The clip only shrinks: divide by max(1, RMS(U) / d).
                update = update / (_rms(update) / group["clip_threshold"]).clamp(min=1.0)
                update = update * alpha
                if beta1 is not None:
                    m = state["exp_avg"]
                    m.mul_(beta1).add_(update, alpha=1.0 - beta1)
                    update = m
                if group["weight_decay"] != 0.0:
                    theta.add_(theta, alpha=-group["weight_decay"] * alpha)
                theta.sub_(update)
                store_param(state, group, p, theta, group_index, position)
        return loss
