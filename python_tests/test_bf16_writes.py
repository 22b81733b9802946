"""bf16_stochastic_round and kahan_sum (issue 25): every optimizer's fused kernels against the
references over the param zoo, the rounding's statistics, its determinism, the state_dict rules of
the compensation, and the errors ([Note: bf16 param writes] in csrc/common/rounding_math.h)."""

import copy
import math
import warnings

import pytest
import torch

from conftest import CUDA
from dldna_fused import _rounding, ops, optim, reference
from param_zoo import zoo, zoo_grads
from test_param_zoo import OPTIMIZERS, _run

STEPS = 3
MODES = {"stochastic": dict(bf16_stochastic_round=True, seed=1234), "kahan": dict(kahan_sum=True)}
# The options under which the fused step and the reference compute the same fp32 values: fp32
# states where the class has a state_dtype (the references' bf16-state math rounds m and v first).
FP32_STATES = {"adam", "adamw", "lion", "sophia"}


def _float_states(opt, p):
    return {k: v for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor) and k != "step"}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype_name", ["bf16", "mixed"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_writes_match_the_reference(name, dtype_name, mode):
    fused_cls, ref_cls, kwargs, _ = OPTIMIZERS[name]
    kwargs = dict(kwargs, **MODES[mode])
    if name in FP32_STATES:
        kwargs["state_dtype"] = torch.float32
    starts = zoo(dtype_name)
    grads = zoo_grads(starts, STEPS)
    ours, ours_opt = _run(fused_cls, kwargs, starts, grads)
    theirs, ref_opt = _run(ref_cls, kwargs, starts, grads)
    differing = total = 0
    for i, (p, q) in enumerate(zip(ours, theirs)):
        where = f"{name} {mode} {dtype_name}: param {i} {tuple(p.shape)} {p.dtype}"
        if p.dtype == torch.bfloat16:
            # The same fp32 value and the same random bits give the same bf16 write; an fp32
            # rounding difference moves a write by one ulp, rarely (never, measured).
            diff = (p.float() - q.float()).abs()
            assert bool((diff <= 2 ** -7 * q.float().abs() + 1e-30).all()), f"{where}: more than an ulp apart"
            differing += int((diff > 0).sum())
            total += p.numel()
        else:
            # Other dtypes are written to nearest, as without the option.
            eps = torch.finfo(p.dtype).eps
            assert bool(((p.double() - q.double()).abs() <= 4 * eps * q.double().abs() + 1e-6).all()), where
        s, t = _float_states(ours_opt, p), _float_states(ref_opt, q)
        assert set(s) == set(t), f"{where}: state keys {sorted(s)} vs {sorted(t)}"
        want_comp = mode == "kahan" and p.dtype == torch.bfloat16
        assert ("kahan_comp" in s) == want_comp, f"{where}: kahan_comp present: {'kahan_comp' in s}"
        for key in s:
            a, b = s[key], t[key]
            if a.dtype == torch.uint8:
                assert not a.numel() or int((a.int() - b.int()).abs().max()) <= 1, f"{where} {key}"
            elif key == "kahan_comp":
                # What a write lost: at most half an ulp of the param, equal up to fp32 rounding.
                # Compared as p + c: where an fp32 rounding difference put the value on the other
                # side of a rounding midpoint (a differing write, counted above), p and c each move
                # by an ulp and their sum does not.
                x, y = p.detach().float(), q.detach().float()
                totals = ((x + a.float()) - (y + b.float())).abs()
                assert bool((totals <= 2 ** -8 * y.abs() + 1e-30).all()), f"{where} {key}: p + c"
            elif a.numel():
                # fp32 states: the same fp32 math, up to its rounding; where the reference squares a
                # low-precision grad in its dtype first (Sophia's GNB estimate), to that dtype's eps.
                rtol = 1e-4 if p.dtype == torch.float32 else 2 * torch.finfo(p.dtype).eps
                scale = b.float().abs().max().item()
                assert (a.float() - b.float()).abs().max().item() <= rtol * scale + 1e-12, f"{where} {key}"
    assert differing <= max(1, total // 1000), f"{name} {mode} {dtype_name}: {differing} of {total} writes differ"


# ---- the rounding itself -------------------------------------------------------------------------------

def _lion_step(p0: float, fractions, n: int, *, steps: int = 1, **options):
    """bf16 params at p0 (one group per fraction, n elements each), stepped by Lion with grad sign(p0)
    and lr = fraction * the bf16 ulp just below |p0| = 1: each step moves |p| down by that much."""
    ulp = 2.0 ** -8
    params = [torch.nn.Parameter(torch.full((n,), p0, dtype=torch.bfloat16)) for _ in fractions]
    opt = optim.Lion([{"params": [p], "lr": f * ulp} for p, f in zip(params, fractions)], **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.full_like(p, math.copysign(1.0, p0))
        opt.step()
    return params


@pytest.mark.parametrize("p0", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased(p0):
    fractions = (0.1, 0.37, 0.5, 0.83)
    n = 1 << 17
    for p, f in zip(_lion_step(p0, fractions, n, bf16_stochastic_round=True, seed=7), fractions):
        values = p.float()
        lower, upper = math.copysign(1 - 2 ** -8, p0), p0
        assert bool(((values == lower) | (values == upper)).all()), "only the two neighbours are written"
        # P(the lower neighbour) is the distance from the upper one, in ulps: f.
        share = (values == lower).float().mean().item()
        se = math.sqrt(f * (1 - f) / n)
        assert abs(share - f) <= 5 * se, f"p0={p0} f={f}: {share:.5f} rounded down, expected {f} (SE {se:.2g})"


def test_nearest_stalls_where_stochastic_rounding_moves():
    # lr of a third of an ulp: round to nearest never moves the param, stochastic rounding moves its
    # mean by lr per step, and Kahan summation moves p + c by exactly that.
    fractions = (1 / 3,)
    n, steps = 1 << 14, 30
    (nearest,) = _lion_step(1.0, fractions, n, steps=steps)
    (stochastic,) = _lion_step(1.0, fractions, n, steps=steps, bf16_stochastic_round=True, seed=3)
    expected = 1 - steps * 2 ** -8 / 3
    assert bool((nearest.float() == 1.0).all())
    se = 2 ** -8 * math.sqrt(steps / 4 / n)  # each step's rounding adds at most a Bernoulli's variance
    assert abs(stochastic.float().mean().item() - expected) <= 6 * se
    params = [torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))]
    opt = optim.Lion(params, lr=2 ** -8 / 3, kahan_sum=True)
    for _ in range(steps):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
    total = params[0].float() + opt.state[params[0]]["kahan_comp"].float()
    assert abs(total.mean().item() - expected) <= 1e-4


def test_python_bits_match_the_kernels():
    # The reference's random bits (torch int64 arithmetic) are the kernels' (uint32 C++): stepping
    # one param by exactly zero update leaves it, and a Lion step of lr/3 ulp writes what
    # _rounding.stochastic_round predicts, element by element.
    n = 4099  # vector body and scalar tail
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = optim.Lion([p], lr=2 ** -8 / 3, bf16_stochastic_round=True, seed=99)
    p.grad = torch.ones_like(p)
    opt.step()
    key = _rounding.param_key(99, 0, 0)
    predicted = _rounding.stochastic_round(torch.full((n,), 1 - 2 ** -8 / 3), key, 1.0)
    assert torch.equal(p.detach(), predicted)


# ---- determinism -----------------------------------------------------------------------------------

def _adamw_run(params_data, steps=3, *, threads=None, **options):
    params = [torch.nn.Parameter(t.clone()) for t in params_data]
    opt = optim.AdamW(params, lr=1e-3, **options)
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
    finally:
        torch.set_num_threads(before)
    return params, opt


def test_stochastic_rounding_is_the_same_for_any_thread_count():
    data = [torch.randn(300_001).bfloat16(), torch.randn(70, 33).bfloat16()]
    one, _ = _adamw_run(data, threads=1, bf16_stochastic_round=True, seed=5)
    two, _ = _adamw_run(data, threads=2, bf16_stochastic_round=True, seed=5)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    other, _ = _adamw_run(data, threads=2, bf16_stochastic_round=True, seed=6)
    assert not torch.equal(one[0], other[0]), "another seed draws other bits"


def test_stochastic_rounding_is_the_same_for_any_launch_split():
    # One op call over three params against three calls of one param each, with the same keys.
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, generator=g).bfloat16() for n in (5000, 17, 40_000)]
    grads = [torch.randn(t.shape, generator=g).bfloat16() for t in data]
    keys = [_rounding.param_key(3, 0, i) for i in range(3)]

    def run(split):
        params = [t.clone() for t in data]
        ms = [torch.zeros(t.shape) for t in data]
        vs = [torch.zeros(t.shape) for t in data]
        steps = [torch.zeros(()) for _ in data]
        calls = [[0], [1], [2]] if split else [[0, 1, 2]]
        for idx in calls:
            ops.fused_adam_([params[i] for i in idx], [grads[i] for i in idx], [ms[i] for i in idx],
                            [vs[i] for i in idx], [], [steps[i] for i in idx], lr=1e-2, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                            decoupled_weight_decay=True, sr_keys=[keys[i] for i in idx])
        return params

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_seed_round_trips_through_the_state_dict():
    data = [torch.randn(1000).bfloat16()]
    straight, _ = _adamw_run(data, steps=5, bf16_stochastic_round=True, seed=11)
    first, opt = _adamw_run(data, steps=2, bf16_stochastic_round=True, seed=11)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["seed"] == 11
    resumed = [torch.nn.Parameter(first[0].detach().clone())]
    opt2 = optim.AdamW(resumed, lr=1e-3, bf16_stochastic_round=True, seed=999)
    opt2.load_state_dict(saved)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        grad = torch.randn(resumed[0].shape, generator=g).bfloat16()
        if step >= 2:
            resumed[0].grad = grad
            opt2.step()
    assert torch.equal(resumed[0], straight[0])


