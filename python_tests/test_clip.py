"""Fused gradient clipping (issue 18): the multi-tensor norm op, the clip_grad_norm_ drop-in, and
max_grad_norm folded into every optimizer's step."""

import copy

import pytest
import torch

import dldna_fused
from conftest import DEVICES, relative_error
from dldna_fused import ops, optim

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = {"l1": 1.0, "l2": 2.0, "inf": float("inf"), "l3": 3.0}


def _grads(device, dtype, many=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37 + i % 5,) for i in range(500)] if many else [(1,), (4097,), (0,), (3, 1, 5), (17, 33), (70001,)]
    # Scaled so that fp16 L1 norms of ~80k elements stay below fp16's max in torch's per-tensor sums.
    grads = [(torch.randn(s, generator=gen) * 0.25).to(device=device, dtype=dtype) for s in shapes]
    if not many:
        grads.append(torch.randn(9, 6, generator=gen).to(device=device, dtype=dtype).t())  # non-contiguous
    return grads


def _params_with(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def _tolerance(dtype):
    return 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("many", [False, True], ids=["odd-shapes", "500-tensors"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clipping", "not-clipping"])
def test_clip_grad_norm_matches_torch(device, dtype, norm, many, max_norm):
    dtype, norm_type = DTYPES[dtype], NORMS[norm]
    grads = _grads(device, dtype, many)
    ours, theirs = _params_with(grads), _params_with(grads)
    ours_norm = dldna_fused.clip_grad_norm_(ours, max_norm, norm_type)
    # torch's inf norm raises on a zero-size grad (no identity for max); ours counts it as empty.
    skip_empty = norm_type == float("inf")
    theirs_norm = torch.nn.utils.clip_grad_norm_([q for q in theirs if q.numel() or not skip_empty], max_norm,
                                                 norm_type)
    assert ours_norm.dtype == theirs_norm.dtype and ours_norm.device == theirs_norm.device
    torch.testing.assert_close(ours_norm.float(), theirs_norm.float(), rtol=_tolerance(dtype), atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=2 * _tolerance(dtype), atol=1e-7)


def test_the_fused_norm_is_more_accurate_than_fp32_summation():
    """fp32 lanes flushed into double partials: a 4M-element fp32 norm within 1e-7 of float64."""
    g = torch.randn(4_000_000) * 3
    exact = g.double().norm().item()
    assert abs(ops.fused_grad_norm([g], 2.0).item() - exact) / exact < 1e-7


@pytest.mark.parametrize("norm", ["l1", "l2", "inf"])
def test_norm_is_the_same_bits_for_any_thread_count(norm):
    grads = [torch.randn(n) for n in (1_000_003, 65_536, 7, 300_000)]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.fused_grad_norm(grads, NORMS[norm]))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


def test_no_grads_zero_size_and_empty_generator_as_torch():
    p = torch.nn.Parameter(torch.randn(3))
    assert torch.equal(dldna_fused.clip_grad_norm_([p], 1.0), torch.nn.utils.clip_grad_norm_([p], 1.0))
    z = torch.nn.Parameter(torch.zeros(0))
    z.grad = torch.zeros(0)
    assert dldna_fused.clip_grad_norm_([z], 1.0).item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        dldna_fused.clip_grad_norm_((q for q in []), 1.0)
    single = torch.nn.Parameter(torch.ones(4))
    single.grad = torch.full((4,), 2.0)
    assert dldna_fused.clip_grad_norm_(single, 1.0).item() == pytest.approx(4.0)  # a lone tensor
    assert torch.allclose(single.grad, torch.full((4,), 0.5), rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nonfinite_norm_raises_or_scales_as_torch(bad):
    grads = [torch.randn(5), torch.randn(3)]
    grads[1][1] = bad
    ours, theirs = _params_with(grads), _params_with(grads)
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        dldna_fused.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    ours_norm = dldna_fused.clip_grad_norm_(ours, 1.0)
    theirs_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(ours_norm, theirs_norm, equal_nan=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_the_op_checks_its_arguments_by_name():
    with pytest.raises(RuntimeError, match="norm_type must be 1, 2 or inf"):
        ops.fused_grad_norm([torch.randn(3)], 3.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype"):
        ops.fused_grad_norm([torch.randn(3), torch.randn(3, dtype=torch.float16)], 2.0)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        ops.fused_grad_norm([torch.randn(3, dtype=torch.float64)], 2.0)
    with pytest.raises(RuntimeError, match="grad_scale must be a float32 tensor of one element"):
        ops.fused_grad_norm([torch.randn(3)], 2.0, grad_scale=torch.ones(2))


def test_grad_scale_divides_the_norm():
    grads = [torch.randn(100) * 1024, torch.randn(7) * 1024]
    plain = ops.fused_grad_norm([g / 1024 for g in grads], 2.0)
    assert torch.equal(ops.fused_grad_norm(grads, 2.0, grad_scale=torch.tensor([1024.0])), plain)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_fused_scale_multiplies_every_tensor_in_place(device, dtype):
    grads = _grads(device, DTYPES[dtype], many=True) + _grads(device, DTYPES[dtype])
    expected = [g.float() * 0.37 for g in grads]
    ops.fused_scale_(grads, torch.tensor([0.37], device=device))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g.float(), e.to(g.dtype).float(), rtol=0, atol=0)


def test_opcheck_and_compile():
    grads = [torch.randn(5), torch.randn(3, 4)]
    for norm_type in (1.0, 2.0, float("inf")):
        torch.library.opcheck(torch.ops.dldna_fused.fused_grad_norm.default, (grads, norm_type), {})
    torch.library.opcheck(torch.ops.dldna_fused.fused_scale_.default, (grads, torch.tensor([0.5])), {})
    compiled = torch.compile(lambda gs: ops.fused_grad_norm(gs, 2.0) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(grads), ops.fused_grad_norm(grads, 2.0) * 2)


# ---- max_grad_norm folded into the step ---------------------------------------------------------

OPTIMIZERS = {
    "adam": (optim.Adam, dict(lr=0.1)),
    "adamw": (optim.AdamW, dict(lr=0.1, weight_decay=0.1)),
    "lion": (optim.Lion, dict(lr=0.01)),
    "sophia": (optim.Sophia, dict(lr=0.01, rho=0.5)),
    "adafactor": (optim.Adafactor, dict(lr=0.05, relative_step=False, beta1=0.9)),
}


def _two_groups(dtype):
    gen = torch.Generator().manual_seed(1)
    first = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(33, 17), (5,), (0,)]]
    second = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(4097,), (3, 1, 5)]]
    return first, second


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_folded_clipping_matches_clip_grad_norm_then_step(name, dtype, max_norm):
    dtype = DTYPES[dtype]
    cls, kwargs = OPTIMIZERS[name]
    kwargs = {**kwargs, "state_dtype": torch.float32} if dtype != torch.float32 and name != "adafactor" else kwargs
    first, second = _two_groups(dtype)
    folded_params = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in (first, second)]
    plain_params = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in (first, second)]
    folded = cls([{"params": g} for g in folded_params], max_grad_norm=max_norm, **kwargs)
    plain = cls([{"params": g} for g in plain_params], **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) * 3 for g in folded_params for p in g]
        for p, q, g in zip([p for g in folded_params for p in g], [q for g in plain_params for q in g], grads):
            p.grad, q.grad = g.clone(), g.clone()
        folded.step()
        expected_norm = torch.nn.utils.clip_grad_norm_([q for g in plain_params for q in g], max_norm)
        plain.step()
        torch.testing.assert_close(folded.last_grad_norm, expected_norm, rtol=1e-6, atol=0)
        # The folded step reads the clipped gradient but leaves p.grad as it was.
        for p, g in zip([p for g in folded_params for p in g], grads):
            assert torch.equal(p.grad, g)
    # bf16: the folded step multiplies the clip factor into the gradient in fp32, the recipe rounds
    # the clipped gradient to bf16 first; single elements then differ by an ulp (a sign for Lion),
    # so bf16 is compared per tensor by norm.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for p, q in zip([p for g in folded_params for p in g], [q for g in plain_params for q in g]):
        assert relative_error(p, q) <= tolerance
        for key in plain.state[q]:
            a, b = torch.as_tensor(folded.state[p][key]), torch.as_tensor(plain.state[q][key])
            assert relative_error(a, b) <= tolerance, key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_folded_clipping_with_grad_scaler_is_torch_recipe(name):
    """scaler.scale(loss).backward(); scaler.unscale_(opt); clip_grad_norm_; scaler.step(opt):
    the same params, and the norm of the unscaled gradients; an inf step skips everything."""
    cls, kwargs = OPTIMIZERS[name]
    start = torch.randn(64, 9)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    folded, plain = cls([a], max_grad_norm=0.3, **kwargs), cls([b], **kwargs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)]
    for step in range(3):
        weights = torch.randn(64, 9)
        if step == 1:
            weights[0, 0] = float("inf")
        for x in (a, b):
            x.grad = None
        scalers[0].scale((a * weights).sum()).backward()
        before = a.detach().clone()
        scalers[0].step(folded)
        scalers[0].update()
        scalers[1].scale((b * weights).sum()).backward()
        scalers[1].unscale_(plain)
        norm = torch.nn.utils.clip_grad_norm_([b], 0.3)
        scalers[1].step(plain)
        scalers[1].update()
        if step == 1:
            assert torch.equal(a, before)
        else:
            torch.testing.assert_close(folded.last_grad_norm, norm, rtol=1e-6, atol=0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_is_checked_and_only_in_param_groups_when_given():
    p = torch.nn.Parameter(torch.randn(3))
    assert "max_grad_norm" not in optim.AdamW([p]).param_groups[0]
    assert optim.AdamW([p], max_grad_norm=1.0).param_groups[0]["max_grad_norm"] == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            optim.Lion([p], max_grad_norm=bad)
    opt = optim.Adam([p], max_grad_norm=1.0)
    opt.param_groups[0]["max_grad_norm"] = "1"
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="param group 0: max_grad_norm must be a real number"):
        opt.step()


