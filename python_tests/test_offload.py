"""dldna_fused.offload.CPUOffloadOptimizer with CPU params standing in for device params: the
bucketing, the hooks, the worker, the step's checks, GradScaler, lr schedulers, state_dict and
errors. The CUDA stream and pinned-memory lines run in benchmarks/gpu_check.sh."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import dldna_fused
from dldna_fused import optim
from dldna_fused.offload import CPUOffloadOptimizer
from param_zoo import DTYPES, as_params, zoo, zoo_grads

CLASSES = {
    "Adam": (optim.Adam, {"lr": 1e-2}),
    "AdamW": (optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
    "Lion": (optim.Lion, {"lr": 1e-3, "weight_decay": 0.1}),
    "Adafactor": (optim.Adafactor, {"lr": 1e-2, "beta1": 0.9, "relative_step": False}),
    "AdamW8bit": (optim.AdamW8bit, {"lr": 1e-2, "min_8bit_size": 256}),
    "Adam8bit": (optim.Adam8bit, {"lr": 1e-2, "min_8bit_size": 256}),
    "AdamW4bit": (optim.AdamW4bit, {"lr": 1e-2, "min_8bit_size": 256}),
    "Lion8bit": (optim.Lion8bit, {"lr": 1e-3, "min_8bit_size": 256}),
    "torch.AdamW": (torch.optim.AdamW, {"lr": 1e-2, "fused": True}),
}


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 3))
    return model.to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).float().pow(2).mean()


def _train(pairs, batches):
    """Trains each (model, optimizer) pair on the same batches, in lockstep."""
    for batch in batches:
        for model, opt in pairs:
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()


def _assert_same_params(model, other, atol=0.0, rtol=0.0):
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol)


def _assert_states_equal(ours: dict, theirs: dict, atol=0.0, rtol=0.0):
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key], theirs[key]
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, msg=key)
        else:
            assert a == b, key


def _train_pair(name, steps=4, bucket_bytes=700, **extra):
    """The wrapper and the plain optimizer on copies of one model, trained alike."""
    cls, kwargs = CLASSES[name]
    kwargs = {**kwargs, **extra}
    model, plain_model = _model(), _model()
    groups = lambda m: [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "lr": 3e-3},
                        {"params": list(m[4].parameters())}]
    ours = CPUOffloadOptimizer(groups(model), cls, bucket_bytes=bucket_bytes, **kwargs)
    plain = cls(groups(plain_model), **kwargs)
    _train(((model, ours), (plain_model, plain)), _batches(steps))
    return model, plain_model, ours, plain


@pytest.mark.parametrize("name", list(CLASSES))
def test_matches_the_plain_optimizer(name):
    """Params and every state equal the plain optimizer's on the same params, through the hooks
    and several buckets per group."""
    model, plain_model, ours, plain = _train_pair(name)
    assert len(ours._buckets) > 3
    _assert_same_params(model, plain_model)
    ours_sd, plain_sd = ours.state_dict(), plain.state_dict()
    assert ours_sd["param_groups"] == plain_sd["param_groups"]
    assert ours_sd["state"].keys() == plain_sd["state"].keys()
    for i in plain_sd["state"]:
        _assert_states_equal(ours_sd["state"][i], plain_sd["state"][i])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "AdamW8bit", "Lion"])
def test_param_zoo_keeps_fp32_masters(name, dtype_name):
    """Zoo params of every dtype and shape with grads set by hand (no hook fires, so the step
    copies them): the masters follow the plain optimizer on fp32 copies fed the same grads, and
    each device param is its master cast to its dtype."""
    cls, kwargs = CLASSES[name]
    starts = zoo(dtype_name)
    device_params = as_params(starts)
    masters = as_params(starts, torch.float32)
    ours = CPUOffloadOptimizer([{"params": g} for g in device_params], cls, bucket_bytes=4096, **kwargs)
    plain = cls([{"params": g} for g in masters], **kwargs)
    for per_group in zoo_grads(starts, steps=4):
        for group, master_group, grads in zip(device_params, masters, per_group):
            for p, q, g in zip(group, master_group, grads):
                p.grad = None if g is None else g.to(p.dtype)
                q.grad = None if g is None else p.grad.float()
        ours.step()
        plain.step()
    for group, master_group in zip(device_params, masters):
        for p, q in zip(group, master_group):
            torch.testing.assert_close(ours._slots[p].host, q.detach(), atol=0, rtol=0)
            torch.testing.assert_close(p.detach(), q.detach().to(p.dtype), atol=0, rtol=0)
            _assert_states_equal(ours.state[p], plain.state[q])


@pytest.mark.parametrize("bucket_bytes", [4, 1 << 10, 1 << 30])
def test_clipping_takes_the_global_norm_of_every_bucket(bucket_bytes):
    """max_grad_norm clips by the norm of all groups' grads together, whatever the bucketing."""
    model, plain_model, ours, plain = _train_pair("AdamW", bucket_bytes=bucket_bytes, max_grad_norm=0.05)
    torch.testing.assert_close(ours.last_grad_norm, plain.last_grad_norm, rtol=1e-6, atol=0)
    assert ours.last_grad_norm > 0.05  # the clip was active
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_bucketing_cuts_groups_in_backward_order():
    model = _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=40 * 40 * 4)
    params = list(model.parameters())
    order = [s.device_param for b in ours._buckets for s in b.slots]
    assert [id(p) for p in order] == [id(p) for p in reversed(params)]
    for bucket in ours._buckets:  # one flat fp32 buffer each, at most bucket_bytes unless one param is larger
        assert bucket.flat.numel() == sum(s.device_param.numel() for s in bucket.slots)
        assert len(bucket.slots) == 1 or bucket.flat.numel() * 4 <= 40 * 40 * 4
        assert all(s.host.untyped_storage().data_ptr() == bucket.flat.untyped_storage().data_ptr()
                   for s in bucket.slots)