def test_default_seed_is_torchs_without_drawing():
    torch.manual_seed(4321)
    expected = torch.rand(3)
    torch.manual_seed(4321)
    opt = optim.Adam([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], bf16_stochastic_round=True)
    assert opt.param_groups[0]["seed"] == 4321
    assert torch.equal(torch.rand(3), expected), "the optimizer left the random stream as it was"
    plain = optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    assert "seed" not in plain.param_groups[0] and "bf16_stochastic_round" not in plain.param_groups[0]


def test_other_dtypes_are_written_as_always():
    data = [torch.randn(257), torch.randn(257).half()]
    plain, _ = _adamw_run(data)
    for options in MODES.values():
        written, opt = _adamw_run(data, **options)
        for a, b in zip(plain, written):
            assert torch.equal(a, b)
        assert all("kahan_comp" not in opt.state[p] for p in written)


# ---- Kahan summation: accuracy and the state_dict -----------------------------------------------------

def test_kahan_and_stochastic_rounding_track_fp32_at_a_small_lr():
    # 300 AdamW steps on a quadratic at lr 1e-4, where each update is 1/40 to 1/80 of a bf16 ulp:
    # round to nearest loses every update, Kahan keeps them (p + c holds ~16 bits), and stochastic
    # rounding keeps them on average, with its noise (an ulp times sqrt(steps / 40)).
    g = torch.Generator().manual_seed(0)
    start = torch.rand(4096, generator=g) + 0.5
    target = torch.zeros(4096)

    def run(dtype, **options):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = optim.AdamW([p], lr=1e-4, weight_decay=0.0, state_dtype=torch.float32 if dtype != torch.float32 else None,
                          **options)
        for _ in range(300):
            p.grad = (p.detach().float() - target).to(dtype)
            opt.step()
        value = p.detach().float()
        if options.get("kahan_sum"):
            value = value + opt.state[p]["kahan_comp"].float()
        return value - start.to(dtype).float()  # the distance moved (bf16 starts are rounded)

    exact = run(torch.float32)
    errors = {name: (run(torch.bfloat16, **options) - exact).abs().mean().item()
              for name, options in [("nearest", {}), *MODES.items()]}
    assert errors["nearest"] > 0.9 * 300 * 1e-4, errors  # stalled: the params did not move
    assert errors["kahan"] < errors["nearest"] / 50, errors
    assert errors["stochastic"] < errors["nearest"] / 2, errors


