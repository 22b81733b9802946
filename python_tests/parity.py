"""Shared pieces of the parity tests: the parameter and gradient matrix every optimizer is run
over, the runner, and the comparisons (tolerances in conftest.py)."""

import torch

from conftest import LOW_PRECISION_FACTOR, fp32_tolerance, relative_error

STEPS = 10


def make_params(device, dtype, many=False):
    """Odd sizes, a single element, a zero-size tensor, a size-1 dimension whose grad has other
    strides, and a transposed (non-contiguous) param; or 300 small tensors, more than one CUDA
    launch holds (~190 at depth 5)."""
    if many:
        shapes = [(37 + (i % 5),) for i in range(300)]
        return [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    shapes = [(1,), (4097,), (0,), (3, 1, 5), (17, 33), (70001,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(9, 6, device=device).to(dtype).t()))
    return params


def make_grads(params, step):
    """Gradients for one step; some params get none on some steps."""
    grads = []
    for i, p in enumerate(params):
        if (i + step) % 4 == 3:
            grads.append(None)
        elif p.dim() == 3:
            # Same shape, different strides on the size-1 dimension.
            grads.append(torch.randn(p.shape[0], p.shape[2], 1, device=p.device).to(p.dtype).transpose(1, 2))
        else:
            grads.append(torch.randn(p.shape, device=p.device).to(p.dtype).contiguous())
    return grads


def run(opt_factory, params, grads_per_step, after_step=None):
    """Copies of ``params`` after one ``opt.step()`` per entry of ``grads_per_step``, and the
    optimizer; ``after_step(opt, params, step)`` runs after each step (e.g. Sophia's Hessian
    updates)."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = opt_factory(params)
    for s, grads in enumerate(grads_per_step):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone().to(p.dtype)
        opt.step()
        if after_step is not None:
            after_step(opt, params, s)
    return params, opt


def assert_same_state(ours, theirs, params_ours, params_theirs, steps=STEPS):
    for i, (p, q) in enumerate(zip(params_ours, params_theirs)):
        rtol = fp32_tolerance(p.numel(), steps)
        assert relative_error(p, q) <= rtol, f"param {i} {tuple(p.shape)}: {relative_error(p, q):.3g}"
        s, t = ours.state.get(p, {}), theirs.state.get(q, {})
        assert set(s) == set(t), f"param {i}: state keys {sorted(s)} vs {sorted(t)}"
        for key in s:
            if key == "step":
                assert s[key].item() == t[key].item(), f"param {i}: step {s[key]} vs {t[key]}"
            else:
                err = relative_error(s[key], t[key])
                assert err <= rtol, f"param {i} {key}: {err:.3g}"


def assert_low_precision_within_factor(ours_params, exact_params, torch_params, dtype):
    """Each of our bf16/fp16 params is at most LOW_PRECISION_FACTOR times as far from the float64 run
    as the same computation done by torch in that dtype."""
    for i, (ours, exact, theirs) in enumerate(zip(ours_params, exact_params, torch_params)):
        if ours.numel() == 0:
            continue
        ours_err = (ours.double() - exact).norm().item()
        torch_err = (theirs.double() - exact).norm().item()
        # The floor covers tensors where both are exact to the dtype's rounding of the start value.
        floor = torch.finfo(dtype).eps * exact.norm().item()
        assert ours_err <= LOW_PRECISION_FACTOR * torch_err + floor, (
            f"param {i} {tuple(ours.shape)}: ours {ours_err:.3g} vs torch {torch_err:.3g}")
