"""Fused Adam and AdamW: drop-in replacements for torch.optim.Adam / torch.optim.AdamW."""

from __future__ import annotations

import torch

from dldna_fused import ops
from dldna_fused.optim._fused import FusedOptimizer, check_hyperparameter

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
    """

    _state_keys = _STATE_KEYS

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
    ):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a Tensor must have one element, got {lr.numel()}")
        check_hyperparameter("lr", lr, 0.0)
        check_hyperparameter("eps", eps, 0.0)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_hyperparameter("betas[0]", betas[0], 0.0, 1.0)
        check_hyperparameter("betas[1]", betas[1], 0.0, 1.0)
        check_hyperparameter("weight_decay", weight_decay, 0.0)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, foreach=foreach, differentiable=differentiable, fused=fused,
                         state_dtype=state_dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None),
                               ("capturable", False), ("differentiable", False), ("fused", None),
                               ("decoupled_weight_decay", False)):
                group.setdefault(key, value)

    def _build_lists(self, group: dict) -> list:
        """[((device, dtype), index, [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps])]
        for the params of ``group`` that have a grad, creating missing state; ``index`` lists the
        positions in group["params"] of each bucket's params (None: all of them, in order)."""
        amsgrad = group["amsgrad"]
        with_grad = [p for p in group["params"] if p.grad is not None]
        self._init_state(group, [p for p in with_grad if len(self.state[p]) == 0], ("exp_avg", "exp_avg_sq"))
        if amsgrad:
            # Also when amsgrad is switched on mid-training (torch.optim raises KeyError there).
            self._init_state(group, [p for p in with_grad if "max_exp_avg_sq" not in self.state[p]],
                             ("max_exp_avg_sq",), step=False)
        buckets: dict = {}
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            key = (p.device, p.dtype)
            if key not in buckets:
                buckets[key] = ([], ([], [], [], [], []))
            index, lists = buckets[key]
            index.append(i)
            lists[0].append(p)
            lists[1].append(state["exp_avg"])
            lists[2].append(state["exp_avg_sq"])
            if amsgrad:
                lists[3].append(state["max_exp_avg_sq"])
            lists[4].append(state["step"])
        everything = list(range(len(group["params"])))
        return [(key, None if index == everything else index, lists) for key, (index, lists) in buckets.items()]

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Collect (and so check) every group before touching any tensor: an error leaves all
        # params as they were.
        calls = []
        for group in self.param_groups:
            grads, any_sparse, has_grad = ops.grads_of(group["params"])
            if any_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            for key, index, lists in self._cached_lists(group, has_grad, self._build_lists,
                                                         (group["amsgrad"], group.get("state_dtype"))):
                calls.append((group, key, grads if index is None else [grads[i] for i in index], lists))
        amp_cache: dict = {}
        for group, (device, _), grads, (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) in calls:
            grad_scale, found_inf = self._amp_tensors(device, amp_cache)
            beta1, beta2 = group["betas"]
            ops.fused_adam_(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                grad_scale=grad_scale, found_inf=found_inf,
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
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, state_dtype=state_dtype,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
