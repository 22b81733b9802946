"""Sophia's Hessian updates inside a Hugging Face ``Trainer``: add ``SophiaHessianCallback()`` to
``Trainer(callbacks=[...])`` next to ``optimizers=(Sophia(model.parameters(), ...), None)``."""

from __future__ import annotations

from transformers import TrainerCallback

from dldna_fused.integrations import find_sophia, gnb_hessian_update


def _to_device(batch, device):
    if hasattr(batch, "items"):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return [v.to(device) if hasattr(v, "to") else v for v in batch]


class SophiaHessianCallback(TrainerCallback):
    """After each optimizer step, when ``should_update_hessian()`` says so, draws a batch from the
    Trainer's training dataloader, computes the model's logits (``logits_fn(model, batch)``,
    default ``model(**batch).logits``) and runs Sophia's GNB update on them."""

    def __init__(self, logits_fn=None):
        self.logits_fn = logits_fn or (lambda model, batch: model(**batch).logits)
        self._batches = None
        self.updates = 0

    def _next_batch(self, dataloader):
        if self._batches is None:
            self._batches = iter(dataloader)
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(dataloader)
            return next(self._batches)

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        sophia = find_sophia(optimizer)
        if sophia is None or model is None or train_dataloader is None or not sophia.should_update_hessian():
            return control
        device = next(model.parameters()).device
        gnb_hessian_update(sophia, self.logits_fn(model, _to_device(self._next_batch(train_dataloader), device)))
        self.updates += 1
        return control