def test_the_worker_takes_each_bucket_norm_during_backward():
    model = _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10, max_grad_norm=1.0)
    _loss(model, _batches(1)[0]).backward()
    ours._wait_worker()
    assert all(b.norm is not None for b in ours._buckets)  # every bucket finished before step()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    ours.step()
    torch.testing.assert_close(ours.last_grad_norm, expected, rtol=1e-6, atol=0)


def test_grads_changed_after_backward_are_copied_again():
    """An in-place clip of the device grads after backward, and a grad set by hand, reach the
    host step as they would reach the plain optimizer."""
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10)
    plain = optim.AdamW(plain_model.parameters())
    for batch in _batches(3):
        for m, opt in ((model, ours), (plain_model, plain)):
            opt.zero_grad()
            _loss(m, batch).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
            m[4].bias.grad = torch.ones_like(m[4].bias)
            opt.step()
    _assert_same_params(model, plain_model)


def test_gradient_accumulation_without_overlap():
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.Adam, bucket_bytes=1 << 10)
    plain = optim.Adam(plain_model.parameters())
    batches = _batches(6)
    for start in (0, 3):
        for m, opt in ((model, ours), (plain_model, plain)):
            for batch in batches[start:start + 3]:
                _loss(m, batch).backward()
            opt.step()
            opt.zero_grad()
    _assert_same_params(model, plain_model)


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion"])
def test_overlap_step_steps_buckets_during_backward(name):
    cls, kwargs = CLASSES[name]
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), cls, bucket_bytes=1 << 10, overlap_step=True, **kwargs)
    plain = cls(plain_model.parameters(), **kwargs)
    for batch in _batches(3):
        for m, opt in ((model, ours), (plain_model, plain)):
            opt.zero_grad()
            _loss(m, batch).backward()
            if opt is ours:
                ours._wait_worker()
                assert all(b.stepped for b in ours._buckets)  # the host step ran before step()
                first = next(iter(model.parameters()))
                assert not torch.equal(ours._slots[first].host, first.detach())  # not yet copied back
            opt.step()
    _assert_same_params(model, plain_model)


def test_overlap_step_with_accumulation_needs_no_step():
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10, overlap_step=True)
    plain = optim.AdamW(plain_model.parameters())
    batches = _batches(3)
    with ours.no_step():
        for batch in batches[:2]:
            _loss(model, batch).backward()
    _loss(model, batches[2]).backward()
    ours.step()
    for batch in batches:
        _loss(plain_model, batch).backward()
    plain.step()
    _assert_same_params(model, plain_model)

    ours.zero_grad()
    _loss(model, batches[0]).backward()
    with pytest.raises(RuntimeError, match="no_step"):
        _loss(model, batches[1]).backward()