def _kahan_adamw(steps=2):
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = optim.AdamW([p], lr=1e-3, kahan_sum=True)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


def test_kahan_comp_round_trips_and_moves_to_torch_optim():
    p, opt = _kahan_adamw()
    saved = copy.deepcopy(opt.state_dict())
    assert "kahan_comp" in saved["state"][0]
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = optim.AdamW([q], lr=1e-3, kahan_sum=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(saved)
    assert torch.equal(opt2.state[q]["kahan_comp"], opt.state[p]["kahan_comp"])
    grad = torch.randn_like(p)
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q) and torch.equal(opt.state[p]["kahan_comp"], opt2.state[q]["kahan_comp"])
    # torch.optim takes the state_dict: it keeps the unknown key and steps as AdamW does.
    r = torch.nn.Parameter(p.detach().clone())
    theirs = torch.optim.AdamW([r], lr=1e-3)
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))
    r.grad = torch.randn_like(r)
    theirs.step()


def test_kahan_comp_missing_is_zero_filled_with_a_warning():
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    theirs = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    theirs.step()
    ours = optim.AdamW([p], lr=1e-3, kahan_sum=True)
    with pytest.warns(UserWarning, match="no 'kahan_comp'.*starts at zero"):
        ours.load_state_dict(theirs.state_dict())
    p.grad = torch.randn_like(p)
    ours.step()
    assert ours.state[p]["kahan_comp"].dtype == torch.bfloat16


