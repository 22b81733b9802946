"""Every optimizer over the param zoo (python_tests/param_zoo.py): each dtype crossed with every
shape, in several param groups, under each option alone and all options together, against the
references: params and every state entry, fp32 tightly, bf16/fp16 within 2x the reference's own
error at that dtype (both against a float64 run). Then the zoo's failure cases: a param turned
float64 in the last group is refused before any group steps."""

import copy
import math

import pytest
import torch

from conftest import LOW_PRECISION_FACTOR, fp32_tolerance, relative_error
from dldna_fused import ops, optim, reference
from dldna_fused.optim._state_dict import SIGNED_STATES
from dldna_fused.clip import clip_coefficient, get_total_norm
from param_zoo import DTYPES, as_params, zoo, zoo_grads

STEPS = 3
LOWBIT = dict(min_8bit_size=256, block_size=128)  # 256 and up quantized, smaller fp32 states
# name: (fused class, reference class, kwargs, the options it takes)
OPTIMIZERS = {
    "adam": (optim.Adam, reference.Adam, dict(lr=0.05, weight_decay=0.01),
             {"maximize", "state_dtype", "amsgrad", "tensor_lr", "grad_scaler", "max_grad_norm"}),
    "adamw": (optim.AdamW, reference.AdamW, dict(lr=0.05),
              {"maximize", "state_dtype", "amsgrad", "tensor_lr", "grad_scaler", "max_grad_norm"}),
    "lion": (optim.Lion, reference.Lion, dict(lr=0.01, weight_decay=0.1),
             {"maximize", "state_dtype", "grad_scaler", "max_grad_norm"}),
    "sophia": (optim.Sophia, reference.Sophia, dict(lr=0.01, rho=0.5, k=2),
               {"maximize", "state_dtype", "grad_scaler", "max_grad_norm"}),
    "adafactor": (optim.Adafactor, reference.Adafactor, dict(lr=0.05, relative_step=False, beta1=0.9),
                  {"grad_scaler", "max_grad_norm"}),
    "adamw8bit": (optim.AdamW8bit, reference.AdamW8bit, dict(lr=0.05, **LOWBIT),
                  {"maximize", "tensor_lr", "grad_scaler", "max_grad_norm"}),
    "adam8bit": (optim.Adam8bit, reference.Adam8bit, dict(lr=0.05, weight_decay=0.01, **LOWBIT),
                 {"maximize", "grad_scaler", "max_grad_norm"}),
    "adamw4bit": (optim.AdamW4bit, reference.AdamW4bit, dict(lr=0.05, **LOWBIT),
                  {"maximize", "grad_scaler", "max_grad_norm"}),
    "lion8bit": (optim.Lion8bit, reference.Lion8bit, dict(lr=0.01, weight_decay=0.1, **LOWBIT),
                 {"maximize", "grad_scaler", "max_grad_norm"}),
}
OPTIONS = ["plain", "maximize", "state_dtype", "amsgrad", "tensor_lr", "grad_scaler", "max_grad_norm", "all"]
MAX_NORM = 5.0  # below the zoo's grad norm (~90), so the clip acts


def _cases():
    for name, (_, _, _, takes) in OPTIMIZERS.items():
        for option in OPTIONS:
            if option in ("plain", "all") or option in takes:
                for dtype in DTYPES:
                    yield pytest.param(name, option, dtype, id=f"{name}-{option}-{dtype}")


def _setup(name, option):
    """(fused kwargs, reference kwargs, grad scaler?, max_grad_norm) of one case."""
    _, _, kwargs, takes = OPTIMIZERS[name]
    chosen = takes if option == "all" else ({option} if option != "plain" else set())
    ours, theirs = dict(kwargs), dict(kwargs)
    if "maximize" in chosen:
        ours["maximize"] = theirs["maximize"] = True
    if "state_dtype" in chosen:
        ours["state_dtype"] = theirs["state_dtype"] = torch.float32
    if "amsgrad" in chosen:
        ours["amsgrad"] = theirs["amsgrad"] = True
    if "tensor_lr" in chosen:
        ours["lr"] = torch.tensor(kwargs["lr"])
    if "max_grad_norm" in chosen:
        ours["max_grad_norm"] = MAX_NORM
    return ours, theirs, "grad_scaler" in chosen, MAX_NORM if "max_grad_norm" in chosen else None


