"""The optimizer step inside backward ("gradient release"): each bucket of params is stepped as soon
as its grads are final, and its grads are freed, so that a model's grads never all exist at once.
See :func:`step_in_backward`."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.optim import Optimizer

from dldna_fused._distributed import dtensor_type


class StepInBackward:
    """The handle :func:`step_in_backward` returns: :meth:`no_step` for the micro-batches of
    gradient accumulation, :meth:`remove` to go back to ``backward()`` then ``step()``, and
    ``steps`` (the optimizer calls made so far, for logging)."""

    def __init__(self, optimizer: Optimizer, params: list, bucket_bytes: int):
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self.steps = 0
        self._params = params
        self._pending: list = []  # params whose grad is final in this backward, not yet stepped
        self._pending_bytes = 0
        self._flush_task = None
        self._suspended = False
        owner = weakref.ref(self)

        def hook(p):
            handle = owner()
            if handle is not None:
                handle._arrived(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]
        # GradScaler cannot be seen from a backward hook (the loss it scaled is gone by then); its
        # step() after backward is refused here, on the first iteration.
        self._hooks.append(optimizer.register_step_pre_hook(_refuse_grad_scaler))

    @contextlib.contextmanager
    def no_step(self):
        """Backward passes inside only accumulate grads, as without this handle; the next backward
        outside steps with the accumulated grads. Like DDP's ``no_sync``."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def remove(self) -> None:
        """Removes the hooks: ``backward()`` leaves grads again and ``step()`` applies them."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _arrived(self, p: torch.Tensor) -> None:
        if self._suspended or p.grad is None:
            return
        task = torch._C._current_graph_task_id()
        if self._flush_task != task:
            # The params that are left when this backward is done step then, in one more call.
            # Keyed by the backward's id: a backward that raised never ran its callback.
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._flush_task = task
        self._pending.append(p)
        self._pending_bytes += p.numel() * p.element_size()
        if self._pending_bytes >= self.bucket_bytes:
            self._step_pending()

    def _flush(self) -> None:
        self._flush_task = None
        if self._pending:
            self._step_pending()

    def _step_pending(self) -> None:
        """One optimizer call: it steps exactly the params that hold a grad now, which are the
        pending ones (every earlier bucket's grads were freed, later ones have not arrived), as
        one fused call per (group, device, dtype); then their grads are freed."""
        _check_options(self.optimizer)  # a group changed since: refused before anything moves
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self.optimizer.step()
        self.steps += 1
        for p in pending:
            p.grad = None


def _check_options(optimizer: Optimizer) -> None:
    name = type(optimizer).__name__
    for index, group in enumerate(optimizer.param_groups):
        if group.get("max_grad_norm") is not None:
            raise ValueError(f"step_in_backward: {name} param group {index} has max_grad_norm: the global norm of "
                             "the grads is not known until backward ends, and each bucket steps before that. "
                             "Clip without stepping in backward")
    _refuse_grad_scaler(optimizer)


def _refuse_grad_scaler(optimizer: Optimizer, *_) -> None:
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        for name in ("grad_scale", "found_inf"):  # GradScaler removes them only after a step returns
            optimizer.__dict__.pop(name, None)
        raise RuntimeError("step_in_backward: GradScaler is stepping this optimizer, but its inf check and "
                           "unscaling come after backward, when the buckets have already stepped (the last "
                           "backward's updates used the scaled grads). Train without GradScaler (bf16), or remove "
                           "the handle")


def step_in_backward(model: torch.nn.Module, optimizer: Optimizer, *, bucket_bytes: int = 32 << 20) -> StepInBackward:
    r"""Moves ``optimizer``'s step into ``model``'s backward: each param's post-accumulate-grad hook
    marks its grad final, and once the final grads reach ``bucket_bytes`` (params in the order
    their grads arrive), one ``optimizer.step()`` applies them (one fused call per param group,
    device and dtype) and frees them. What is left when backward ends steps then. So a training
    step is just ``loss.backward()``, and at no time do all the grads exist: the grads' memory is
    about one bucket instead of the model's size.

    The update is the optimizer's own, for each param exactly the one ``backward()`` then
    ``step()`` would give: its state, ``param_groups``, ``state_dict`` and lr schedulers work as
    before (call ``scheduler.step()`` after ``backward()``; a leftover ``optimizer.step()`` or
    ``zero_grad()`` finds no grads and does nothing). For gradient accumulation run the
    micro-batches before the last one inside ``with handle.no_step():``.

    Refused, by name, because the step would come too early: ``max_grad_norm`` (the global norm
    is known only when backward ends), fp16 params and GradScaler (its inf check and unscaling
    come after backward; bf16 needs none: a ``scaler.step(optimizer)`` raises on the first
    iteration, after that backward's buckets stepped with scaled grads), DDP (its all-reduce has not landed when the
    hooks fire), FSDP2's DTensor params, and Sophia (it counts every call towards its Hessian
    cadence).

    Returns the :class:`StepInBackward` handle; ``handle.remove()`` restores the usual
    ``backward()`` then ``step()``.
    """
    from torch.nn.parallel import DistributedDataParallel

    from dldna_fused.optim.sophia import Sophia

    if isinstance(model, DistributedDataParallel):
        raise TypeError("step_in_backward: DDP's gradient all-reduce has not landed when a param's hook fires; "
                        "step after backward under DDP")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"step_in_backward: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, Sophia):
        raise TypeError("step_in_backward: Sophia counts every step() call towards its Hessian cadence and win_rate, "
                        "so several calls per backward would break both")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"step_in_backward: bucket_bytes must be a positive int, got {bucket_bytes!r}")
    _check_options(optimizer)
    DTensor = dtensor_type()
    params = []
    model_params = {id(p) for p in model.parameters()}
    for index, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            where = f"step_in_backward: param group {index}, params[{i}]"
            if DTensor is not None and isinstance(p, DTensor):
                raise TypeError(f"{where} is a DTensor (FSDP2): its grads are reduce-scattered after the hook; step "
                                "after backward there")
            if p.dtype == torch.float16:
                raise ValueError(f"{where} is float16: fp16 training needs GradScaler, whose inf check and unscaling "
                                 "come after backward. Use bf16, or step after backward")
            if id(p) not in model_params:
                raise ValueError(f"{where} is not a parameter of the model")
            if p.requires_grad:
                params.append(p)
    return StepInBackward(optimizer, list({id(p): p for p in params}.values()), bucket_bytes)