def test_state_dict_round_trip_keeps_max_grad_norm():
    p = torch.nn.Parameter(torch.randn(3))
    opt = optim.AdamW([p], max_grad_norm=0.25)
    p.grad = torch.ones(3)
    opt.step()
    fresh = optim.AdamW([p])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.param_groups[0]["max_grad_norm"] == 0.25


def test_every_optimizer_checks_max_grad_norm_at_step():
    for cls, kwargs in OPTIMIZERS.values():
        p = torch.nn.Parameter(torch.randn(3, 2))
        opt = cls([p], max_grad_norm=1.0, **kwargs)
        opt.param_groups[0]["max_grad_norm"] = -1.0
        p.grad = torch.ones(3, 2)
        with pytest.raises(ValueError, match="param group 0: max_grad_norm must be > 0"):
            opt.step()
        assert torch.equal(p.grad, torch.ones(3, 2))


def test_float64_grads_take_torchs_path_and_match_it():
    # The fused norm has no float64 kernel; it used to be handed float64 grads and raise.
    ours, theirs = (torch.nn.Parameter(torch.randn(7, dtype=torch.float64)) for _ in range(2))
    theirs.data.copy_(ours.data)
    ours.grad = torch.full((7,), 3.0, dtype=torch.float64)
    theirs.grad = ours.grad.clone()
    assert torch.equal(dldna_fused.clip_grad_norm_([ours], 1.0), torch.nn.utils.clip_grad_norm_([theirs], 1.0))
    torch.testing.assert_close(ours.grad, theirs.grad)
