"""Fused Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer"), the
update of the authors' SophiaG, with the GNB and Hutchinson Hessian-diagonal estimators."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from dldna_fused import ops
from dldna_fused._closure import closure_loss
from dldna_fused.optim._fused import (FusedOptimizer, check_betas, check_hyperparameter, check_lr,
                                     check_weight_decay, scalar)

ESTIMATORS = ("gnb", "hutchinson")


def gnb_loss(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The Gauss-Newton-Bartlett loss: cross-entropy of ``logits`` against labels sampled from the
    model's own softmax (no gradient flows through the sampling). ``loss.backward()`` then leaves in
    each ``p.grad`` the gradient whose square :meth:`Sophia.update_hessian` (``estimator="gnb"``)
    uses as the Hessian-diagonal estimate. ``logits`` are (batch, classes) or (..., classes)."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(F.softmax(flat.float(), dim=-1), 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)


class Sophia(FusedOptimizer):
    r"""SophiaG with fused multi-tensor kernels on the CPU and on CUDA: momentum divided by a
    Hessian-diagonal estimate, clipped per coordinate. Per parameter, with gradient :math:`g_t`
    (divided by GradScaler's scale when one is in use):

    .. math::
        \begin{aligned}
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \gamma\,\operatorname{sign}(m_t)
            \min\Big(\frac{|m_t|}{\rho\, b\, h + 10^{-15}},\ 1\Big)
        \end{aligned}

    and, every ``k`` steps, via :meth:`update_hessian`,
    :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h` with :math:`\hat h = g \odot g` from the
    GNB loss (``estimator="gnb"``, see :func:`gnb_loss`) or :math:`\hat h = z \odot (Hz)` with
    Rademacher :math:`z` (``estimator="hutchinson"``, after ``loss.backward(create_graph=True)``).
    :math:`h` starts at 0 and has no bias correction, so until the first update every step is a
    sign step. :math:`b` is ``bs``, the number of examples (tokens) behind the GNB estimate.

    A training loop::

        loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        if opt.should_update_hessian():
            gnb_loss(model(x)).backward(); opt.update_hessian(); opt.zero_grad()

    Tune ``rho`` by :attr:`win_rate`, the fraction of coordinates not clipped at the last step; the
    authors keep it within 0.1-0.5.

    Args:
        params: iterable of parameters or param groups.
        lr: :math:`\gamma` (default 1e-4). betas: :math:`(\beta_1, \beta_2)` (default (0.965, 0.99)).
        rho: clip scale :math:`\rho` (default 0.04). weight_decay: :math:`\lambda` (default 0.1).
        k: the advised number of steps between Hessian updates (see :meth:`should_update_hessian`).
        estimator: ``"gnb"`` or ``"hutchinson"``. bs: :math:`b` (default 1); ``step(bs=...)``
            overrides it for one step.
        maximize: ascend the objective. seed: seeds the Rademacher draws of the Hutchinson
            estimator: the draws on the i-th device the params live on (in param order) use
            ``seed + i``, so two devices never draw the same signs, and DDP ranks (one device
            each) draw alike. state_dtype: ``torch.float32`` keeps fp32 states for bf16/fp16 params.
        max_grad_norm: clip the global 2-norm of the gradients inside the step (see
            :class:`dldna_fused.optim.Adam`); it clips the gradient that enters the momentum
            :math:`m`, not the Hessian estimates of :meth:`update_hessian`.
        bf16_stochastic_round, kahan_sum: how bf16 params are written (see
            :class:`dldna_fused.optim.Adam`); stochastic rounding draws its bits from ``seed``
            too (default: ``torch.initial_seed()``).

    State per parameter: ``step``, ``exp_avg`` and ``hessian``.
    """

    _state_keys = ("exp_avg", "hessian")

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, *, k: int = 10, estimator: str = "gnb",
                 bs: float = 1, maximize: bool = False, seed: int | None = None,
                 state_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
                 bf16_stochastic_round: bool = False, kahan_sum: bool = False):
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, k=k,
                        estimator=estimator, bs=bs, maximize=maximize)
        super().__init__(params, defaults, foreach=None, differentiable=False, fused=None,
                         state_dtype=state_dtype, max_grad_norm=max_grad_norm,
                         bf16_stochastic_round=bf16_stochastic_round, kahan_sum=kahan_sum, seed=seed)
        self._seed = seed
        self._generators: dict = {}  # device -> torch.Generator on it (see _generator)
        self._steps_since_hessian = 0
        self._pending_found_inf: list = []  # GradScaler's found_inf of steps counted above
        self._win_records: list = []  # see win_rate

    @staticmethod
    def _check_options(options: dict) -> None:
        check_lr(options["lr"], allow_tensor=True)
        check_betas(options["betas"])
        check_hyperparameter("rho", options["rho"], 0.0)
        check_weight_decay(options["weight_decay"])
        k = options["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if options["estimator"] not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {options['estimator']!r}")
        check_hyperparameter("bs", options["bs"], 0.0, low_open=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_generator", None)  # a CPU generator pickled by an older version
        self.__dict__.setdefault("_seed", None)
        self.__dict__.setdefault("_generators", {})
        self.__dict__.setdefault("_steps_since_hessian", 0)
        self.__dict__.setdefault("_pending_found_inf", [])
        self.__dict__.pop("_unclipped", None)  # the win_rate record of an older version
        self.__dict__.setdefault("_win_records", [])

    def _hessian_cadence(self) -> int:
        """Steps applied since the last Hessian update: steps GradScaler skipped (found_inf) do not
        count, as they change nothing. Reads their found_inf flags (a sync on CUDA) only here."""
        if self._pending_found_inf:
            skipped = sum(int(f.item() != 0) for f in self._pending_found_inf)
            self._steps_since_hessian -= skipped
            self._pending_found_inf = []
        return self._steps_since_hessian

    # [Note: Sophia's cadence in checkpoints]
    # The count of steps since the last Hessian update travels in the state_dict, in every param
    # group's entry "steps_since_hessian", so a reloaded run updates the Hessian when the original
    # would have. Groups are the one part of a state_dict that torch.distributed.checkpoint keeps
    # besides the states; the key is taken out again on load, so live param_groups never hold it.
    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        count = self._hessian_cadence()
        for group in state_dict["param_groups"]:
            group["steps_since_hessian"] = count
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`FusedOptimizer.load_state_dict`, and restores the Hessian cadence (see
        [Note: Sophia's cadence in checkpoints]); a state_dict without it keeps the current one."""
        groups = [dict(group) for group in state_dict["param_groups"]]
        counts = [group.pop("steps_since_hessian", None) for group in groups]
        super().load_state_dict({**state_dict, "param_groups": groups})
        if counts and counts[0] is not None:
            self._steps_since_hessian = int(counts[0])
            self._pending_found_inf = []

    def _lists(self, group: dict) -> list:
        return self._build_state_lists(group, self._state_keys)

    @torch.no_grad()
    def step(self, closure=None, bs: float | None = None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss;
        ``bs`` overrides the groups' ``bs`` for this step."""
        if bs is not None and not bs > 0:
            raise ValueError(f"bs must be > 0, got {bs}")
        loss = closure_loss(closure)
        calls = self._collect_calls(self._lists, lambda g: (g.get("state_dtype"),), clip=True)
        amp_cache: dict = {}
        unclipped = []
        for group, (device, _, _), grads, (params, exp_avgs, hessians, steps), clip_coef, writes in calls:
            grad_scale, found_inf = self._amp_tensors(device, amp_cache)
            count = torch.zeros(1, dtype=torch.int64, device=device)
            ops.fused_sophia_(params, grads, exp_avgs, hessians, steps, lr=scalar(group["lr"]),
                              beta1=scalar(group["betas"][0]), rho=group["rho"],
                              bs=float(bs if bs is not None else group["bs"]),
                              weight_decay=group["weight_decay"], maximize=group["maximize"],
                              grad_scale=grad_scale, found_inf=found_inf, unclipped=count, clip_coef=clip_coef,
                              **writes)
            unclipped.append((count, sum(p.numel() for p in ops.as_list(params))))
        if not calls:
            # No param had a grad: nothing was applied, so neither the cadence nor win_rate moves.
            return loss
        # A step counts towards the cadence when it applies an update, as in the reference: one
        # GradScaler skips is taken off when the cadence is next read (no host sync here).
        self._steps_since_hessian += 1
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            self._pending_found_inf.append(found_inf)
            self._win_records.append((unclipped, found_inf))
            if len(self._win_records) > self._MAX_WIN_RECORDS:  # read the flags once, keep one record
                applied = self._applied_record()
                self._win_records = [] if applied is None else [applied]
        else:
            self._win_records = [(unclipped, None)]
        self._warn_if_hessian_is_never_updated()
        return loss

    # Steps without a Hessian update, in units of k, after which Sophia says so (once).
    _HESSIAN_WARNING_PERIODS = 10

    def _warn_if_hessian_is_never_updated(self) -> None:
        """A loop that never calls update_hessian (Hugging Face's Trainer, Lightning's automatic
        optimization) runs Sophia as a sign-momentum method with h = 0, silently; say so once."""
        k = min(g["k"] for g in self.param_groups)
        if self.__dict__.get("_hessian_warned") or self._steps_since_hessian < self._HESSIAN_WARNING_PERIODS * k:
            return
        self._hessian_warned = True
        warnings.warn(
            f"Sophia has taken {self._steps_since_hessian} steps without a Hessian update (k={k}): every step is "
            "then a clipped sign step and win_rate stays 0. Call update_hessian() when should_update_hessian() "
            "is true, or in a Trainer/Lightning loop use dldna_fused.integrations (SophiaHessianCallback).",
            stacklevel=3)

    # Steps GradScaler may have skipped whose records win_rate keeps before it reads their flags.
    _MAX_WIN_RECORDS = 16

    def _applied_record(self):
        """The newest record in _win_records of a step that was applied (found_inf 0), or None."""
        for record in reversed(self._win_records):
            found_inf = record[1]
            if found_inf is None or not bool(found_inf.item()):
                return record
        return None

    @property
    def win_rate(self) -> float | None:
        """The fraction of the coordinates updated at the last applied step whose ratio
        :math:`|m| / (\\rho b h + 10^{-15})` was below 1 (not clipped), over every group; 0.0
        when that step's params had no elements. A step that applies nothing (no param had a
        grad, or GradScaler skipped it) leaves it as it was; None before the first applied step.
        The same definition as ``dldna_fused.reference.Sophia.win_rate``. Reading it
        synchronizes with the device."""
        record = self._applied_record()
        if record is None:
            return None
        unclipped = record[0]
        total = sum(n for _, n in unclipped)
        return sum(int(c.item()) for c, _ in unclipped) / total if total else 0.0

    def should_update_hessian(self) -> bool:
        """True once ``k`` steps have passed since the last :meth:`update_hessian` (or since the
        start): the authors' cadence."""
        return self._hessian_cadence() >= min(g["k"] for g in self.param_groups)

    @torch.no_grad()
    def update_hessian(self, scaler: torch.amp.GradScaler | None = None) -> None:
        r"""Folds a Hessian-diagonal estimate into ``hessian`` for every param with a grad.

        ``estimator="gnb"``: the grads must come from :func:`gnb_loss` (the estimate is
        :math:`g \odot g`). ``estimator="hutchinson"``: the grads must carry a graph
        (``loss.backward(create_graph=True)``); a Hessian-vector product with Rademacher :math:`z`
        gives :math:`z \odot (Hz)`.

        ``scaler``: the GradScaler whose scaled loss produced the grads. Its current scale is
        divided out (the grads are unscaled in place), and when any grad is inf/nan the hessians
        are left untouched. The scaler's scale is not changed by this call.
        """
        calls = self._collect_calls(self._lists, lambda g: (g.get("state_dtype"),))
        for group, (device, _, _), grads, (params, _, hessians, _), _, _ in calls:
            found_inf = None
            if scaler is not None and scaler.is_enabled():
                found_inf = torch.zeros(1, dtype=torch.float32, device=device)
                inv_scale = _inverse_scale(scaler, device)
                if group["estimator"] == "gnb":
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
                else:
                    # Out of place: the graph through the grads is needed for the Hessian-vector product.
                    with torch.enable_grad():
                        grads = [g * inv_scale for g in grads]
                    finite = torch.stack([torch.isfinite(g.detach()).all() for g in grads]).all()
                    found_inf = torch.logical_not(finite).float().reshape(1)
            if group["estimator"] == "gnb":
                estimates, square = grads, True
            else:
                estimates, square = self._hutchinson(ops.as_list(params), grads), False
            ops.fused_sophia_hessian_(hessians, estimates, beta2=scalar(group["betas"][1]), square=square,
                                      found_inf=found_inf)
        self._steps_since_hessian = 0
        self._pending_found_inf = []

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator of ``device`` (None without a seed: torch's default one): seeded
        with ``seed + i`` for the i-th device the params live on, in param order. One seed for
        every device would give params at the same draw position on two devices the same signs,
        which correlates their estimates; the device's position, not its index, keeps DDP ranks
        (each holding one device, cuda:rank) drawing alike."""
        if self._seed is None:
            return None
        if device not in self._generators:
            devices = list(dict.fromkeys(p.device for g in self.param_groups for p in g["params"]))
            position = devices.index(device) if device in devices else len(devices)
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed + position)
        return self._generators[device]

    def _hutchinson(self, params: list, grads: list) -> list:
        if any(g.grad_fn is None for g in grads):
            raise RuntimeError("Sophia(estimator='hutchinson').update_hessian() needs grads with a graph: "
                               "call loss.backward(create_graph=True) first")
        # Drawn on each param's device, so no random signs cross the bus.
        zs = [torch.randint(0, 2, p.shape, generator=self._generator(p.device), device=p.device, dtype=p.dtype) * 2 - 1
              for p in params]
        with torch.enable_grad():
            hvps = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=False, allow_unused=True)
        return [z * (hz if hz is not None else torch.zeros_like(z)) for z, hz in zip(zs, hvps)]


def _inverse_scale(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """1 / the scaler's current scale as a float32 tensor on ``device``, computed where the scale
    lives (as GradScaler.unscale_ does), so that no value is read back to the host."""
    scale = scaler._get_scale_async()
    if scale is None:  # before the scaler's first scale(): its initial scale, a Python float
        return torch.full((1,), 1.0 / scaler.get_scale(), dtype=torch.float32, device=device)
    return scale.double().reciprocal().float().reshape(1).to(device)
