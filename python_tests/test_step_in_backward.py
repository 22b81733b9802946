"""dldna_fused.optim.step_in_backward: the same updates as backward() then step(), grads freed
bucket by bucket during backward, accumulation, schedulers, state_dict, and what it refuses."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from dldna_fused import optim
from dldna_fused.optim import step_in_backward

CLASSES = {
    "AdamW": (optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
    "Lion": (optim.Lion, {"lr": 1e-3, "weight_decay": 0.1}),
    "Adafactor": (optim.Adafactor, {"lr": 1e-2, "relative_step": False, "beta1": 0.9}),
    "AdamW8bit": (optim.AdamW8bit, {"lr": 1e-2, "min_8bit_size": 256}),
    "torch.AdamW": (torch.optim.AdamW, {"lr": 1e-2, "foreach": True}),
}


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 3)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).float().pow(2).mean()


def _groups(model):
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 3e-3},
            {"params": list(model[4].parameters())}]


def _assert_same(model, other, opt, other_opt):
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    a, b = opt.state_dict(), other_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in b["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(a["state"][i][key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_updates_as_backward_then_step_with_grads_freed(name, dtype):
    cls, kwargs = CLASSES[name]
    model, plain_model = _model(dtype), _model(dtype)
    opt, plain = cls(_groups(model), **kwargs), cls(_groups(plain_model), **kwargs)
    handle = step_in_backward(model, opt, bucket_bytes=48 * 48 * dtype.itemsize)
    for batch in _batches(4, dtype):
        _loss(model, batch).backward()
        assert all(p.grad is None for p in model.parameters())  # stepped and freed during backward
        plain.zero_grad()
        _loss(plain_model, batch).backward()
        plain.step()
    assert handle.steps >= 2 * 4  # more than one bucket per backward
    _assert_same(model, plain_model, opt, plain)


def test_bucket_bytes_sets_the_calls_per_backward():
    model = _model()
    calls = []
    opt = optim.AdamW(model.parameters())
    opt.register_step_post_hook(lambda o, a, k: calls.append([p.shape for p in model.parameters() if p.grad is not None]))
    handle = step_in_backward(model, opt, bucket_bytes=1 << 30)
    _loss(model, _batches(1)[0]).backward()
    assert len(calls) == 1 and len(calls[0]) == 6  # everything at the end of backward, in one call
    handle.remove()
    calls.clear()
    handle = step_in_backward(model, opt, bucket_bytes=1)
    _loss(model, _batches(1)[0]).backward()
    # One call per param, in the order the grads arrived: the last layer's first.
    assert [len(c) for c in calls] == [1] * 6
    assert calls[0][0] in (torch.Size([3]), torch.Size([3, 48]))
    assert calls[-1][0] in (torch.Size([48, 12]), torch.Size([48]))
    handle.remove()


def test_accumulation_with_no_step_and_schedulers():
    model, plain_model = _model(), _model()
    opt, plain = optim.AdamW(model.parameters(), lr=0.05), optim.AdamW(plain_model.parameters(), lr=0.05)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, plain)]
    handle = step_in_backward(model, opt)
    batches = _batches(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for start in (0, 3):
            with handle.no_step():
                for batch in batches[start:start + 2]:
                    _loss(model, batch).backward()
            assert model[0].weight.grad is not None  # accumulating, not stepped
            _loss(model, batches[start + 2]).backward()
            scheds[0].step()
            for batch in batches[start:start + 3]:
                _loss(plain_model, batch).backward()
            plain.step()
            plain.zero_grad()
            scheds[1].step()
    assert opt.param_groups[0]["lr"] == plain.param_groups[0]["lr"] == 0.0125
    _assert_same(model, plain_model, opt, plain)


def test_remove_restores_backward_then_step_and_leftover_calls_do_nothing():
    model = _model()
    opt = optim.Lion(model.parameters(), lr=1e-3)
    handle = step_in_backward(model, opt)
    _loss(model, _batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # a training loop's leftover call: no grads, nothing moves
    opt.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    handle.remove()
    assert not handle.active
    _loss(model, _batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_state_dict_round_trips_into_a_plain_run():
    model, plain_model = _model(), _model()
    opt = optim.AdamW8bit(model.parameters(), min_8bit_size=256)
    handle = step_in_backward(model, opt)
    for batch in _batches(2):
        _loss(model, batch).backward()
    plain_model.load_state_dict(model.state_dict())
    plain = optim.AdamW8bit(plain_model.parameters(), min_8bit_size=256)
    plain.load_state_dict(opt.state_dict())
    for batch in _batches(2):
        _loss(model, batch).backward()
        plain.zero_grad()
        _loss(plain_model, batch).backward()
        plain.step()
    handle.remove()
    _assert_same(model, plain_model, opt, plain)


def test_refusals_name_the_reason():
    model = _model()
    with pytest.raises(ValueError, match="param group 0 has max_grad_norm"):
        step_in_backward(model, optim.AdamW(model.parameters(), max_grad_norm=1.0))
    with pytest.raises(TypeError, match="Sophia"):
        step_in_backward(model, optim.Sophia(model.parameters()))
    with pytest.raises(ValueError, match="float16.*GradScaler"):
        half = _model(torch.float16)
        step_in_backward(half, optim.AdamW(half.parameters()))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        step_in_backward(model, optim.AdamW([torch.nn.Parameter(torch.ones(2))]))
    with pytest.raises(ValueError, match="bucket_bytes"):
        step_in_backward(model, optim.AdamW(model.parameters()), bucket_bytes=0)
    # A group that takes max_grad_norm afterwards is refused at the first bucket, before it steps.
    opt = optim.AdamW(model.parameters())
    handle = step_in_backward(model, opt)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_grad_norm"):
        _loss(model, _batches(1)[0]).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    handle.remove()


def test_grad_scaler_is_refused_at_its_first_step():
    model = _model()
    opt = optim.AdamW(model.parameters())
    handle = step_in_backward(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(_loss(model, _batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="GradScaler is stepping this optimizer"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    handle.remove()  # the usual loop works again, GradScaler included
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(_loss(model, _batches(1)[0])).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_ddp_is_refused(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        with pytest.raises(TypeError, match="DDP"):
            step_in_backward(model, optim.AdamW(model.parameters()))
    finally:
        dist.destroy_process_group()