def test_overlap_step_refuses_what_it_cannot_do():
    model = _model()
    with pytest.raises(ValueError, match="max_grad_norm.*overlap_step"):
        CPUOffloadOptimizer(model.parameters(), optim.AdamW, overlap_step=True, max_grad_norm=1.0)
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, overlap_step=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(_loss(model, _batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(ours)
    ours.zero_grad()
    _loss(model, _batches(1)[0]).backward()
    model[0].weight.grad.mul_(2)
    with pytest.raises(RuntimeError, match=r"\(40, 12\) changed after their bucket stepped"):
        ours.step()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler(unscale_first, monkeypatch):
    """GradScaler's tensors reach the host step: it unscales, skips inf steps, and clipping takes
    the unscaled norm. Its inf check costs no second copy of the grads; scaler.unscale_, which
    changes them in place without a trace, costs one."""
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10, max_grad_norm=0.1)
    plain = optim.AdamW(plain_model.parameters(), max_grad_norm=0.1)
    copies = []
    real_copy = CPUOffloadOptimizer._copy_grad
    monkeypatch.setattr(CPUOffloadOptimizer, "_copy_grad", lambda self, slot: (copies.append(slot), real_copy(self, slot)))
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1) for _ in range(2)]
    for step, batch in enumerate(_batches(4)):
        for m, opt, scaler in ((model, ours, scalers[0]), (plain_model, plain, scalers[1])):
            opt.zero_grad()
            scaler.scale(_loss(m, batch)).backward()
            if step == 2:
                m[2].weight.grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(opt)
            copies.clear()
            scaler.step(opt)
            if opt is ours:
                stale = 1 if step == 2 else 0  # the grad changed by hand
                assert len(copies) == (len(list(m.parameters())) if unscale_first else stale)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_torch_optimizer_without_amp_support_under_grad_scaler():
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    for step, batch in enumerate(_batches(3)):
        for m, opt, scaler in ((model, ours, scalers[0]), (plain_model, plain, scalers[1])):
            opt.zero_grad()
            scaler.scale(_loss(m, batch)).backward()
            if step == 1:
                m[0].bias.grad[0] = float("nan")
            scaler.step(opt)
            scaler.update()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lr_scheduler_and_group_changes_reach_the_host_step():
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, lr=0.1, bucket_bytes=1 << 10)
    plain = optim.AdamW(plain_model.parameters(), lr=0.1)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (ours, plain)]
    for step, batch in enumerate(_batches(5)):
        for m, opt, sched in ((model, ours, schedulers[0]), (plain_model, plain, schedulers[1])):
            opt.zero_grad()
            _loss(m, batch).backward()
            if step == 3:
                opt.param_groups[0]["weight_decay"] = 0.5
                opt.param_groups[0]["betas"] = (0.8, 0.9)
            opt.step()
            sched.step()
    assert ours.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
    _assert_same_params(model, plain_model)


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Adafactor"])
def test_state_dict_moves_between_the_wrapper_and_the_plain_optimizer(name):
    cls, kwargs = CLASSES[name]
    model, plain_model, ours, plain = _train_pair(name, steps=2)
    # The plain optimizer continues from the wrapper's checkpoint, and the other way round.
    fresh_plain = cls([{"params": list(plain_model[i].parameters())} for i in (0, 2, 4)], **kwargs)
    fresh_plain.load_state_dict(ours.state_dict())
    fresh_ours = CPUOffloadOptimizer([{"params": list(model[i].parameters())} for i in (0, 2, 4)], cls,
                                     bucket_bytes=1 << 20, **kwargs)
    fresh_ours.load_state_dict(plain.state_dict())
    _train(((model, fresh_ours), (plain_model, fresh_plain)), _batches(2, seed=5))
    _assert_same_params(model, plain_model)
    assert fresh_ours.param_groups[1]["lr"] == 3e-3


