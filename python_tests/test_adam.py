"""Fused Adam/AdamW against the reference loop and torch.optim: parity over many steps for every
dtype and flag, state_dict interchange, GradScaler, schedulers, argument errors, opcheck and
torch.compile."""

import copy
import math

import pytest
import torch

import dldna_fused
from dldna_fused import ops, optim, reference
from conftest import DEVICES, FP32_RTOL, LOW_PRECISION_FACTOR, fp32_tolerance, relative_error
from parity import STEPS, assert_low_precision_within_factor, assert_same_state, make_grads, make_params, run

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


FLAGS = [
    pytest.param(dict(), id="adam"),
    pytest.param(dict(weight_decay=0.1), id="adam-l2"),
    pytest.param(dict(weight_decay=0.1, decoupled_weight_decay=True), id="adamw"),
    pytest.param(dict(amsgrad=True, weight_decay=0.05), id="amsgrad-l2"),
    pytest.param(dict(amsgrad=True, maximize=True, weight_decay=0.1, decoupled_weight_decay=True), id="adamw-amsgrad-maximize"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("many", [False, True], ids=["mixed-shapes", "300-tensors"])
def test_fp32_parity_with_reference_and_torch(device, flags, many):
    params = make_params(device, torch.float32, many)
    grads = [make_grads(params, s) for s in range(STEPS)]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), **flags)
    fused_p, fused = run(lambda ps: optim.Adam(ps, **kwargs), params, grads)
    ref_p, ref = run(lambda ps: reference.Adam(ps, **kwargs), params, grads)
    torch_p, torch_opt = run(lambda ps: torch.optim.Adam(ps, foreach=False, **kwargs), params, grads)
    assert_same_state(fused, ref, fused_p, ref_p)
    assert_same_state(fused, torch_opt, fused_p, torch_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", FLAGS[2:4])
@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=["bf16", "fp16", "bf16-fp32-states", "fp16-fp32-states"],
)
def test_low_precision_error_within_2x_of_torch(device, flags, dtype, state_dtype):
    params = make_params(device, dtype)
    grads = [make_grads(params, s) for s in range(STEPS)]
    # eps=1e-8 underflows to 0 in fp16 states, and torch's fp16 run then divides by zero (NaN);
    # 1e-4 is what fp16 training uses, and gives torch a finite error to compare with.
    eps = 1e-4 if dtype == torch.float16 else 1e-8
    kwargs = dict(lr=1e-3, eps=eps, **flags)
    fused_p, fused = run(lambda ps: optim.Adam(ps, state_dtype=state_dtype, **kwargs), params, grads)
    exact_p, _ = run(lambda ps: reference.Adam(ps, **kwargs), [p.double() for p in params],
                     [[None if g is None else g.double() for g in gs] for gs in grads])
    torch_p, _ = run(lambda ps: torch.optim.Adam(ps, foreach=False, **kwargs), params, grads)
    assert_low_precision_within_factor(fused_p, exact_p, torch_p, dtype)
    for p in fused_p:
        if p in fused.state:
            expected = state_dtype or dtype
            assert all(fused.state[p][k].dtype == expected for k in ("exp_avg", "exp_avg_sq"))
            assert fused.state[p]["step"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_state_dict_round_trip_with_torch_adamw(device, direction):
    params = make_params(device, torch.float32)
    grads = [make_grads(params, s) for s in range(8)]
    ours_cls = lambda ps: optim.AdamW(ps, lr=1e-2, amsgrad=True)
    torch_cls = lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True)
    first, second = (ours_cls, torch_cls) if direction == "ours-to-torch" else (torch_cls, ours_cls)

    # The uninterrupted run with the first optimizer...
    full_p, full = run(first, params, grads)
    # ...against 4 steps of the first, a checkpoint, and 4 steps of the second.
    mid_p, mid = run(first, params, grads[:4])
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in mid_p]
    resumed = second(resumed_p)
    resumed.load_state_dict(copy.deepcopy(mid.state_dict()))
    assert resumed.param_groups[0].keys() == mid.param_groups[0].keys()
    for gs in grads[4:]:
        for p, g in zip(resumed_p, gs):
            p.grad = None if g is None else g.clone()
        resumed.step()
    assert_same_state(resumed, full, resumed_p, full_p, steps=8)