def test_kahan_comp_is_dropped_with_a_warning_where_it_cannot_be_used():
    # A bf16 Kahan run resumed in fp32: the compensation has no use and goes, with a warning.
    p, opt = _kahan_adamw()
    q = torch.nn.Parameter(p.detach().float())
    resumed = optim.AdamW([q], lr=1e-3, kahan_sum=True)
    with pytest.warns(UserWarning, match="dropped the 'kahan_comp' state of 1 param"):
        resumed.load_state_dict(opt.state_dict())
    assert "kahan_comp" not in resumed.state[q]
    # kahan_sum switched off mid-run: the next step drops the stale compensation, which would be
    # wrong if it were switched on again later.
    opt.param_groups[0]["kahan_sum"] = False
    p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="param group 0: kahan_sum is off; dropped the 'kahan_comp' of 1 param"):
        opt.step()
    assert "kahan_comp" not in opt.state[p]
    p, opt = _kahan_adamw()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["kahan_comp"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"param group 0, params\[0\]: state 'kahan_comp' has shape \(3,\)"):
        optim.AdamW([p], lr=1e-3, kahan_sum=True).load_state_dict(bad)


def test_a_replaced_kahan_comp_is_checked_before_anything_moves():
    p, opt = _kahan_adamw()
    before = p.detach().clone()
    opt.state[p]["kahan_comp"] = torch.zeros(64)  # float32: not the param's dtype
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"params\[0\]: state 'kahan_comp' must have the param's shape"):
        opt.step()
    assert torch.equal(p, before)


# ---- errors --------------------------------------------------------------------------------------------