def test_load_state_dict_is_all_or_nothing():
    model, _, ours, plain = _train_pair("AdamW", steps=2)
    before = copy.deepcopy(ours.state_dict())
    bad = copy.deepcopy(plain.state_dict())
    last = max(bad["state"])
    bad["state"][last]["exp_avg"] = torch.zeros(7)  # the wrong shape, in the last group
    bad["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="exp_avg"):
        ours.load_state_dict(bad)
    after = ours.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i in before["state"]:
        _assert_states_equal(after["state"][i], before["state"][i])
    with pytest.raises(ValueError, match="number of parameter groups"):
        ours.load_state_dict({"state": {}, "param_groups": before["param_groups"][:1]})


def test_state_view_and_zero_grad():
    model, _, ours, plain = _train_pair("AdamW", steps=1)
    p = model[0].weight
    assert len(ours.state) == len(list(model.parameters()))
    assert set(ours.state[p]) == {"exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq"}
    assert ours.state[p]["exp_avg"].device.type == "cpu"
    ours.state[p]["exp_avg"].zero_()  # writes reach the host state
    assert ours.state_dict()["state"][0]["exp_avg"].abs().sum() == 0
    ours.zero_grad(set_to_none=False)
    assert torch.count_nonzero(p.grad) == 0
    ours.zero_grad()
    assert p.grad is None
    before = p.detach().clone()
    ours.step()  # no grads: nothing moves, as in torch.optim
    torch.testing.assert_close(p.detach(), before, atol=0, rtol=0)


def test_params_changed_outside_are_reloaded():
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10)
    plain = optim.AdamW(plain_model.parameters())
    with torch.no_grad():
        for m in (model, plain_model):
            m.load_state_dict(_model(seed=7).state_dict())  # after the masters were taken
    _train(((model, ours), (plain_model, plain)), _batches(2))
    _assert_same_params(model, plain_model)


def test_bf16_params_keep_fp32_masters():
    model = _model(dtype=torch.bfloat16)
    master_model = _model()
    master_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, lr=1e-4, bucket_bytes=1 << 10)
    plain = optim.AdamW(master_model.parameters(), lr=1e-4)
    for batch in _batches(3, dtype=torch.bfloat16):
        ours.zero_grad()
        _loss(model, batch).backward()
        for p, q in zip(model.parameters(), master_model.parameters()):
            q.grad = p.grad.float()
        ours.step()
        plain.step()
    for p, q in zip(model.parameters(), master_model.parameters()):
        torch.testing.assert_close(ours._slots[p].host, q.detach(), atol=0, rtol=0)
        torch.testing.assert_close(p.detach(), q.detach().bfloat16(), atol=0, rtol=0)
    # A step of 1e-4 is below bf16's resolution of most weights; the masters keep it.
    assert any(not torch.equal(ours._slots[p].host, p.detach().float()) for p in model.parameters())


def test_frozen_unused_and_added_params():
    model = _model()
    model[0].weight.requires_grad_(False)
    extra = torch.nn.Parameter(torch.ones(5))  # takes no part in the loss
    ours = CPUOffloadOptimizer([{"params": list(model.parameters())}], optim.AdamW, bucket_bytes=1 << 10)
    ours.add_param_group({"params": [extra], "lr": 0.5})
    frozen = model[0].weight.detach().clone()
    for batch in _batches(2):
        ours.zero_grad()
        _loss(model, batch).backward()
        ours.step()
    assert torch.equal(model[0].weight, frozen) and torch.equal(extra.detach(), torch.ones(5))
    extra.grad = torch.ones(5)
    ours.step()
    assert torch.all(extra < 1)
    with pytest.raises(ValueError, match="param group 2.*float64"):
        ours.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]})
    assert len(ours.param_groups) == 2 and len(ours._slots) == len(list(model.parameters())) + 1


def test_errors_name_what_was_wrong():
    model = _model()
    with pytest.raises(TypeError, match="Sophia"):
        CPUOffloadOptimizer(model.parameters(), optim.Sophia)
    with pytest.raises(ValueError, match="bucket_bytes"):
        CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=0)
    with pytest.raises(ValueError, match="max_grad_norm needs a dldna_fused.optim class"):
        CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, max_grad_norm=1.0)
    for option in ("bf16_stochastic_round", "kahan_sum"):  # fp32 masters: they would do nothing
        with pytest.raises(ValueError, match=f"{option}=True does nothing here: the host masters are fp32"):
            CPUOffloadOptimizer(model.parameters(), optim.AdamW, **{option: True})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        CPUOffloadOptimizer(model.parameters(), optim.AdamW, lr=-1.0)
    with pytest.raises(ValueError, match="meta"):
        CPUOffloadOptimizer([torch.nn.Parameter(torch.ones(2, device="meta"))], optim.AdamW)
    with pytest.raises(TypeError, match="optimizer_class"):
        CPUOffloadOptimizer(model.parameters(), "adamw")
    with pytest.raises(ValueError, match=r"params\[1\] appears twice"), pytest.warns(UserWarning, match="duplicate"):
        CPUOffloadOptimizer([model[0].weight, model[0].weight], optim.AdamW)  # torch warns, we refuse
    ours = CPUOffloadOptimizer([{"params": [model[0].weight]}, {"params": [model[2].weight]}], optim.AdamW)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    ours.param_groups[1]["betas"] = (0.9, 1.5)  # the failure in the last group
    before = [ours._slots[p].host.clone() for p in (model[0].weight, model[2].weight)]
    with pytest.raises(ValueError, match="param group 1.*beta"):
        ours.step()
    assert all(torch.equal(ours._slots[p].host, b) for p, b in zip((model[0].weight, model[2].weight), before))
    assert len(ours.state) == 0


