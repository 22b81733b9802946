"""Fused Lion and Sophia against their references (and lion-pytorch): parity over many steps for
every dtype and flag, Sophia's clipping, its Hessian estimators, GradScaler, state_dict, errors,
opcheck."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dldna_fused import ops, optim, reference
from conftest import DEVICES, fp32_tolerance, relative_error
from parity import STEPS, assert_low_precision_within_factor, assert_same_state, make_grads, make_params, run


def hessian_updates(opt, params, step):
    """Every third step, a GNB-style update from fresh (deterministic) gradients."""
    if step % 3 != 2:
        return
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
    opt.update_hessian()


OPTIMIZERS = {
    "lion": (optim.Lion, reference.Lion, dict(lr=1e-2, betas=(0.9, 0.99)), None),
    "lion-wd-maximize": (optim.Lion, reference.Lion, dict(lr=1e-2, weight_decay=0.5, maximize=True), None),
    "sophia": (optim.Sophia, reference.Sophia, dict(lr=1e-2, rho=0.05, weight_decay=0.1), hessian_updates),
    "sophia-maximize-bs": (optim.Sophia, reference.Sophia, dict(lr=1e-2, rho=0.02, bs=8, maximize=True,
                                                                 weight_decay=0.0), hessian_updates),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("many", [False, True], ids=["mixed-shapes", "300-tensors"])
def test_fp32_parity_with_reference(device, name, many):
    fused_cls, ref_cls, kwargs, after = OPTIMIZERS[name]
    params = make_params(device, torch.float32, many)
    grads = [make_grads(params, s) for s in range(STEPS)]
    fused_p, fused = run(lambda ps: fused_cls(ps, **kwargs), params, grads, after)
    ref_p, ref = run(lambda ps: ref_cls(ps, **kwargs), params, grads, after)
    assert_same_state(fused, ref, fused_p, ref_p)
    if fused_cls is optim.Sophia:
        assert fused.win_rate == pytest.approx(ref.win_rate, abs=1e-3)


LOW_PRECISION_CASES = [
    pytest.param("lion-wd-maximize", torch.bfloat16, None, id="lion-bf16"),
    pytest.param("lion-wd-maximize", torch.float16, None, id="lion-fp16"),
    pytest.param("lion-wd-maximize", torch.bfloat16, torch.float32, id="lion-bf16-fp32-states"),
    pytest.param("sophia", torch.bfloat16, None, id="sophia-bf16"),
    pytest.param("sophia", torch.bfloat16, torch.float32, id="sophia-bf16-fp32-states"),
    # No fp16 Sophia here: torch's fp16 run has no finite error to compare with (see
    # test_sophia_fp16_is_finite_where_the_fp16_torch_loop_is_not).
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,state_dtype", LOW_PRECISION_CASES)
def test_low_precision_error_within_2x_of_torch(device, name, dtype, state_dtype):
    fused_cls, ref_cls, kwargs, after = OPTIMIZERS[name]
    params = make_params(device, dtype)
    grads = [make_grads(params, s) for s in range(STEPS)]
    fused_p, fused = run(lambda ps: fused_cls(ps, state_dtype=state_dtype, **kwargs), params, grads, after)
    exact_p, _ = run(lambda ps: ref_cls(ps, **kwargs), [p.double() for p in params],
                     [[None if g is None else g.double() for g in gs] for gs in grads], after)
    # "torch at that dtype": the reference loop's torch ops run in the params' dtype.
    torch_p, _ = run(lambda ps: ref_cls(ps, **kwargs), params, grads, after)
    assert_low_precision_within_factor(fused_p, exact_p, torch_p, dtype)
    for p in fused_p:
        for key, value in fused.state.get(p, {}).items():
            assert value.dtype == (torch.float32 if key == "step" else state_dtype or dtype)


def test_sophia_fp16_is_finite_where_the_fp16_torch_loop_is_not():
    # In fp16 the authors' 1e-15 underflows to 0, so a coordinate with m = 0 and h = 0 gives 0/0.
    p = torch.nn.Parameter(torch.randn(64).half())
    grad = torch.randn(64).half()
    grad[:8] = 0
    results = {}
    for name, cls in (("ours", optim.Sophia), ("torch", reference.Sophia)):
        q = torch.nn.Parameter(p.detach().clone())
        opt = cls([q], lr=1e-2)
        q.grad = grad.clone()
        opt.step()
        results[name] = q.detach()
    exact = p.detach().double() * (1 - 1e-3) - 1e-2 * grad.double().sign()
    assert results["torch"][:8].isnan().all()
    assert results["ours"].isfinite().all()
    assert relative_error(results["ours"], exact) <= 2 * torch.finfo(torch.float16).eps


def test_lion_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")  # a test dependency (requirements.txt)
    params = make_params("cpu", torch.float32)
    grads = [make_grads(params, s) for s in range(STEPS)]
    kwargs = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.2)
    fused_p, fused = run(lambda ps: optim.Lion(ps, **kwargs), params, grads)
    theirs_p, theirs = run(lambda ps: lion_pytorch.Lion(ps, **kwargs), params, grads)
    for i, (p, q) in enumerate(zip(fused_p, theirs_p)):
        assert relative_error(p, q) <= fp32_tolerance(p.numel(), STEPS), f"param {i}"
        if q in theirs.state:
            assert relative_error(fused.state[p]["exp_avg"], theirs.state[q]["exp_avg"]) <= fp32_tolerance(p.numel(), STEPS)


def test_lion_sign_of_zero_is_zero():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = optim.Lion([p], lr=0.5)
    p.grad = torch.tensor([0.0, 1.0, -1.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.5, 3.5]))


def test_sophia_without_hessian_takes_sign_steps():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    start = p.detach().clone()
    opt = optim.Sophia([p], lr=0.01, weight_decay=0.1)
    g = torch.randn(1000)
    p.grad = g.clone()
    opt.step()
    m = (1 - 0.965) * g
    expected = start * (1 - 0.01 * 0.1) - 0.01 * m.sign()
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7)
    assert opt.win_rate == 0.0  # h = 0: every coordinate clipped


def test_sophia_clips_exactly_where_momentum_exceeds_rho_bs_h():
    rho, bs, lr = 0.5, 4.0, 0.1
    p = torch.nn.Parameter(torch.zeros(6))
    opt = optim.Sophia([p], lr=lr, betas=(0.0, 0.99), rho=rho, bs=bs, weight_decay=0.0)
    p.grad = torch.zeros(6)
    opt.step()  # creates the state
    h = torch.tensor([1.0, 1.0, 0.1, 0.1, 2.0, 0.0])
    opt.state[p]["hessian"].copy_(h)
    g = torch.tensor([1.0, -3.0, 0.1, -0.3, -5.0, 1e-3])  # beta1 = 0: m = g
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    threshold = rho * bs * h  # 2, 2, 0.2, 0.2, 4, 0
    ratio = torch.minimum(g.abs() / (threshold + 1e-15), torch.ones(6))
    assert torch.allclose(before - p.detach(), lr * g.sign() * ratio, atol=1e-7)
    clipped = g.abs() >= threshold
    assert clipped.tolist() == [False, True, False, True, True, True]
    assert opt.win_rate == pytest.approx(2 / 6)


def test_sophia_step_bs_overrides_the_constructor():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    oa = optim.Sophia([a], lr=0.1, betas=(0.0, 0.0), rho=1.0, bs=1, weight_decay=0.0)
    ob = optim.Sophia([b], lr=0.1, betas=(0.0, 0.0), rho=1.0, bs=5, weight_decay=0.0)
    for opt, p in ((oa, a), (ob, b)):
        p.grad = torch.ones(3)
        opt.update_hessian()  # h = 1
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
    oa.step(bs=5)
    ob.step()
    assert torch.equal(a, b) and not torch.equal(a, torch.zeros(3))


def test_should_update_hessian_follows_k():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.Sophia([p], k=3)
    seen = []
    for _ in range(7):
        p.grad = torch.ones(2)
        opt.step()
        seen.append(opt.should_update_hessian())
        if seen[-1]:
            opt.update_hessian()
    assert seen == [False, False, True, False, False, True, False]


def quadratic_hessian_diagonal_estimates(samples, seed=0):
    torch.manual_seed(seed)
    a = torch.randn(6, 6)
    a = a @ a.T + torch.eye(6)
    x = torch.nn.Parameter(torch.randn(6))
    opt = optim.Sophia([x], betas=(0.9, 0.0), estimator="hutchinson", seed=seed)
    total = torch.zeros(6)
    for _ in range(samples):
        x.grad = None
        (0.5 * x @ a @ x).backward(create_graph=True)
        opt.update_hessian()  # beta2 = 0: hessian = z * Hz, one sample
        total += opt.state[x]["hessian"]
    return total / samples, a.diagonal()


def test_hutchinson_converges_to_the_quadratic_hessian_diagonal():
    errors = []
    for samples in (10, 4000):
        estimate, exact = quadratic_hessian_diagonal_estimates(samples)
        errors.append(((estimate - exact).norm() / exact.norm()).item())
    assert errors[1] < 0.05 < errors[0] or errors[1] < errors[0] / 5, errors


def test_hutchinson_matches_an_mlp_hessian_diagonal():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(vector):
        chunks, offset = [], 0
        for shape in shapes:
            n = torch.Size(shape).numel()
            chunks.append(vector[offset:offset + n].reshape(shape))
            offset += n
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return F.mse_loss(h @ chunks[2].T + chunks[3], y)

    exact = torch.autograd.functional.hessian(loss_of, flat).diagonal()
    opt = optim.Sophia(params, betas=(0.9, 0.0), estimator="hutchinson", seed=1)
    total = torch.zeros_like(flat)
    samples = 3000
    for _ in range(samples):
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward(create_graph=True)
        opt.update_hessian()
        total += torch.cat([opt.state[p]["hessian"].reshape(-1) for p in params])
    estimate = total / samples
    assert ((estimate - exact).norm() / exact.norm()).item() < 0.1


def test_hutchinson_under_a_grad_scaler_divides_the_scale_out():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    hessians = []
    for scale in (None, 2.0**10):
        x = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        opt = optim.Sophia([x], betas=(0.9, 0.0), estimator="hutchinson", seed=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        loss = 0.5 * x @ a @ x
        (scaler.scale(loss) if scaler else loss).backward(create_graph=True)
        opt.update_hessian(scaler=scaler)
        hessians.append(opt.state[x]["hessian"].clone())
    assert torch.allclose(hessians[0], hessians[1])


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_update_hessian_reads_the_scale_as_a_tensor(monkeypatch, estimator):
    # get_scale() returns a Python float: on CUDA a host sync. update_hessian must not call it once
    # the scaler holds its scale as a tensor.
    x = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = optim.Sophia([x], estimator=estimator, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    loss = scaler.scale((x * x).sum())
    monkeypatch.setattr(scaler, "get_scale", lambda: pytest.fail("update_hessian read the scale on the host"))
    loss.backward(create_graph=estimator == "hutchinson")
    opt.update_hessian(scaler=scaler)
    assert opt.state[x]["hessian"].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_hutchinson_draws_on_the_params_device_and_follows_the_seed(device):
    hessians = []
    for _ in range(2):
        x = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)).to(device))
        opt = optim.Sophia([x], betas=(0.9, 0.0), estimator="hutchinson", seed=11)
        (x.pow(3).sum()).backward(create_graph=True)
        opt.update_hessian()
        hessians.append(opt.state[x]["hessian"].clone())
        assert list(opt._generators) == [x.device]
    assert torch.equal(hessians[0], hessians[1])


def test_hutchinson_without_a_graph_says_what_to_do():
    p = torch.nn.Parameter(torch.randn(3))
    opt = optim.Sophia([p], estimator="hutchinson")
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.update_hessian()


def test_gnb_estimate_of_a_softmax_model_matches_the_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 5))
    x = torch.randn(16, 5)
    opt = optim.Sophia([w], betas=(0.9, 0.0))
    loss = optim.gnb_loss(x @ w.T, generator=torch.Generator().manual_seed(7))
    loss.backward()
    opt.update_hessian()
    # By hand: the same labels, d CE / d logits = (softmax - onehot) / batch.
    with torch.no_grad():
        probs = F.softmax(x @ w.T, dim=-1)
        labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
        grad = (probs - F.one_hot(labels, 3).float()).T @ x / 16
    assert torch.allclose(opt.state[w]["hessian"], grad * grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [optim.Lion, optim.Sophia], ids=["lion", "sophia"])
def test_grad_scaler_inf_step_changes_nothing(device, cls):
    model = torch.nn.Linear(8, 4).to(device)
    opt = cls(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(16, 8, device=device)

    def scaled_step(poison):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if poison:
            model.weight.grad[0, 0] = float("nan")
        scaler.step(opt)
        if cls is optim.Sophia:
            opt.update_hessian(scaler=scaler)  # the same scaled grads as a GNB pass would have
        scaler.update()

    scaled_step(False)
    params_before = [p.detach().clone() for p in model.parameters()]
    states_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    scaled_step(True)
    for p, before, state in zip(model.parameters(), params_before, states_before):
        assert torch.equal(p, before)
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[key]), f"{key} changed on a skipped step"


@pytest.mark.parametrize("cls,kwargs,after", [
    (optim.Lion, dict(lr=1e-2, weight_decay=0.1), None),
    (optim.Sophia, dict(lr=1e-2, rho=0.05), hessian_updates),
], ids=["lion", "sophia"])
def test_state_dict_round_trip_continues_identically(cls, kwargs, after):
    params = make_params("cpu", torch.float32)
    grads = [make_grads(params, s) for s in range(8)]
    full_p, full = run(lambda ps: cls(ps, **kwargs), params, grads, after)
    mid_p, mid = run(lambda ps: cls(ps, **kwargs), params, grads[:4], after)
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in mid_p]
    resumed = cls(resumed_p, **kwargs)
    resumed.load_state_dict(copy.deepcopy(mid.state_dict()))
    for s, gs in enumerate(grads[4:], start=4):
        for p, g in zip(resumed_p, gs):
            p.grad = None if g is None else g.clone()
        resumed.step()
        if after is not None:
            after(resumed, resumed_p, s)
    for p, q in zip(resumed_p, full_p):
        assert torch.equal(p, q)
        for key in full.state.get(q, {}):
            assert torch.equal(resumed.state[p][key], full.state[q][key]), key


@pytest.mark.parametrize("make,match", [
    (lambda p: optim.Lion(p, lr=-1.0), "lr"),
    (lambda p: optim.Lion(p, betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda p: optim.Sophia(p, rho=-0.1), "rho"),
    (lambda p: optim.Sophia(p, k=0), "k must be"),
    (lambda p: optim.Sophia(p, estimator="exact"), "estimator"),
    (lambda p: optim.Sophia(p, bs=0), "bs must be"),
])
def test_bad_arguments_raise_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(2))])


def test_op_errors_name_the_argument():
    p, g, m, s = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.zeros(())
    with pytest.raises(RuntimeError, match=r"hessians\[0\] has shape"):
        ops.fused_sophia_([p], [g], [m], [torch.zeros(5)], [s], lr=1e-3, beta1=0.9, rho=0.04, bs=1.0,
                          weight_decay=0.0, maximize=False)
    with pytest.raises(RuntimeError, match="unclipped must be an int64"):
        ops.fused_sophia_([p], [g], [m], [m.clone()], [s], lr=1e-3, beta1=0.9, rho=0.04, bs=1.0,
                          weight_decay=0.0, maximize=False, unclipped=torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"estimates\[0\] has shape|hessians\[0\] has shape"):
        ops.fused_sophia_hessian_([torch.zeros(3)], [g], beta2=0.99, square=True)
    with pytest.raises(RuntimeError, match="beta2"):
        ops.fused_lion_([p], [g], [m], [s], lr=1e-3, beta1=0.9, beta2=1.0, weight_decay=0.0, maximize=False)
    assert p.abs().sum() == 0 and s.item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    def lists(dtype=torch.float32):
        return [torch.randn(n, device=device, dtype=dtype) for n in (3, 0, 70)]

    steps = lambda: [torch.zeros((), device=device) for _ in range(3)]
    amp = dict(grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0, device=device))
    torch.library.opcheck(torch.ops.dldna_fused.fused_lion_.default, [lists(), lists(), lists(), steps()],
                          dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False, **amp))
    torch.library.opcheck(
        torch.ops.dldna_fused.fused_sophia_.default,
        [lists(torch.bfloat16), lists(torch.bfloat16), lists(), [x.abs() for x in lists()], steps()],
        dict(lr=1e-3, beta1=0.9, rho=0.04, bs=2.0, weight_decay=0.1, maximize=True,
             unclipped=torch.zeros(1, dtype=torch.int64, device=device), **amp))
    torch.library.opcheck(torch.ops.dldna_fused.fused_sophia_hessian_.default, [[x.abs() for x in lists()], lists()],
                          dict(beta2=0.99, square=True, **amp))


def test_the_chapters_sophia_call_works():
    model = torch.nn.Linear(4, 3)
    opt = optim.Sophia(params=model.parameters(), lr=1e-3, betas=(0.965, 0.99), rho=0.04, weight_decay=0.0, k=10)
    x = torch.randn(8, 4)
    for _ in range(10):
        F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
        opt.step(bs=8)
        opt.zero_grad()
    assert opt.should_update_hessian()
    optim.gnb_loss(model(x)).backward()
    opt.update_hessian()
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())
    assert not opt.should_update_hessian()