def test_option_errors_name_the_argument():
    p = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="bf16_stochastic_round=True and kahan_sum=True"):
        optim.AdamW(p, bf16_stochastic_round=True, kahan_sum=True)
    with pytest.raises(TypeError, match="kahan_sum must be a bool"):
        optim.Lion(p, kahan_sum="yes")
    with pytest.raises(TypeError, match="needs an int 'seed'"):
        optim.Adafactor(p, bf16_stochastic_round=True, seed=1.5)
    opt = optim.AdamW(p)
    opt.param_groups[0]["bf16_stochastic_round"] = True  # switched on without a seed
    p[0].grad = torch.ones_like(p[0])
    with pytest.raises(TypeError, match="param group 0: bf16_stochastic_round=True needs an int 'seed'"):
        opt.step()


def test_op_errors_name_the_list():
    def call(params, **writes):
        n = len(params)
        ops.fused_lion_(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                        [torch.zeros(()) for _ in range(n)], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                        maximize=False, **writes)

    fp32 = [torch.zeros(4)]
    bf16 = [torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="sr_keys were given for Float params; .* bfloat16 params only"):
        call(fp32, sr_keys=[1])
    with pytest.raises(RuntimeError, match="expected sr_keys to have one entry per param \\(2\\), got 1"):
        call(bf16, sr_keys=[1])
    with pytest.raises(RuntimeError, match=r"kahan_comps\[1\] has shape \[3\] but params\[1\] has shape \[2\]"):
        call(bf16, kahan_comps=[torch.zeros(4, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match="kahan_comps and sr_keys were both given"):
        call(bf16, kahan_comps=[torch.zeros_like(t) for t in bf16], sr_keys=[1, 2])


def test_step_in_backward_writes_the_same_bits():
    from dldna_fused.optim import step_in_backward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).bfloat16()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 16).bfloat16()
    opt = optim.AdamW(model.parameters(), lr=1e-3, bf16_stochastic_round=True, seed=2)
    opt_twin = optim.AdamW(twin.parameters(), lr=1e-3, bf16_stochastic_round=True, seed=2)
    handle = step_in_backward(twin, opt_twin, bucket_bytes=256)
    for _ in range(3):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        twin(x).float().pow(2).mean().backward()
    handle.remove()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["adamw", "lion", "sophia", "adafactor", "adamw8bit", "lion8bit"])