def test_closure_and_step_hooks():
    model = _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10)
    calls = []
    ours.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    ours.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    batch = _batches(1)[0]

    def closure():
        ours.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    loss = ours.step(closure)
    assert loss.item() > 0 and calls == ["pre", "post"] and len(ours.state) > 0


def test_the_hooks_do_not_keep_a_discarded_optimizer_alive():
    model = _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW)
    ref = weakref.ref(ours)
    del ours
    gc.collect()
    assert ref() is None
    _loss(model, _batches(1)[0]).backward()  # the hooks do nothing once it is gone
    assert dldna_fused.offload.CPUOffloadOptimizer is CPUOffloadOptimizer


# --- on a GPU (benchmarks/gpu_check.sh): the streams, pinned buffers and torchao's wrapper ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["copy-in-backward", "overlap_step", "max_grad_norm"])
def test_cuda_params_step_on_the_host(mode, dtype):
    """Device params, pinned host buffers, grads copied on the side stream during backward and
    params copied back before the next forward: the masters follow the plain optimizer run on
    host fp32 copies fed the same grads, bit for bit, and the device params are their casts."""
    extra = {"max_grad_norm": 0.05} if mode == "max_grad_norm" else {}
    model = _model(dtype=dtype).cuda()
    masters = _model()
    masters.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, lr=1e-2, bucket_bytes=1 << 12,
                               overlap_step=mode == "overlap_step", **extra)
    plain = optim.AdamW(masters.parameters(), lr=1e-2, **extra)
    assert all(b.flat.is_pinned() and b.flat_grad.is_pinned() for b in ours._buckets)
    for x, y in _batches(4, dtype=dtype):
        ours.zero_grad()
        _loss(model, (x.cuda(), y.cuda())).backward()
        grads = [p.grad.float().cpu() for p in model.parameters()]
        ours.step()
        for q, g in zip(masters.parameters(), grads):
            q.grad = g
        plain.step()
    for p, q in zip(model.parameters(), masters.parameters()):
        torch.testing.assert_close(ours._slots[p].host, q.detach(), atol=0, rtol=0)
        torch.testing.assert_close(p.detach().cpu(), q.detach().to(dtype), atol=0, rtol=0)


@needs_cuda
def test_cuda_grad_scaler_skips_and_unscales():
    model = _model().cuda()
    masters = _model()
    masters.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW8bit, lr=1e-2, min_8bit_size=256)
    plain = optim.AdamW8bit(masters.parameters(), lr=1e-2, min_8bit_size=256)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    for step, (x, y) in enumerate(_batches(4)):
        ours.zero_grad()
        scaler.scale(_loss(model, (x.cuda(), y.cuda()))).backward()
        if step == 1:
            model[2].weight.grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        grads = [p.grad.float().cpu() / scale for p in model.parameters()]
        scaler.step(ours)
        scaler.update()
        if step != 1:
            for q, g in zip(masters.parameters(), grads):
                q.grad = g
            plain.step()
    for p, q in zip(model.parameters(), masters.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-6, atol=1e-7)


