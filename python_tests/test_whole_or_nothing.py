"""Every step and every load is whole or nothing (issue 14): the cached lists follow every
mutation torch.optim honours, no call sees the same memory twice, a failing step or load changes
nothing, every argument is checked, and a reload loop does not leak."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

from conftest import relative_error
from dldna_fused import optim, reference

# name: (fused class, reference class, kwargs, a state key a user might replace)
OPTIMIZERS = {
    "adam": (optim.Adam, reference.Adam, dict(lr=0.1, weight_decay=0.01), "exp_avg"),
    "adamw": (optim.AdamW, reference.AdamW, dict(lr=0.1, amsgrad=True), "exp_avg_sq"),
    "lion": (optim.Lion, reference.Lion, dict(lr=0.01, weight_decay=0.1), "exp_avg"),
    "sophia": (optim.Sophia, reference.Sophia, dict(lr=0.01, rho=0.5), "exp_avg"),
    "adafactor": (optim.Adafactor, reference.Adafactor, dict(lr=0.05, relative_step=False, beta1=0.9),
                  "exp_avg"),
    # Low-bit states on these tiny params: min_8bit_size=0 quantizes them, in blocks of 64.
    "adamw8bit": (optim.AdamW8bit, reference.AdamW8bit, dict(lr=0.1, min_8bit_size=0, block_size=64),
                  "exp_avg_codes"),
    "lion8bit": (optim.Lion8bit, reference.Lion8bit, dict(lr=0.01, weight_decay=0.1, min_8bit_size=0, block_size=64),
                 "exp_avg_absmax"),
}
NAMES = list(OPTIMIZERS)


def _params():
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 4))]


def _pair(name, params, **overrides):
    """A fused optimizer and its reference over copies of ``params``."""
    fused_cls, ref_cls, kwargs, _ = OPTIMIZERS[name]
    kwargs = {**kwargs, **overrides}
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return (fused_cls(ours, **kwargs), ours), (ref_cls(theirs, **kwargs), theirs)


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _assert_same(ours_opt, ours, ref_opt, theirs, rtol=1e-5):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert relative_error(p, q) <= rtol, f"param {i}: {relative_error(p, q):.3g}"
        s, t = ours_opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert set(s) == set(t), f"param {i}: state keys {sorted(s)} vs {sorted(t)}"
        for key in s:
            if isinstance(s[key], torch.Tensor) and s[key].dtype == torch.uint8:
                # 8-bit codes: FMA rounding can move a value across a map midpoint, one code away.
                assert int((s[key].int() - t[key].int()).abs().max()) <= 1, f"param {i} {key}"
                continue
            assert relative_error(torch.as_tensor(s[key]).float(), torch.as_tensor(t[key]).float()) <= rtol, \
                f"param {i} {key}"


def _steps(pairs, grads_per_step):
    for grads in grads_per_step:
        for opt, params in pairs:
            _set_grads(params, grads)
            opt.step()


def _grads(params, steps=2):
    return [[torch.randn(p.shape) for p in params] for _ in range(steps)]


# ---- 1. the cached lists follow every mutation ---------------------------------------------------

def _clear(opt, params):
    opt.state.clear()


def _del_entry(opt, params):
    del opt.state[params[0]]


def _new_dict(opt, params):
    opt.state[params[1]] = {}


def _replace_tensor(opt, params):
    key = OPTIMIZERS[opt._test_name][3]
    opt.state[params[0]][key] = torch.full_like(opt.state[params[0]][key], 0.25)


def _replace_params_list(opt, params):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    opt._test_extra = extra
    opt.param_groups[0]["params"] = [extra, params[1]]


def _edit_params_in_place(opt, params):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    opt._test_extra = extra
    opt.param_groups[0]["params"][0] = extra


def _append_param(opt, params):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    opt._test_extra = extra
    opt.param_groups[0]["params"].append(extra)


MUTATIONS = {
    "state-clear": _clear, "del-state-entry": _del_entry, "state-entry-new-dict": _new_dict,
    "replace-state-tensor": _replace_tensor, "replace-params-list": _replace_params_list,
    "params-list-item": _edit_params_in_place, "params-list-append": _append_param,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_a_mutation_torch_optim_honours_is_honoured(name, mutation):
    params = _params()
    (ours_opt, ours), (ref_opt, theirs) = _pair(name, params)
    for opt in (ours_opt, ref_opt):
        opt._test_name = name
    _steps([(ours_opt, ours), (ref_opt, theirs)], _grads(params))
    MUTATIONS[mutation](ours_opt, ours)
    MUTATIONS[mutation](ref_opt, theirs)
    ours_all, theirs_all = list(ours), list(theirs)
    if hasattr(ours_opt, "_test_extra"):
        ours_all.append(ours_opt._test_extra)
        theirs_all.append(ref_opt._test_extra)
    for _ in range(2):
        grads = [torch.randn(p.shape) for p in ours_all]
        _set_grads(ours_all, grads)
        _set_grads(theirs_all, grads)
        ours_opt.step()
        ref_opt.step()
    _assert_same(ours_opt, ours_all, ref_opt, theirs_all)
    assert len(ours_opt.state) == len(ref_opt.state)


def test_the_issue_repro_matches_torch():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    o, t = optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for opt, x in ((o, p), (t, q)):
        x.grad = torch.tensor([1., -2., 3.])
        opt.step()
        opt.state.clear()
        x.grad = torch.tensor([-1., 1., 1.])
        opt.step()
    torch.testing.assert_close(p, q)
    assert len(o.state) == len(t.state) == 1
    # A new params list: the old param is left alone, the new one moves.
    for opt, x in ((o, p), (t, q)):
        new = torch.nn.Parameter(torch.zeros(3))
        opt.param_groups[0]["params"] = [new]
        x.grad = None
        new.grad = torch.ones(3)
        before = x.detach().clone()
        opt.step()
        assert torch.equal(x, before)
        assert new.abs().sum() > 0


def test_in_place_changes_of_state_values_need_no_rebuild():
    (ours_opt, ours), (ref_opt, theirs) = _pair("adam", _params())
    _steps([(ours_opt, ours), (ref_opt, theirs)], _grads(ours))
    for opt, params in ((ours_opt, ours), (ref_opt, theirs)):
        opt.state[params[0]]["exp_avg"].mul_(-3.0)
    _steps([(ours_opt, ours), (ref_opt, theirs)], _grads(ours))
    _assert_same(ours_opt, ours, ref_opt, theirs)


# ---- 2. the same memory twice in one call --------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_a_param_listed_twice_is_updated_twice_in_sequence(name, threads):
    p = torch.randn(300_001)
    fused_cls, ref_cls, kwargs, _ = OPTIMIZERS[name]
    a, b = torch.nn.Parameter(p.clone()), torch.nn.Parameter(p.clone())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ours = fused_cls([a, a], **kwargs)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref = ref_cls([b, b], **kwargs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            g = torch.randn(p.shape)
            a.grad, b.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
    finally:
        torch.set_num_threads(previous)
    _assert_same(ours, [a], ref, [b])


@pytest.mark.parametrize("name", NAMES)
def test_params_that_share_memory_are_rejected_before_any_change(name):
    base = torch.randn(10)
    first = torch.nn.Parameter(base[:6])
    second = torch.nn.Parameter(base[4:])
    other = torch.nn.Parameter(torch.randn(4))
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    opt = fused_cls([{"params": [other]}, {"params": [first, second]}], **kwargs)
    for p in (first, second, other):
        p.grad = torch.ones_like(p)
    before = other.detach().clone()
    with pytest.raises(RuntimeError, match=r"param group 1: param of params\[0\] and param of params\[1\] share memory"):
        opt.step()
    assert torch.equal(other, before)
    assert len(opt.state) == 0


def test_an_expanded_param_is_rejected():
    p = torch.nn.Parameter(torch.zeros(1).expand(4))
    opt = optim.Adam([p])
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="overlaps itself"):
        opt.step()


def test_states_that_share_memory_are_rejected():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = optim.Adam([a, b])
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    opt.state[b]["exp_avg"] = opt.state[a]["exp_avg"]
    with pytest.raises(RuntimeError, match=r"exp_avg of params\[0\] and exp_avg of params\[1\] share memory"):
        opt.step()


# ---- 3. atomic steps, loads and add_param_group ---------------------------------------------------

def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
             for p in params if p in opt.state})


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    assert {id(p) for p in params if p in opt.state} == set(states)
    for p in params:
        if p in opt.state:
            for k, v in states[id(p)].items():
                assert torch.equal(torch.as_tensor(opt.state[p][k]), torch.as_tensor(v)), k


def _two_groups(name):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    first, second = [torch.nn.Parameter(torch.randn(4, 3))], [torch.nn.Parameter(torch.randn(6))]
    opt = fused_cls([{"params": first}, {"params": second}], **kwargs)
    for p in first + second:
        p.grad = torch.randn(p.shape)
    opt.step()
    return opt, first, second


def _bad_grad_shape(opt, first, second):
    second[0].grad.data = torch.randn(5)


def _bad_grad_dtype(opt, first, second):
    second[0].grad.data = torch.randn(6, dtype=torch.float64)


def _bad_lr(opt, first, second):
    opt.param_groups[1]["lr"] = -1.0


def _string_lr(opt, first, second):
    opt.param_groups[1]["lr"] = "0.1"


def _nan_hyperparameter(opt, first, second):
    group = opt.param_groups[1]
    group["weight_decay"] = float("nan")


def _bad_state_shape(opt, first, second):
    key = next(k for k in opt.state[second[0]] if k != "step")  # one the step reads
    opt.state[second[0]][key] = torch.zeros(7)


def _new_param_then_bad_group(opt, first, second):
    fresh = torch.nn.Parameter(torch.randn(3))
    fresh.grad = torch.randn(3)
    opt.param_groups[0]["params"].append(fresh)
    opt._test_fresh = fresh
    second[0].grad.data = torch.randn(5)


FAILURES = {"grad-shape": _bad_grad_shape, "grad-dtype": _bad_grad_dtype, "negative-lr": _bad_lr,
            "string-lr": _string_lr, "nan-weight-decay": _nan_hyperparameter, "state-shape": _bad_state_shape,
            "new-state-then-error": _new_param_then_bad_group}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", NAMES)
def test_a_step_that_fails_in_group_2_changes_nothing(name, failure):
    opt, first, second = _two_groups(name)
    FAILURES[failure](opt, first, second)
    snapshot = _snapshot(opt, first + second)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="param group 1"):
        opt.step()
    _assert_unchanged(opt, first + second, snapshot)
    fresh = getattr(opt, "_test_fresh", None)
    if fresh is not None:
        assert fresh not in opt.state
    # The grads of group 1 are untouched as well.
    assert all(p.grad is not None for p in first)


def _state_dict_cases(name):
    cases = {
        "string-step": lambda sd, key: sd["state"][0].__setitem__("step", "ten"),
        "two-element-step": lambda sd, key: sd["state"][0].__setitem__("step", torch.tensor([1.0, 2.0])),
        "nan-step": lambda sd, key: sd["state"][0].__setitem__("step", torch.tensor(float("nan"))),
        "non-tensor-state": lambda sd, key: sd["state"][1].__setitem__(key, [1, 2, 3]),
        "missing-entry": lambda sd, key: sd["state"][1].pop(key),
        "wrong-shape": lambda sd, key: sd["state"][1].__setitem__(key, torch.zeros(2)),
    }
    return cases


@pytest.mark.parametrize("case", list(_state_dict_cases("adam")))
@pytest.mark.parametrize("name", NAMES)
def test_a_malformed_state_dict_raises_and_loads_nothing(name, case):
    opt, first, second = _two_groups(name)
    saved = copy.deepcopy(opt.state_dict())
    key = OPTIMIZERS[name][3]
    if name == "adafactor":
        key = "exp_avg_sq"  # second[0] is 1-D
    bad = copy.deepcopy(saved)
    _state_dict_cases(name)[case](bad, key)
    snapshot = _snapshot(opt, first + second)
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises((KeyError, TypeError, ValueError), match="load_state_dict: param group"):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, first + second, snapshot)
    assert [dict(g) for g in opt.param_groups] == groups_before
    # Still steps, and a good state_dict still loads.
    opt.load_state_dict(saved)
    opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_with_an_invalid_param_adds_nothing(name):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    opt = fused_cls([torch.nn.Parameter(torch.randn(3))], **kwargs)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0})
    assert len(opt.param_groups) == 1


# ---- 4. validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    (lambda p: optim.Adafactor(p, lr=float("nan"), relative_step=False), ValueError, "lr"),
    (lambda p: optim.Adafactor(p, eps=(float("nan"), 1e-3)), ValueError, r"eps\[0\]"),
    (lambda p: optim.Adafactor(p, weight_decay=float("nan")), ValueError, "weight_decay"),
    (lambda p: optim.Adafactor(p, lr=torch.tensor([1e-3, 1e-3]), relative_step=False), ValueError,
     "Tensor lr must be 1-element"),
    (lambda p: optim.Adafactor(p, clip_threshold="1"), TypeError, "clip_threshold"),
    (lambda p: optim.Lion(p, lr="0.1"), TypeError, "lr must be a real number"),
    (lambda p: optim.Sophia(p, lr="0.1"), TypeError, "lr must be a real number"),
    (lambda p: optim.Sophia(p, bs=float("nan")), ValueError, "bs"),
    (lambda p: optim.Lion(p, betas=(0.9, torch.tensor(0.99))), ValueError, "both floats or both Tensors"),
    (lambda p: optim.Sophia(p, betas=(torch.tensor(0.9), 0.99)), ValueError, "both floats or both Tensors"),
    (lambda p: optim.Adam(p, lr=float("nan")), ValueError, "Invalid learning rate"),
    (lambda p: optim.Adam(p, eps=float("nan")), ValueError, "eps"),
], ids=["adafactor-nan-lr", "adafactor-nan-eps", "adafactor-nan-wd", "adafactor-2-element-lr",
        "adafactor-string-clip", "lion-string-lr", "sophia-string-lr", "sophia-nan-bs", "lion-mixed-betas",
        "sophia-mixed-betas", "adam-nan-lr", "adam-nan-eps"])
def test_invalid_arguments_are_rejected_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make([torch.nn.Parameter(torch.zeros(2))])


def _torch_error_inputs(torch_name):
    info = next(o for o in optim_db if o.optim_cls.__name__ == torch_name)
    return info.optim_error_inputs_func(device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW], ids=["adam", "adamw"])
def test_torch_error_inputs_raise_the_same_errors(cls):
    """torch's own error inputs for Adam/AdamW (torch.testing._internal.common_optimizers): the
    same error type and message, except that foreach=True is refused for its own reason."""
    inputs = _torch_error_inputs(cls.__name__)
    assert len(inputs) >= 8
    for error_input in inputs:
        optim_input = error_input.optimizer_error_input
        params = optim_input.params
        if params is None:
            params = [torch.nn.Parameter(torch.randn(1, 1))]
        kwargs = optim_input.kwargs
        if error_input.error_type is UserWarning:
            with pytest.warns(UserWarning, match=error_input.error_regex):
                cls(params, **kwargs)
            continue
        match = "foreach=True is not supported" if kwargs.get("foreach") else error_input.error_regex
        with pytest.raises(error_input.error_type, match=match):
            cls(params, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_params_construct_and_fail_at_step_then_work_after_to_empty(name):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = fused_cls(model.parameters(), **kwargs)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="no fused kernel for params on device 'meta'"):
        opt.step()
    assert len(opt.state) == 0
    # With swapping, to_empty keeps the Parameter objects the optimizer holds (by default it makes
    # new ones for a meta -> cpu move, and torch.optim would then step the stale meta params too).
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert next(model.parameters()) is opt.param_groups[0]["params"][0]
    for p in model.parameters():
        torch.nn.init.normal_(p)
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- 5. semantics: GradScaler grads, Sophia's cadence, NaN gradients -------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_grad_scaler_leaves_the_unscaled_grad_as_torch_fused_does(name, dtype):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.ones(4, 37, dtype=dtype))  # a vector body and a scalar tail
    q = torch.nn.Parameter(torch.ones(4, 37, dtype=dtype))
    opt = fused_cls([p], **kwargs)
    theirs = torch.optim.Adam([q], lr=0.1, fused=True)
    weights = torch.arange(4 * 37, dtype=dtype).reshape(4, 37)
    for o, x in ((opt, p), (theirs, q)):
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        scaler.scale((x * weights).sum()).backward()
        scaler.step(o)
        scaler.update()
    assert torch.equal(q.grad, weights)
    assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("name", NAMES)
def test_a_step_grad_scaler_skips_leaves_the_scaled_grad(name):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.ones(3))
    opt = fused_cls([p], **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale((p * torch.tensor([1.0, float("inf"), 2.0])).sum()).backward()
    grad = p.grad.clone()
    scaler.step(opt)
    assert torch.equal(p.grad, grad)
    assert torch.equal(p, torch.ones(3))


def test_sophia_cadence_counts_applied_steps_only_and_survives_a_reload():
    p = torch.nn.Parameter(torch.randn(3))
    opt = optim.Sophia([p], k=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for finite in (True, False, True):
        p.grad = None
        factor = torch.ones(3) if finite else torch.tensor([1.0, float("nan"), 1.0])
        scaler.scale((p * factor).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert not opt.should_update_hessian()  # 2 applied steps of 3
    saved = opt.state_dict()
    assert all(group["steps_since_hessian"] == 2 for group in saved["param_groups"])
    resumed = optim.Sophia([p], k=3)
    resumed.load_state_dict(saved)
    assert "steps_since_hessian" not in resumed.param_groups[0]
    assert not resumed.should_update_hessian()
    p.grad = torch.ones(3)
    resumed.step()
    assert resumed.should_update_hessian()


@pytest.mark.parametrize("name", ["lion", "adafactor"])
def test_nan_gradients_do_what_the_reference_does(name):
    fused_cls, ref_cls, kwargs, _ = OPTIMIZERS[name]
    for shape in ((37,), (5, 37)):
        start = torch.randn(shape)
        a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        ours, ref = fused_cls([a], **kwargs), ref_cls([b], **kwargs)
        for step in range(3):
            g = torch.randn(shape)
            if step == 1:
                g.view(-1)[3] = float("nan")
            a.grad, b.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
            assert torch.equal(a.isnan(), b.isnan()), f"{shape} step {step}"
            finite = ~b.isnan()
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-6)


# ---- 6. reload loops do not leak ---------------------------------------------------------------------

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("name", NAMES)
def test_step_and_reload_cycles_do_not_grow_memory(name):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = fused_cls(model.parameters(), **kwargs)
    x = torch.randn(8, 16)

    def cycle():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        opt.load_state_dict(opt.state_dict())

    for _ in range(200):  # warm up the allocator and the caches
        cycle()
    first_state = next(iter(opt.state.values()))
    replaced = weakref.ref(next(v for k, v in first_state.items() if k != "step"))
    del first_state
    gc.collect()
    before = _rss_bytes()
    for _ in range(2000):
        cycle()
    gc.collect()
    grown = _rss_bytes() - before
    assert replaced() is None, "a replaced state tensor is still alive"
    assert len(opt.__dict__.get("_lists_cache", [])) <= len(opt.param_groups)
    assert grown < 5 * 2**20, f"RSS grew {grown / 2**20:.1f} MB over 2000 step+reload cycles"


def test_warnings_of_construction_match_torch():
    p = torch.nn.Parameter(torch.randn(2))
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        optim.Adam([p, p])
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch.optim.Adam([p, p])
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


# ---- issue 23: the holes the sweeps found ------------------------------------------------------------

def test_steps_without_grads_do_not_advance_sophia_or_its_win_rate():
    params = {cls: [torch.nn.Parameter(torch.ones(4))] for cls in (optim.Sophia, reference.Sophia)}
    opts = {cls: cls(ps, lr=0.1, k=2, betas=(0.965, 0.0)) for cls, ps in params.items()}
    for cls, opt in opts.items():
        assert opt.win_rate is None  # before any applied step, in both
        for _ in range(3):  # nothing to apply: no cadence, no win_rate
            opt.step()
        assert not opt.should_update_hessian() and opt.win_rate is None, cls
        params[cls][0].grad = torch.tensor([1.0, -1.0, 1e-3, 0.0])
        opt.step()
        assert not opt.should_update_hessian(), cls  # one applied step of k=2
        params[cls][0].grad = None
        opt.step()
        assert not opt.should_update_hessian(), cls
    # beta2 = 0: h is the last estimate itself; win_rate agrees with the reference's definition.
    for cls, opt in opts.items():
        params[cls][0].grad = torch.tensor([2.0, 1.0, 3.0, 0.5])
        opt.update_hessian()
        params[cls][0].grad = torch.tensor([0.01, -5.0, 0.02, 0.0])
        opt.step()
        params[cls][0].grad = None
        opt.step()  # applies nothing: win_rate stays that of the step before
    assert opts[optim.Sophia].win_rate == opts[reference.Sophia].win_rate != 0.0


def test_sophia_draws_differ_between_devices_and_agree_across_ranks():
    # The i-th device the params live on is seeded with seed + i: params on meta first put the CPU
    # second here; a DDP rank holding one device always seeds it with seed itself.
    first = torch.nn.Parameter(torch.empty(3, device="meta"))
    cpu = torch.nn.Parameter(torch.ones(3))
    assert optim.Sophia([first, cpu], seed=7)._generator(torch.device("cpu")).initial_seed() == 8
    assert optim.Sophia([cpu], seed=7)._generator(torch.device("cpu")).initial_seed() == 7


@pytest.mark.parametrize("name", ["adam", "adamw", "adafactor"])
def test_a_state_dict_taken_after_an_option_switched_on_loads_and_continues(name):
    # amsgrad (Adafactor: beta1) switched on mid-run while a param had no grad: the step carried
    # on, and the state_dict taken then (without that param's new state) must load.
    fused_cls, ref_cls, kwargs, _ = OPTIMIZERS[name]
    option, value = ("beta1", 0.9) if name == "adafactor" else ("amsgrad", True)
    kwargs = {**kwargs, option: None if name == "adafactor" else False}
    start = _params()
    (ours_opt, ours), (ref_opt, theirs) = _pair(name, start, **{option: kwargs[option]})
    _steps([(ours_opt, ours), (ref_opt, theirs)], _grads(start, 1))
    for opt in (ours_opt, ref_opt):
        opt.param_groups[0][option] = value
    grads = [torch.randn(5), None]
    _steps([(ours_opt, ours), (ref_opt, theirs)], [grads])
    assert ("exp_avg" if name == "adafactor" else "max_exp_avg_sq") not in ours_opt.state[ours[1]]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    reloaded = fused_cls(twin, **{**kwargs, option: value})
    reloaded.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    more = _grads(start, 2)
    _steps([(reloaded, twin), (ref_opt, theirs)], more)
    _assert_same(reloaded, twin, ref_opt, theirs)


OP_CALLS = {
    "fused_adam_": lambda p, g, s: torch.ops.dldna_fused.fused_adam_(
        p, g, [s()], [s()], [], [s(())], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
        amsgrad=False, maximize=False, decoupled_weight_decay=False),
    "fused_lion_": lambda p, g, s: torch.ops.dldna_fused.fused_lion_(
        p, g, [s()], [s(())], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
    "fused_sophia_": lambda p, g, s: torch.ops.dldna_fused.fused_sophia_(
        p, g, [s()], [s()], [s(())], lr=0.1, beta1=0.9, rho=0.04, bs=1.0, weight_decay=0.0,
        maximize=False),
    "fused_adafactor_": lambda p, g, s: torch.ops.dldna_fused.fused_adafactor_(
        p, g, [], [], [s()], [], [s(())], [s(())], lr=0.1, eps1=1e-30, eps2=1e-3,
        clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True,
        relative_step=False, warmup_init=False),
}


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_a_raw_op_with_one_meta_tensor_raises_instead_of_doing_nothing(op):
    # The dispatcher sends any call with a meta tensor to the Meta kernel, which only checked shapes.
    params = [torch.ones(4)]
    with pytest.raises(RuntimeError, match=rf"dldna_fused::{op}: params\[0\] is on cpu but another argument is on meta"):
        OP_CALLS[op](params, [torch.ones(4, device="meta")], lambda shape=(4,): torch.zeros(shape))
    assert torch.equal(params[0], torch.ones(4))
    # All on meta is a valid call (what a model on the meta device traces).
    OP_CALLS[op]([torch.ones(4, device="meta")], [torch.ones(4, device="meta")],
                 lambda shape=(4,): torch.zeros(shape, device="meta"))


@pytest.mark.parametrize("first,then", [(0, 10**6), (10**6, 0)], ids=["to-fp32-states", "to-quantized"])
def test_a_state_dict_taken_after_min_8bit_size_changed_loads_and_continues(first, then):
    # The third option that changes which states a param has: the param that had no grad since
    # the change still holds the other kind; load converts it, as the next step would.
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(5000))]
    opt = optim.AdamW8bit(ps, lr=0.1, min_8bit_size=first, block_size=64)
    _set_grads(ps, [torch.randn(300), torch.randn(5000)])
    opt.step()
    opt.param_groups[0]["min_8bit_size"] = then
    _set_grads(ps, [torch.randn(300), None])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert ("exp_avg_codes" in saved["state"][1]) == (first == 0)  # still the kind it was
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    reloaded = optim.AdamW8bit(twin, lr=0.1, min_8bit_size=then, block_size=64)
    reloaded.load_state_dict(saved)
    grads = [torch.randn(300), torch.randn(5000)]
    for params, o in ((ps, opt), (twin, reloaded)):
        _set_grads(params, grads)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, twin))


def test_a_step_grad_scaler_skips_leaves_sophias_win_rate_and_cadence():
    # found_inf set: the kernels skip the step; win_rate keeps the last applied step's value and
    # the cadence does not count it (read lazily from found_inf, no sync in step()).
    p = torch.nn.Parameter(torch.ones(4))
    opt = optim.Sophia([p], lr=0.1, k=2)
    p.grad = torch.tensor([1.0, -1.0, 1e-3, 0.0])
    opt.update_hessian()
    p.grad = torch.tensor([0.01, -5.0, 0.02, 0.0])
    opt.step()
    rate = opt.win_rate
    before = p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.ones(1), torch.ones(1)
    for _ in range(20):  # more than the records it keeps unread
        opt.step()
    del opt.grad_scale, opt.found_inf
    assert torch.equal(p, before) and opt.win_rate == rate and not opt.should_update_hessian()
    p.grad = torch.tensor([0.5, 0.5, 0.5, 0.5])
    opt.step()
    assert opt.should_update_hessian() and opt.win_rate != rate