def test_cuda_writes_match_the_cpu(name, mode, device):
    # The same counter-based bits on the GPU: a CUDA step writes what the CPU step writes (Kahan: to
    # an ulp where an FMA rounds differently).
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    kwargs = dict(kwargs, **MODES[mode])
    starts = zoo("bf16")
    grads = zoo_grads(starts, STEPS)
    cpu, _ = _run(fused_cls, kwargs, starts, grads)
    gpu, _ = _run(fused_cls, kwargs, [[t.to(device) for t in group] for group in starts],
                  [[[None if g is None else g.to(device) for g in group] for group in step] for step in grads])
    differing = sum(int((a.float() != b.cpu().float()).sum()) for a, b in zip(cpu, gpu))
    total = sum(a.numel() for a in cpu)
    assert differing <= max(1, total // 1000), f"{differing} of {total} writes differ"


@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_step_writes_the_same_bits(mode):
    # Under torch.compile the op goes through its schema (a mutable optional list of compensations,
    # an optional int list of keys) and its fake kernel.
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    b = torch.nn.Parameter(a.detach().clone())
    eager, compiled = optim.AdamW([a], lr=1e-2, **MODES[mode]), optim.AdamW([b], lr=1e-2, **MODES[mode])
    step = torch.compile(compiled.step, backend="aot_eager")
    for _ in range(3):
        g = torch.randn(100, dtype=torch.bfloat16)
        a.grad, b.grad = g.clone(), g.clone()
        eager.step()
        step()
    assert torch.equal(a, b)
    if mode == "kahan":
        assert torch.equal(eager.state[a]["kahan_comp"], compiled.state[b]["kahan_comp"])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("option", ["grad_scaler", "max_grad_norm"])
def test_writes_with_grad_scaler_and_clipping(option, mode):
    # GradScaler (powers of two, so unscaling is exact) and the folded clip against the reference
    # with the grads clipped before its step: the same bf16 writes.
    from test_param_zoo import MAX_NORM

    kwargs = dict(lr=0.05, state_dtype=torch.float32, **MODES[mode])
    starts = zoo("bf16")
    grads = zoo_grads(starts, STEPS)
    if option == "grad_scaler":
        ours, _ = _run(optim.AdamW, kwargs, starts, grads, scaler=True)
        theirs, _ = _run(reference.AdamW, kwargs, starts, grads)
    else:
        ours, _ = _run(optim.AdamW, dict(kwargs, max_grad_norm=MAX_NORM), starts, grads)
        theirs, _ = _run(reference.AdamW, kwargs, starts, grads, clip=MAX_NORM)
    differing = sum(int((p.float() != q.float()).sum()) for p, q in zip(ours, theirs))
    total = sum(p.numel() for p in ours)
    # The reference clips grads rounded to bf16 element by element; ours clip inside the kernel in
    # fp32, so a write may land an ulp apart where that rounding moved the update.
    assert differing <= max(1, total // (1000 if option == "grad_scaler" else 20)), f"{differing} of {total}"


def test_a_step_that_fails_leaves_a_stale_comp_in_place():
    # kahan_sum switched off in group 0 and a bad option in group 1: the step raises before anything
    # moves, the compensation included; once fixed, the step drops it with its warning.
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = optim.AdamW([{"params": [p]}, {"params": [q]}], lr=1e-3, kahan_sum=True)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    comp = opt.state[p]["kahan_comp"]
    opt.param_groups[0]["kahan_sum"] = False
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 1"):
        opt.step()
    assert opt.state[p]["kahan_comp"] is comp
    opt.param_groups[1]["lr"] = 1e-3
    with pytest.warns(UserWarning, match="param group 0: kahan_sum is off"):
        opt.step()
    assert "kahan_comp" not in opt.state[p] and "kahan_comp" in opt.state[q]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,options", [
    ("adam", dict(maximize=True, amsgrad=True)), ("adamw", dict(tensor_lr=True)),
    ("adamw8bit", dict(maximize=True, tensor_lr=True)), ("lion", dict(maximize=True)),
])
def test_writes_with_the_other_flags(name, options, mode):
    # The writes under each op's other flags and overloads (amsgrad's extra state, the tensor-lr
    # overload of fused_adam_ and fused_adam_lowbit_), over the bf16 zoo, against the references.
    fused_cls, ref_cls, kwargs, _ = OPTIMIZERS[name]
    kwargs = dict(kwargs, **MODES[mode], **{k: v for k, v in options.items() if k != "tensor_lr"})
    if name in FP32_STATES:
        kwargs["state_dtype"] = torch.float32
    ours_kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"])) if options.get("tensor_lr") else kwargs
    starts = zoo("bf16")
    grads = zoo_grads(starts, STEPS)
    ours, _ = _run(fused_cls, ours_kwargs, starts, grads)
    theirs, _ = _run(ref_cls, kwargs, starts, grads)
    differing = sum(int((p.float() != q.float()).sum()) for p, q in zip(ours, theirs))
    assert differing <= max(1, sum(p.numel() for p in ours) // 1000), differing


@pytest.mark.parametrize("mode", list(MODES))
def test_a_param_listed_twice_is_written_twice_in_order(mode):
    # torch.optim warns and steps a duplicated param twice in sequence; the fused step runs the
    # second occurrence in a second call, with its own key, as the reference's second pass.
    def run(cls):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 300).bfloat16())
        with pytest.warns(UserWarning, match="duplicate"):
            opt = cls([p, p], lr=1e-2, state_dtype=torch.float32, **MODES[mode])
        for step in range(3):
            p.grad = torch.randn(300, generator=torch.Generator().manual_seed(step)).bfloat16()
            opt.step()
        return p, opt

    (a, fused), (b, ref) = run(optim.AdamW), run(reference.AdamW)
    assert int((a.float() != b.float()).sum()) <= 1
    if mode == "kahan":
        assert bool(((fused.state[a]["kahan_comp"].float() - ref.state[b]["kahan_comp"].float()).abs()
                     <= 2 ** -8 * b.float().abs() + 1e-30).all())