@needs_cuda
@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit"])
def test_torchao_cpu_offload_takes_our_classes(name):
    """torchao's CPUOffloadOptimizer builds one instance of our class per large param on the
    host, and one for the small params on the GPU; training follows our plain class on the GPU."""
    offload = pytest.importorskip("torchao.optim", reason="torchao is an optional peer").CPUOffloadOptimizer
    cls, kwargs = CLASSES[name]
    model, plain_model = _model().cuda(), _model().cuda()
    ours = offload(model.parameters(), cls, minimal_size=400, **kwargs)
    plain = cls(plain_model.parameters(), **kwargs)
    assert ours.d_opt is not None and len(ours.optim_dict) > 0  # both halves in use
    for x, y in _batches(4):
        for m, opt in ((model, ours), (plain_model, plain)):
            opt.zero_grad()
            _loss(m, (x.cuda(), y.cuda())).backward()
            opt.step()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # host kernels against CUDA kernels
    ours.load_state_dict(ours.state_dict())


def test_each_backward_fills_its_buckets_again(monkeypatch):
    """Under gradient accumulation a bucket's norm is taken once per backward, when all its params
    have arrived in that backward, not once per param of the second one."""
    model = _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 30, max_grad_norm=1.0)
    submitted = []
    real = ours._worker.submit
    monkeypatch.setattr(ours._worker, "submit", lambda *a: (submitted.append(a[1]), real(*a))[1])
    batches = _batches(2)
    for batch in batches:
        _loss(model, batch).backward()
    assert len(submitted) == 2  # one bucket, once per backward
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    ours.step()
    torch.testing.assert_close(ours.last_grad_norm, expected, rtol=1e-6, atol=0)


def test_compiled_models_take_the_wrapper_and_the_step_in_backward():
    """Under torch.compile (AOT autograd builds the backward) the post-accumulate-grad hooks still
    fire: the wrapper and step_in_backward match the plain loop exactly."""
    model, hooked_model, plain_model = _model(), _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10)
    hooked = optim.AdamW(hooked_model.parameters())
    handle = optim.step_in_backward(hooked_model, hooked, bucket_bytes=1 << 10)
    plain = optim.AdamW(plain_model.parameters())
    compiled = [torch.compile(m, backend="aot_eager") for m in (model, hooked_model, plain_model)]
    for batch in _batches(3):
        ours.zero_grad()
        _loss(compiled[0], batch).backward()
        ours.step()
        _loss(compiled[1], batch).backward()
        plain.zero_grad()
        _loss(compiled[2], batch).backward()
        plain.step()
    handle.remove()
    _assert_same_params(model, plain_model)
    _assert_same_params(hooked_model, plain_model)


def test_the_memory_savers_example_runs_and_agrees():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "memory_savers.py"
    out = subprocess.run([sys.executable, str(script), "--epochs", "5"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 2 and "grads freed: True" in out[1] and "in 10 bucket steps" in out[1]
    for line in out:  # each line's two losses, the memory saver's and the plain loop's, agree
        losses = re.findall(r"loss (\d+\.\d+)", line)
        assert len(losses) == 2 and losses[0] == losses[1], line


def test_state_and_param_group_mutations_between_steps():
    """state.clear() and del restart a param's state as in torch.optim, a replaced state tensor is
    the one stepped, and a param swapped into a group's list is refused by name, changing nothing."""
    model, plain_model = _model(), _model()
    ours = CPUOffloadOptimizer(model.parameters(), optim.AdamW, bucket_bytes=1 << 10)
    plain = optim.AdamW(plain_model.parameters())
    batches = _batches(4)
    _train(((model, ours), (plain_model, plain)), batches[:1])
    ours.state.clear()
    plain.state.clear()
    assert len(ours.state) == 0
    _train(((model, ours), (plain_model, plain)), batches[1:2])
    first, plain_first = next(model.parameters()), next(plain_model.parameters())
    del ours.state[first]
    del plain.state[plain_first]
    _train(((model, ours), (plain_model, plain)), batches[2:3])
    ours.state[first]["exp_avg"] = torch.ones_like(ours.state[first]["exp_avg"])
    plain.state[plain_first]["exp_avg"] = torch.ones_like(plain.state[plain_first]["exp_avg"])
    _train(((model, ours), (plain_model, plain)), batches[3:])
    _assert_same_params(model, plain_model)

    stranger = torch.nn.Parameter(torch.zeros_like(first))
    ours.param_groups[0]["params"][0] = stranger
    stranger.grad = torch.ones_like(stranger)
    before = [ours._slots[p].host.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 0, params\[0\] is not a param this optimizer"):
        ours.step()
    assert all(torch.equal(ours._slots[p].host, b) for p, b in zip(model.parameters(), before))
