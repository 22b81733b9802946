"""Sophia's Hessian callbacks in the loops that do not call update_hessian themselves: Hugging
Face's Trainer and Lightning's automatic optimization. Each test runs when its framework is
installed (neither is a dependency)."""

import warnings

import pytest
import torch
from torch import nn

from dldna_fused import optim
from dldna_fused.integrations import find_sophia


class _Wrapper:
    def __init__(self, inner):
        self.optimizer = inner


def test_find_sophia_unwraps_framework_optimizers():
    opt = optim.Sophia([nn.Parameter(torch.zeros(2))])
    assert find_sophia(opt) is opt and find_sophia(_Wrapper(_Wrapper(opt))) is opt
    assert find_sophia(optim.AdamW([nn.Parameter(torch.zeros(2))])) is None


def _classification_data(n=64, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def test_transformers_trainer_updates_sophias_hessian_on_its_cadence(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from dldna_fused.integrations.huggingface import SophiaHessianCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, inputs, labels=None):
            logits = self.net(inputs)
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)

    x, y = _classification_data()
    dataset = [{"inputs": a, "labels": b} for a, b in zip(x, y)]
    model = Model()
    opt = optim.Sophia(model.parameters(), lr=1e-2, k=2)
    callback = SophiaHessianCallback(logits_fn=lambda m, batch: m(batch["inputs"]).logits)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None),
                                   callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without a Hessian update.*")
        trainer.train()
    assert callback.updates == 6
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())


def test_lightning_automatic_optimization_updates_sophias_hessian(tmp_path):
    lightning = pytest.importorskip("lightning")
    from dldna_fused.integrations.lightning import SophiaHessianCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return optim.Sophia(self.parameters(), lr=1e-2, k=3)

    x, y = _classification_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module, callback = Module(), SophiaHessianCallback()
    trainer = lightning.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                                default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    assert callback.updates == 4
    sophia = trainer.optimizers[0]
    assert all(sophia.state[p]["hessian"].abs().sum() > 0 for p in module.parameters())