@pytest.mark.parametrize("mutation", ["clear", "del"])
def test_kahan_state_cleared_mid_run_starts_a_zero_comp(mutation):
    # torch.optim lets a user clear the state, or delete one param's, between steps; the next step
    # starts those states afresh. The compensation starts at zero with them, as in the reference.
    torch.manual_seed(0)
    data = [torch.randn(37, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)]
    kwargs = dict(lr=1e-2, kahan_sum=True, state_dtype=torch.float32)
    ps, rs = [torch.nn.Parameter(t.clone()) for t in data], [torch.nn.Parameter(t.clone()) for t in data]
    ours, ref = optim.AdamW(ps, **kwargs), reference.AdamW(rs, **kwargs)
    for step in range(4):
        for p, r in zip(ps, rs):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        ours.step()
        ref.step()
        if step == 1:
            for opt, params in ((ours, ps), (ref, rs)):
                if mutation == "clear":
                    opt.state.clear()
                else:
                    del opt.state[params[0]]
            assert all("kahan_comp" not in ours.state.get(p, {}) for p in (ps if mutation == "clear" else ps[:1]))
    for p, r in zip(ps, rs):
        assert ours.state[p]["step"].item() == ref.state[r]["step"].item()
        assert bool(((p.float() - r.float()).abs() <= 2 ** -7 * r.float().abs()).all())
        total, expected = p.float() + ours.state[p]["kahan_comp"].float(), r.float() + ref.state[r]["kahan_comp"].float()
        assert torch.allclose(total, expected, rtol=1e-4, atol=1e-6)
    # The cleared param's step count restarted with its states.
    assert ours.state[ps[0]]["step"].item() == 2


@pytest.mark.parametrize("mode", list(MODES))
def test_a_param_swapped_into_a_group_is_written_as_in_the_reference(mode):
    # torch.optim reads param_groups afresh on every step: a param put in another's place gets
    # that position's stochastic-rounding key and a fresh state (its compensation at zero).
    torch.manual_seed(1)
    data = [torch.randn(37, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)]
    new = torch.randn(37, dtype=torch.bfloat16)
    kwargs = dict(lr=1e-2, state_dtype=torch.float32, **MODES[mode])
    ps, rs = [torch.nn.Parameter(t.clone()) for t in data], [torch.nn.Parameter(t.clone()) for t in data]
    ours, ref = optim.AdamW(ps, **kwargs), reference.AdamW(rs, **kwargs)
    for step in range(4):
        if step == 2:
            ps[0], rs[0] = torch.nn.Parameter(new.clone()), torch.nn.Parameter(new.clone())
            ours.param_groups[0]["params"][0], ref.param_groups[0]["params"][0] = ps[0], rs[0]
        for p, r in zip(ps, rs):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert ours.state[ps[0]]["step"].item() == 2
    for p, r in zip(ps, rs):
        assert bool(((p.float() - r.float()).abs() <= 2 ** -7 * r.float().abs()).all())
        if mode == "stochastic":
            assert torch.equal(p, r), "the same position draws the same bits"
        else:
            total = p.float() + ours.state[p]["kahan_comp"].float()
            expected = r.float() + ref.state[r]["kahan_comp"].float()
            assert torch.allclose(total, expected, rtol=1e-4, atol=1e-6)