def _run(cls, kwargs, starts, grads, *, as_dtype=None, scaler=False, clip=None):
    """The params and optimizer after STEPS steps. ``scaler``: through a GradScaler (grads scaled
    by a power of two, so unscaling is exact); ``clip``: the grads clipped before each step as the
    fused optimizers' max_grad_norm does inside theirs (the same norm, in the grads' dtype as
    torch computes it, and the same factor; then each clipped grad is rounded to its dtype)."""
    params = as_params(starts, as_dtype)
    dtypes = [[t.dtype for t in group] for group in starts]  # every run sees grads rounded alike
    opt = cls([{"params": group} for group in params], **kwargs)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    flat = [p for group in params for p in group]
    for step_grads in grads:
        for group, group_grads, group_dtypes in zip(params, step_grads, dtypes):
            for p, g, dtype in zip(group, group_grads, group_dtypes):
                p.grad = None if g is None else g.to(dtype).to(p.dtype, copy=True)
        if clip is not None:
            factor = clip_coefficient(get_total_norm([p.grad for p in flat if p.grad is not None], 2.0), clip)
            for p in flat:
                if p.grad is not None:
                    p.grad = (p.grad.to(factor.dtype) * factor).to(p.grad.dtype)
        if grad_scaler is not None:
            grad_scaler.scale(torch.zeros(()))  # the scale as a loss would see it
            for p in flat:
                if p.grad is not None:
                    p.grad.mul_(grad_scaler.get_scale())
            grad_scaler.step(opt)
            grad_scaler.update()
        else:
            opt.step()
        if isinstance(opt, (optim.Sophia, reference.Sophia)) and opt.should_update_hessian():
            # GNB-style estimates from the step's grads as given (clip_grad_norm_ rewrote the
            # reference's in place; max_grad_norm leaves ours as they were).
            for group, group_grads, group_dtypes in zip(params, step_grads, dtypes):
                for p, g, dtype in zip(group, group_grads, group_dtypes):
                    p.grad = None if g is None else g.abs().to(dtype).to(p.dtype, copy=True)
            opt.update_hessian()
    return [p for group in params for p in group], opt


def _dequantized(opt, p, key):
    """State ``key`` of a quantized param, as float32 values."""
    group = next(g for g in opt.param_groups if any(t is p for t in g["params"]))
    state = opt.state[p]
    return ops.dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_absmax"], bits=group["bits"],
                                    signed=SIGNED_STATES[key], block_size=group["block_size"], numel=p.numel())


def _states(opt, p):
    return {k: v for k, v in opt.state.get(p, {}).items()}


@pytest.mark.parametrize("name,option,dtype_name", list(_cases()))
def test_zoo_tracks_the_reference(name, option, dtype_name):
    fused_cls, ref_cls, _, _ = OPTIMIZERS[name]
    ours_kwargs, ref_kwargs, scaler, clip = _setup(name, option)
    starts = zoo(dtype_name)
    grads = zoo_grads(starts, STEPS)
    ours, ours_opt = _run(fused_cls, ours_kwargs, starts, grads, scaler=scaler)
    theirs, ref_opt = _run(ref_cls, ref_kwargs, starts, grads, clip=clip)
    lowbit = "bits" in ours_opt.param_groups[0]
    exact = exact_opt = None
    if dtype_name != "fp32" and not lowbit:
        exact_kwargs = {k: v for k, v in ref_kwargs.items() if k != "state_dtype"}
        exact, exact_opt = _run(ref_cls, exact_kwargs, starts, grads, as_dtype=torch.float64, clip=clip)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        where = f"{name} {option} {dtype_name}: param {i} {tuple(p.shape)} {p.dtype}"
        s, t = _states(ours_opt, p), _states(ref_opt, q)
        assert set(s) == set(t), f"{where}: state keys {sorted(s)} vs {sorted(t)}"
        pairs = [("param", p, q, None if exact is None else exact[i])]
        pairs += [(key, s[key], t[key], None if exact is None else _states(exact_opt, exact[i]).get(key))
                  for key in s]
        for key, a, b, e in pairs:
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            if key == "step":
                assert a.item() == b.item(), f"{where}: step {a.item()} vs {b.item()}"
            elif a.dtype == torch.uint8 and clip is not None and p.dtype != torch.float32:
                # The reference's clipped grads are rounded to bf16/fp16 element by element (ours
                # stay fp32 inside the kernel), so a moment near 0 can land codes apart: compare
                # what the codes mean, by norm, to within that rounding's effect.
                state_key = key[:-len("_codes")]
                values = [_dequantized(run_opt, run_p, state_key) for run_opt, run_p in ((ours_opt, p), (ref_opt, q))]
                err = relative_error(*values)
                # A code gap is ~1/64 of a block's absmax at 8 bits near it, ~1/8 at 4 bits.
                bound = 2e-2 if ours_opt.param_groups[0]["bits"] == 8 else 6e-2
                assert err <= bound, f"{where} {state_key} (dequantized): {err:.3g} > {bound}"
            elif a.dtype == torch.uint8:
                # Low-bit codes: an FMA rounding can move a value across a midpoint, one code away.
                assert not a.numel() or int((a.int() - b.int()).abs().max()) <= 1, f"{where} {key}"
            elif e is None:
                # fp32 (tight), or low-bit optimizers: the kernels and the reference both compute in
                # fp32 and round once to the param's dtype, so they differ by a code's or an ulp's
                # worth where a code differs.
                rtol = fp32_tolerance(a.numel(), STEPS) if a.dtype == torch.float32 and not lowbit else 2e-3
                if p.dtype != torch.float32:
                    # The reference rounds each clipped or unscaled grad to the param's dtype
                    # first; with a clip that moves a low-bit moment by a code now and then, and
                    # a param's update with it (measured: up to 6 fp16 ulps over 3 steps).
                    rtol = (4 * STEPS if lowbit and clip is not None else 2) * torch.finfo(p.dtype).eps
                err = relative_error(a.float(), b.float())
                assert err <= rtol, f"{where} {key}: {err:.3g} > {rtol:.3g}"
            elif a.numel():
                # The 2x rule: our error against the float64 run at most twice the reference's.
                e = e.double()
                ours_err, ref_err = (a.double() - e).norm().item(), (b.double() - e).norm().item()
                floor = torch.finfo(a.dtype).eps * e.norm().item()
                if clip is not None:
                    # The clip factor is one number computed in the grads' dtype (torch's rule for
                    # the norm), so it is off the float64 run's by up to an ulp of that dtype,
                    # relative: up to 2 ulps in v, which is quadratic in it.
                    floor += 2 * torch.finfo(p.dtype).eps * e.norm().item()
                if not math.isfinite(ref_err):
                    # The reference overflowed at this dtype (fp16 states: eps = 1e-8 and g**2
                    # underflow to 0, m / 0 = inf); our fp32 math must stay finite. Its fp16 states
                    # are still subnormal where g is small (v ~ 1e-6 keeps ~4 bits), so only a
                    # loose bound holds there.
                    bound = 0.05 * e.norm().item()
                    assert ours_err <= bound, f"{where} {key}: ours {ours_err:.3g} > {bound:.3g}"
                    continue
                assert ours_err <= LOW_PRECISION_FACTOR * ref_err + floor, \
                    f"{where} {key}: ours {ours_err:.3g} vs reference {ref_err:.3g} (floor {floor:.3g})"


