"""Sophia's Hessian updates under Lightning's automatic optimization: add
``SophiaHessianCallback()`` to ``Trainer(callbacks=[...])`` when ``configure_optimizers``
returns a :class:`dldna_fused.optim.Sophia`."""

from __future__ import annotations

from lightning.pytorch import Callback

from dldna_fused.integrations import find_sophia, gnb_hessian_update


class SophiaHessianCallback(Callback):
    """After each training batch whose step made ``should_update_hessian()`` true, runs Sophia's
    GNB update on that batch's logits: ``logits_fn(pl_module, batch)``, by default
    ``pl_module(batch[0])`` for ``(inputs, targets)`` batches."""

    def __init__(self, logits_fn=None):
        self.logits_fn = logits_fn or (lambda module, batch: module(batch[0]))
        self.updates = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for optimizer in trainer.optimizers:
            sophia = find_sophia(optimizer)
            if sophia is not None and sophia.should_update_hessian():
                gnb_hessian_update(sophia, self.logits_fn(pl_module, batch))
                self.updates += 1
