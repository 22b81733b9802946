"""The chapter's ``BaseOptimizer``: the small base class its teaching optimizers derive from.

The chapter writes each optimizer as ``class SGD(BaseOptimizer)`` with ``__init__(params, lr)``
and a ``step()`` that loops over ``self.params``. That code runs unchanged on this class. The
library's own references (``dldna_fused.reference.SGD``, ``Adam``, ...) derive from
``torch.optim.Optimizer`` instead, so that they have param groups, ``state_dict`` and work with
lr schedulers, and they are what the parity tests compare against.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class BaseOptimizer:
    """Holds ``params`` (as a list, in order) and ``lr``; subclasses implement :meth:`step`."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("BaseOptimizer got an empty parameter list")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears every param's gradient (to None, or to zeros with ``set_to_none=False``)."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def step(self) -> None:
        raise NotImplementedError("subclasses implement step()")