def test_param_groups_and_state_dict_layout_match_torch():
    p = [torch.nn.Parameter(torch.randn(3))]
    for ours, theirs in ((optim.Adam(p), torch.optim.Adam(p)), (optim.AdamW(p), torch.optim.AdamW(p))):
        assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()
        assert {k: v for k, v in ours.defaults.items()} == theirs.defaults
    ours = optim.AdamW(p, state_dtype=torch.float32)
    assert ours.param_groups[0]["state_dtype"] is torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_skips_inf_steps_and_then_matches(device):
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 4).to(device)
    twin = copy.deepcopy(model)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    twin_opt = reference.AdamW(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x, y = torch.randn(16, 8, device=device), torch.randn(16, 4, device=device)

    def scaled_step(poison):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    def twin_step():
        twin_opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        twin_opt.step()

    scaled_step(False)
    twin_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    scaled_step(True)  # inf: everything must stay as it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, states_before[id(p)][k]), f"state {k} changed on a skipped step"
    assert scaler.get_scale() == 2.0**9
    scaled_step(False)  # finite again: proceeds as if the inf step never happened
    twin_step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert relative_error(p, q) <= 1e-5  # the twin runs unscaled grads: scaling rounds differently
        assert opt.state[p]["step"].item() == 2


def test_lr_scheduler_closure_and_tensor_lr_match_torch():
    params = make_params("cpu", torch.float32)
    grads_per_step = [make_grads(params, s) for s in range(6)]
    results = []
    for cls, lr in ((optim.AdamW, 1e-2), (torch.optim.AdamW, 1e-2), (optim.AdamW, torch.tensor(1e-2))):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(ps, lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for s, grads in enumerate(grads_per_step):

            def closure(grads=grads, s=s):
                opt.zero_grad()
                for p, g in zip(ps, grads):
                    p.grad = g
                return torch.tensor(float(s))

            assert opt.step(closure).item() == float(s)
            sched.step()
        results.append(ps)
    for ours, theirs in ((results[0], results[1]), (results[2], results[1])):
        for p, q in zip(ours, theirs):
            assert relative_error(p, q) <= fp32_tolerance(p.numel(), 6)


def test_amsgrad_switched_on_mid_training_creates_its_state():
    p = torch.nn.Parameter(torch.randn(5))
    opt = optim.Adam([p])
    p.grad = torch.randn(5)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    opt.step()
    assert "max_exp_avg_sq" in opt.state[p]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(foreach=True), "foreach=True"),
        (dict(differentiable=True), "differentiable=True"),
        (dict(fused=False), "fused=False"),
        (dict(state_dtype=torch.float16), "state_dtype"),
    ],
    ids=["lr", "beta1", "beta2", "eps", "weight_decay", "foreach", "differentiable", "fused-false", "state-dtype"],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.AdamW([torch.nn.Parameter(torch.randn(2))], **kwargs)


@pytest.mark.parametrize(
    "param,match",
    [
        (torch.nn.Parameter(torch.randn(2, dtype=torch.complex64)), "complex"),
        (torch.nn.Parameter(torch.randn(2, dtype=torch.float64)), "float32, bfloat16 or float16"),
    ],
    ids=["complex", "float64"],
)
def test_unsupported_params_are_rejected_at_construction(param, match):
    with pytest.raises(ValueError, match=match):
        optim.Adam([param])


def test_sparse_grad_raises_and_leaves_every_param_untouched():
    dense = torch.nn.Parameter(torch.randn(4))
    emb = torch.nn.Parameter(torch.randn(5, 3))
    opt = optim.Adam([{"params": [dense]}, {"params": [emb]}])
    dense.grad = torch.randn(4)
    emb.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 3), (5, 3))
    before = dense.detach().clone(), emb.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(emb, before[1])
    assert len(opt.state[dense]) == 0 or opt.state[dense]["step"].item() == 0


def test_op_errors_name_the_argument_and_change_nothing():
    p, g, m, v, s = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.zeros(4), torch.zeros(())
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
              decoupled_weight_decay=True)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        ops.fused_adam_([p], [torch.ones(5)], [m], [v], [], [s], **kw)
    with pytest.raises(RuntimeError, match=r"exp_avgs must have the params. dtype"):
        ops.fused_adam_([p], [g], [m.half()], [v], [], [s], **kw)
    with pytest.raises(RuntimeError, match="state_steps"):
        ops.fused_adam_([p], [g], [m], [v], [], [torch.zeros(2)], **kw)
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs"):
        ops.fused_adam_([p], [g], [m], [v], [], [s], **{**kw, "amsgrad": True})
    with pytest.raises(RuntimeError, match="beta2"):
        ops.fused_adam_([p], [g], [m], [v], [], [s], **{**kw, "beta2": 1.5})
    assert p.abs().sum() == 0 and s.item() == 0 and m.abs().sum() == 0