# ---- the zoo's failure cases -------------------------------------------------------------------------

def _zoo_optimizer(name, dtype_name="mixed"):
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    params = as_params(zoo(dtype_name))
    opt = fused_cls([{"params": group} for group in params], **kwargs)
    for group in params:
        for p in group:
            p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    return opt, params


def _snapshot(opt, flat):
    return [p.detach().clone() for p in flat], copy.deepcopy([_states(opt, p) for p in flat])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("where", ["last-group", "first-group"])
def test_a_param_turned_float64_is_refused_before_any_group_steps(name, where):
    # model.double() once the states exist: every optimizer refused it, but only after stepping the
    # groups before it (Adafactor: the buckets before it in the same group).
    opt, params = _zoo_optimizer(name)
    group = params[-1] if where == "last-group" else params[0]
    victim = next(p for p in group if p.numel() > 1)
    victim.data = victim.data.double()
    flat = [p for g in params for p in g]
    for p in flat:
        p.grad = torch.randn(p.shape).to(p.dtype)
    before = _snapshot(opt, flat)
    index = next(i for i, g in enumerate(params) if g is group)
    with pytest.raises(ValueError, match=rf"param group {index}, params\[\d+\]: params must be float32, "
                                         r"bfloat16 or float16, got torch.float64"):
        opt.step()
    for p, value, state_before in zip(flat, *before):
        assert torch.equal(p.detach().to(value.dtype), value)
        state = _states(opt, p)
        assert set(state) == set(state_before)
        for key, v in state_before.items():
            assert torch.equal(torch.as_tensor(state[key]), torch.as_tensor(v)), key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_zoo_state_dict_round_trips_and_continues(name):
    # Every zoo param's states (bf16/fp16 0-d ones included) go through state_dict and back.
    opt, params = _zoo_optimizer(name)
    fused_cls, _, kwargs, _ = OPTIMIZERS[name]
    twin_params = [[torch.nn.Parameter(p.detach().clone()) for p in group] for group in params]
    twin = fused_cls([{"params": group} for group in twin_params], **kwargs)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for run_params, run_opt in ((params, opt), (twin_params, twin)):
        torch.manual_seed(3)
        for group in run_params:
            for p in group:
                p.grad = torch.randn(p.shape).to(p.dtype)
        run_opt.step()
    for p, q in zip((p for g in params for p in g), (q for g in twin_params for q in g)):
        assert torch.equal(p, q)
