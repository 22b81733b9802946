"""Hooks for training loops that dldna_fused does not control.

Sophia needs a Hessian-diagonal update every ``k`` steps (:meth:`dldna_fused.optim.Sophia.update_hessian`),
which a hand-written loop calls itself. Hugging Face's ``Trainer`` and Lightning's automatic
optimization only call ``step()``; their callbacks here run the GNB update on Sophia's cadence:

* ``dldna_fused.integrations.huggingface.SophiaHessianCallback`` (a ``transformers.TrainerCallback``),
* ``dldna_fused.integrations.lightning.SophiaHessianCallback`` (a ``lightning.pytorch.Callback``).

Each module imports its framework, which dldna_fused does not require.
"""

from __future__ import annotations

import torch

from dldna_fused.optim.sophia import Sophia, gnb_loss


def find_sophia(optimizer) -> Sophia | None:
    """``optimizer`` itself, or the Sophia inside a framework's wrapper (accelerate's
    AcceleratedOptimizer and Lightning's LightningOptimizer keep it as ``.optimizer`` /
    ``._optimizer``); None when there is none."""
    for _ in range(4):
        if isinstance(optimizer, Sophia):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if optimizer is None:
            return None
    return None


def gnb_hessian_update(sophia: Sophia, logits: torch.Tensor) -> None:
    """One GNB update from ``logits`` of a batch: the gradient of :func:`gnb_loss`, folded into
    Sophia's Hessian estimate; the grads are cleared before and after."""
    sophia.zero_grad(set_to_none=True)
    with torch.enable_grad():
        gnb_loss(logits).backward()
    sophia.update_hessian()
    sophia.zero_grad(set_to_none=True)