def _op_samples(device):
    def lists(n, dtype=torch.float32):
        return [torch.randn(k, device=device, dtype=dtype) for k in n]

    sizes = (3, 0, 70)
    base = dict(beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, maximize=False, decoupled_weight_decay=True)
    steps = lambda: [torch.zeros((), device=device) for _ in sizes]
    yield ([lists(sizes), lists(sizes), lists(sizes), [x.abs() for x in lists(sizes)], [], steps()],
           dict(lr=1e-3, amsgrad=False, **base))
    yield ([lists(sizes, torch.bfloat16), lists(sizes, torch.bfloat16), lists(sizes), [x.abs() for x in lists(sizes)],
            [x.abs() for x in lists(sizes)], steps()],
           dict(lr=torch.tensor(1e-3, device=device), amsgrad=True, grad_scale=torch.tensor(4.0, device=device),
                found_inf=torch.tensor(0.0, device=device), **base))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args, kwargs in _op_samples(device):
        overload = (torch.ops.dldna_fused.fused_adam_.tensor_lr if isinstance(kwargs["lr"], torch.Tensor)
                    else torch.ops.dldna_fused.fused_adam_.default)
        torch.library.opcheck(overload, args, kwargs)


def test_op_compiles_with_fullgraph_and_matches_eager():
    def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps):
        ops.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-2, beta1=0.9, beta2=0.999,
                        weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=True)

    def fresh():
        torch.manual_seed(3)
        sizes = (5, 130)
        return ([torch.randn(n) for n in sizes], [torch.randn(n) for n in sizes], [torch.zeros(n) for n in sizes],
                [torch.zeros(n) for n in sizes], [torch.zeros(()) for _ in sizes])

    eager, compiled = fresh(), fresh()
    compiled_step = torch.compile(adamw_step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        adamw_step(*eager)
        compiled_step(*compiled)
    for a, b in zip(eager, compiled):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_compiled_optimizer_step_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    opt, twin_opt = optim.AdamW(model.parameters(), lr=1e-2), optim.AdamW(twin.parameters(), lr=1e-2)
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    x = torch.randn(7, 6)
    for _ in range(3):
        for m, o in ((model, None), (twin, None)):
            m.zero_grad()
            m(x).square().mean().backward()
        compiled_step()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_zero_grad_and_params_without_grads_keep_their_own_step_counts():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = optim.Adam([a, b])
    for s in range(5):
        opt.zero_grad()
        a.grad = torch.randn(3)
        if s % 2 == 0:
            b.grad = torch.randn(3)
        opt.step()
    assert opt.state[a]["step"].item() == 5
    assert opt.state[b]["step"].item() == 3


def test_load_state_dict_invalidates_cached_lists():
    p = torch.nn.Parameter(torch.randn(4))
    opt = optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(4)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.step()
    opt.load_state_dict(saved)
    opt.step()
    assert opt.state[p]["step"].item() == 2  # 1 from the checkpoint + 1, not 3


def test_bias_corrections_match_double_precision_over_long_runs():
    # At step 10^5, 1 - beta2^t in fp32 would lose digits; the kernel computes it in double.
    p = torch.nn.Parameter(torch.ones(8))
    opt, ref = optim.Adam([p], lr=1e-3), reference.Adam([q := torch.nn.Parameter(torch.ones(8))], lr=1e-3)
    p.grad, q.grad = torch.full((8,), 0.5), torch.full((8,), 0.5)
    for o in (opt, ref):
        o.step()
        state = o.state[p if o is opt else q]
        state["step"].fill_(1e5)
    opt.step()
    ref.step()
    assert relative_error(p, q) <= fp32_tolerance(p.numel(), 2)
    assert not math.isnan(p.sum().item())


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Lion", "Sophia"])
def test_references_keep_fp32_states_of_bf16_params_through_a_load(name):
    """torch.optim's load casts states to the param's dtype; the references with state_dtype take
    them back unrounded, as the fused classes do."""
    from dldna_fused import reference

    cls = getattr(reference, name)
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    p.grad = torch.randn(64).bfloat16()
    opt = cls([p], state_dtype=torch.float32)
    opt.step()
    fresh = cls([p], state_dtype=torch.float32)
    fresh.load_state_dict(opt.state_dict())
    for key, value in opt.state[p].items():
        if key != "step":
            assert fresh.state[p][key].dtype == torch.float32, key
            torch.testing.assert_close(fresh.state[p][key], value, atol=0, rtol=0)
