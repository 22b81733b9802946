"""Fused AdaFactor against its reference (every flag, factored and unfactored shapes, fp32 and
bf16/fp16), the reference against a hand computation, the clip direction, GradScaler,
state_dict, argument errors, opcheck and torch.compile."""

import copy

import numpy as np
import pytest
import torch

from dldna_fused import _C, ops, optim, reference
from conftest import DEVICES, relative_error
from parity import assert_low_precision_within_factor, run

STEPS = 10
FP32_RTOL = 1e-5

FLAGS = {
    "default": dict(),
    "beta1-wd": dict(beta1=0.9, weight_decay=0.05),
    "manual-lr": dict(lr=3e-2, relative_step=False),
    "manual-lr-unscaled": dict(lr=3e-2, relative_step=False, scale_parameter=False, beta1=0.5),
    "warmup-init": dict(warmup_init=True, weight_decay=0.1),
    "tight-clip": dict(clip_threshold=0.25, decay_rate=-0.5),
}


def make_params(device, dtype, many=False):
    """1-D, 2-D (square, non-square, 1 x n, n x 1, transposed), 4-D conv weights, zero-size
    tensors of both kinds, and tensors the CPU splits into several work units (over 262144
    elements, each kind); or 300 small tensors of both kinds."""
    if many:
        shapes = [(3, 5 + i % 4) if i % 3 else (11 + i % 5,) for i in range(300)]
    else:
        shapes = [(7,), (1,), (0,), (4097,), (17, 33), (33, 17), (1, 40), (40, 1), (0, 3), (3, 2, 5, 6),
                  (300, 257), (600, 500), (300001,), (40, 3, 50, 50)]
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    if not many:
        params.append(torch.nn.Parameter(torch.randn(9, 6, device=device).to(dtype).t()))
    return params


def make_grads(params, step):
    """Gradients for one step, scaled differently per param; some params get none on some steps."""
    grads = []
    for i, p in enumerate(params):
        if (i + step) % 5 == 4:
            grads.append(None)
        else:
            grads.append((torch.randn(p.shape, device=p.device) * (1 + i % 3)).to(p.dtype))
    return grads


def assert_same(fused, ref, fused_p, ref_p, rtol=FP32_RTOL):
    for i, (p, q) in enumerate(zip(fused_p, ref_p)):
        assert relative_error(p, q) <= rtol, f"param {i} {tuple(p.shape)}: {relative_error(p, q):.3g}"
        s, t = fused.state.get(p, {}), ref.state.get(q, {})
        assert set(s) == set(t), f"param {i}: state keys {sorted(s)} vs {sorted(t)}"
        for key in t:
            assert s[key].shape == t[key].shape, f"param {i} {key}: {s[key].shape} vs {t[key].shape}"
            assert s[key].dtype == torch.float32, f"param {i} {key}: {s[key].dtype}"
            if key == "step":
                assert s[key].item() == t[key].item()
            else:
                err = relative_error(s[key], t[key])
                assert err <= rtol, f"param {i} {tuple(p.shape)} {key}: {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("many", [False, True], ids=["mixed-shapes", "300-tensors"])
def test_fp32_parity_with_reference(device, flags, many):
    params = make_params(device, torch.float32, many)
    grads = [make_grads(params, s) for s in range(STEPS)]
    fused_p, fused = run(lambda ps: optim.Adafactor(ps, **FLAGS[flags]), params, grads)
    ref_p, ref = run(lambda ps: reference.Adafactor(ps, **FLAGS[flags]), params, grads)
    assert_same(fused, ref, fused_p, ref_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("flags", ["default", "beta1-wd", "manual-lr-unscaled"])
def test_low_precision_error_within_2x_of_torch(device, dtype, flags):
    params = make_params(device, dtype)
    grads = [make_grads(params, s) for s in range(STEPS)]
    kwargs = FLAGS[flags]
    fused_p, fused = run(lambda ps: optim.Adafactor(ps, **kwargs), params, grads)
    exact_p, _ = run(lambda ps: reference.Adafactor(ps, **kwargs), [p.double() for p in params],
                     [[None if g is None else g.double() for g in gs] for gs in grads])
    # "torch at that dtype": the reference's torch ops on params stored in that dtype (AdaFactor's
    # math is fp32 for such params, in transformers as here).
    torch_p, _ = run(lambda ps: reference.Adafactor(ps, **kwargs), params, grads)
    assert_low_precision_within_factor(fused_p, exact_p, torch_p, dtype)
    for p in fused_p:
        assert all(v.dtype == torch.float32 for v in fused.state.get(p, {}).values())


def test_reference_matches_a_hand_computation_on_a_2x3_matrix():
    """Two steps of the transformers rule written out in numpy float64, element by element, for a
    2 x 3 param with beta1 and weight decay (the independent oracle of the reference)."""
    theta = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    grads = [np.array([[0.1, -0.2, 0.3], [-0.4, 0.5, 0.05]]), np.array([[0.2, 0.1, -0.1], [0.3, -0.3, 0.2]])]
    eps1, eps2, d, c, beta1, wd = 1e-30, 1e-3, 1.0, -0.8, 0.9, 0.1
    rows, cols, m = np.zeros(2), np.zeros(3), np.zeros((2, 3))
    expected = theta.copy()
    for t, g in enumerate(grads, start=1):
        rms_p = np.sqrt(np.mean(expected ** 2))
        alpha = max(eps2, rms_p) * min(1e-2, 1 / np.sqrt(t))
        b2 = 1 - t ** c
        g2 = g ** 2 + eps1
        rows = b2 * rows + (1 - b2) * np.array([g2[i, :].sum() / 3 for i in range(2)])
        cols = b2 * cols + (1 - b2) * np.array([g2[:, j].sum() / 2 for j in range(3)])
        u = np.array([[g[i, j] / np.sqrt(rows[i] / rows.mean() * cols[j]) for j in range(3)] for i in range(2)])
        u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / d) * alpha
        m = beta1 * m + (1 - beta1) * u
        expected = expected - wd * alpha * expected - m
    p = torch.nn.Parameter(torch.tensor(theta))
    opt = reference.Adafactor([p], beta1=beta1, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq_row"].numpy(), rows, rtol=1e-12)
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq_col"].numpy(), cols, rtol=1e-12)
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=1e-12)
    # At t = 1 the EMAs are the statistics themselves (beta2_1 = 0).
    assert t == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [optim.Adafactor, reference.Adafactor], ids=["fused", "reference"])
def test_clip_divides_by_max_of_one_and_rms_over_threshold(device, cls):
    # At t = 1 with an unfactored param, V = g^2 + eps1, so U = sign(g) and RMS(U) = 1. A threshold
    # of 0.5 must halve the step (an inverted clip would double it); a threshold of 4 leaves it.
    for threshold, expected in ((0.5, 0.5), (4.0, 1.0)):
        p = torch.nn.Parameter(torch.zeros(6, device=device))
        g = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0], device=device)
        p.grad = g.clone()
        opt = cls([p], lr=1.0, relative_step=False, scale_parameter=False, clip_threshold=threshold, eps=(0.0, 1e-3))
        opt.step()
        torch.testing.assert_close(p.detach(), -expected * g.sign(), rtol=1e-6, atol=0)


def test_factored_state_is_a_tiny_fraction_of_adamw():
    p = torch.nn.Parameter(torch.randn(512, 640))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    ada, adamw = optim.Adafactor([p]), optim.AdamW([q])
    ada.step()
    adamw.step()

    def state_bytes(opt, param):
        return sum(v.numel() * v.element_size() for v in opt.state[param].values())

    assert state_bytes(ada, p) == (512 + 640 + 2) * 4  # rows, cols, RMS, step
    assert state_bytes(ada, p) < 0.01 * state_bytes(adamw, q)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_inf_step_changes_nothing_and_scaled_steps_match(device):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(device)
    twin = copy.deepcopy(model)
    opt, twin_opt = optim.Adafactor(model.parameters(), beta1=0.9), optim.Adafactor(twin.parameters(), beta1=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(16, 8, device=device)

    def scaled_step(poison):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    scaled_step(False)
    twin(x).square().mean().backward()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    params_before = [p.detach().clone() for p in model.parameters()]
    states_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    scaled_step(True)
    for p, before, state in zip(model.parameters(), params_before, states_before):
        assert torch.equal(p, before)
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[key]), f"{key} changed on a skipped step"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip_continues_identically(dtype):
    params = make_params("cpu", dtype)
    grads = [make_grads(params, s) for s in range(8)]
    kwargs = dict(beta1=0.9, weight_decay=0.01)
    full_p, full = run(lambda ps: optim.Adafactor(ps, **kwargs), params, grads)
    mid_p, mid = run(lambda ps: optim.Adafactor(ps, **kwargs), params, grads[:4])
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in mid_p]
    resumed = optim.Adafactor(resumed_p, **kwargs)
    # torch.optim would cast the fp32 statistics of bf16 params to bf16 on load; they must survive.
    resumed.load_state_dict(copy.deepcopy(mid.state_dict()))
    for s, gs in enumerate(grads[4:], start=4):
        for p, g in zip(resumed_p, gs):
            p.grad = None if g is None else g.clone()
        resumed.step()
    for p, q in zip(resumed_p, full_p):
        assert torch.equal(p, q)
        for key in full.state.get(q, {}):
            assert resumed.state[p][key].dtype == torch.float32
            assert torch.equal(resumed.state[p][key], full.state[q][key]), key


def test_loads_the_reference_state_dict_and_continues_alike():
    params = make_params("cpu", torch.float32)
    grads = [make_grads(params, s) for s in range(6)]
    ref_p, ref = run(lambda ps: reference.Adafactor(ps), params, grads[:3])
    fused_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    fused = optim.Adafactor(fused_p)
    fused.load_state_dict(copy.deepcopy(ref.state_dict()))
    for gs in grads[3:]:
        for p, q, g in zip(fused_p, ref_p, gs):
            p.grad = q.grad = None if g is None else g.clone()
        fused.step()
        ref.step()
    assert_same(fused, ref, fused_p, ref_p)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=1e-3), "Cannot combine manual `lr` and `relative_step=True`"),
    (dict(relative_step=False), "requires a manual `lr`"),
    (dict(lr=1e-3, relative_step=False, warmup_init=True), "`warmup_init=True` requires `relative_step=True`"),
    (dict(clip_threshold=0.0), "clip_threshold"),
    (dict(decay_rate=0.5), "decay_rate"),
    (dict(beta1=1.0), "beta1"),
    (dict(eps=(1e-30,)), "eps"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
@pytest.mark.parametrize("cls", [optim.Adafactor, reference.Adafactor], ids=["fused", "reference"])
def test_bad_arguments_raise_like_transformers(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def _op_kwargs(**overrides):
    kwargs = dict(lr=None, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                  weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)
    kwargs.update(overrides)
    return kwargs


def test_op_errors_name_the_argument_and_change_nothing():
    p, g = torch.zeros(4, 5), torch.ones(4, 5)
    rows, cols, rms, step = torch.zeros(4), torch.zeros(5), torch.zeros(()), torch.zeros(())
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_cols\[0\] has shape \[4\] but must have shape \[5\]"):
        ops.fused_adafactor_([p], [g], [rows], [torch.zeros(4)], [], [], [rms], [step], **_op_kwargs())
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        ops.fused_adafactor_([torch.zeros(4)], [torch.ones(4)], [rows], [cols], [], [], [rms], [step], **_op_kwargs())
    with pytest.raises(RuntimeError, match="either exp_avg_sq_rows"):
        ops.fused_adafactor_([p], [g], [rows], [cols], [torch.zeros(4, 5)], [], [rms], [step], **_op_kwargs())
    with pytest.raises(RuntimeError, match="beta1 is set, so exp_avgs"):
        ops.fused_adafactor_([p], [g], [rows], [cols], [], [], [rms], [step], **_op_kwargs(beta1=0.9))
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.fused_adafactor_([p], [g], [rows.double()], [cols], [], [], [rms], [step], **_op_kwargs())
    with pytest.raises(RuntimeError, match="relative_step=False needs a manual lr"):
        ops.fused_adafactor_([p], [g], [rows], [cols], [], [], [rms], [step], **_op_kwargs(relative_step=False))
    assert p.abs().sum() == 0 and rows.abs().sum() == 0 and step.item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    def mats(dtype=torch.float32):
        return [torch.randn(s, device=device, dtype=dtype) for s in ((3, 4), (0, 2), (2, 3, 33))]

    def vecs(dtype=torch.float32):
        return [torch.randn(n, device=device, dtype=dtype) for n in (3, 0, 70)]

    scalars = lambda: [torch.zeros((), device=device) for _ in range(3)]
    amp = dict(grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0, device=device))
    ms = mats()
    rows = [torch.rand(m.shape[:-1], device=device) for m in ms]
    cols = [torch.rand(m.shape[:-2] + m.shape[-1:], device=device) for m in ms]
    torch.library.opcheck(torch.ops.dldna_fused.fused_adafactor_.default,
                          [mats(torch.bfloat16), mats(torch.bfloat16), rows, cols, [], mats(), scalars(), scalars()],
                          dict(_op_kwargs(beta1=0.9, weight_decay=0.1), **amp))
    torch.library.opcheck(torch.ops.dldna_fused.fused_adafactor_.default,
                          [vecs(), vecs(), [], [], [v.abs() for v in vecs()], [], scalars(), scalars()],
                          dict(_op_kwargs(lr=1e-2, relative_step=False), **amp))


def test_compiled_optimizer_step_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    opt, twin_opt = optim.Adafactor(model.parameters(), beta1=0.9), optim.Adafactor(twin.parameters(), beta1=0.9)
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    x = torch.randn(7, 6)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(x).square().mean().backward()
        compiled_step()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ---- The CUDA launch plan ([Note: AdaFactor on the GPU]), computed on any machine ----------------

def _llama_7b_shapes():
    """LLaMA-7B's matrices (embedding, 32 x (q, k, v, o, gate, up, down), LM head) as the factored
    call's (numel, rows, cols); its [4096] norms go to the unfactored call."""
    d, ff, vocab = 4096, 11008, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)]
    return [(r * c, r, c) for r, c in [(vocab, d)] + layer * 32 + [(vocab, d)]]


PLAN_CASES = {
    "llama-7b": _llama_7b_shapes(),
    "llama-7b-norms": [(4096, 0, 0)] * 65,
    "embedding-4096x128256": [(4096 * 128256, 4096, 128256)],
    "conv-2048x512x1x1": [(2048 * 512, 1, 1)],
    "tall-and-tiny": [(513 * 3, 513, 3), (40 * 64 * 64, 64, 64), (1, 1, 1)],
    # The cliffs of the earlier plan (issue 23): a [1, N] row on one warp, an [N, 1] column on one
    # thread per block, a tall matrix whose column threads each walked 4000 rows.
    "one-long-row": [(2**22, 1, 2**22)],
    "one-long-column": [(2**22, 2**22, 1)],
    "tall-32000x4096": [(32000 * 4096, 32000, 4096)],
    "stack-of-long-rows": [(64 * 3 * 50000, 3, 50000)],
    # 501 strips: the combine's threads share a column's partials.
    "llama3-embedding-128256x4096": [(128256 * 4096, 128256, 4096)],
}


@pytest.mark.parametrize("shapes", list(PLAN_CASES.values()), ids=list(PLAN_CASES))
def test_gpu_plan_workspace_and_blocks_scale_with_the_params(shapes):
    # bf16 params: the byte count the bounds are stated against (fp32 only loosens them).
    param_bytes = 2 * sum(numel for numel, _, _ in shapes)
    plan = _C.adafactor_gpu_plan(shapes)
    assert plan["workspace_bytes"] <= 0.01 * param_bytes + 8 * len(shapes)
    # Every launch: at most 4 blocks per (threads x 16 B) of params, plus a few per tensor.
    limit = 4 * param_bytes / (plan["threads_per_block"] * 16) + 2 * len(shapes)
    for launch in ("row_blocks", "column_blocks", "combine_blocks", "mean_blocks", "row_combine_blocks"):
        assert plan[launch] <= limit, launch
    assert plan["row_blocks"] >= 1
    # No block of any pass over g or its partials reads more than a fixed 64 x (256 threads x 16
    # bytes) of fp32, whatever the shape.
    assert plan["max_block_elements"] <= plan["max_block_elements_bound"] == 64 * 256 * 16 // 4
    # And the big tensors are spread over many blocks: at least one per 2 x kGpuMaxBlockElements.
    numel = sum(n for n, _, _ in shapes)
    factored = sum(n for n, rows, cols in shapes if rows and cols)  # only these have column blocks
    assert plan["row_blocks"] >= numel / (2 * plan["max_block_elements_bound"])
    assert plan["column_blocks"] >= factored / (2 * plan["max_block_elements_bound"])


@pytest.mark.parametrize("shape,row_blocks,column_blocks", [
    ((1, 2**22), 2**22 // 8192, 2**22 // 8192),          # segments of 8192 columns; columns 8192 a block
    ((2**22, 1), 2**22 // 8192, 2**22 // 65536),         # 8192 one-column rows; 256 lanes x 256 rows
    ((32000, 4096), 32000, 125 * 16),                    # a row per block; 125 strips of 256 rows
    ((128256, 4096), 128256, 501 * 16),                  # 501 strips, combined two lanes per column
])
def test_gpu_plan_cuts_single_long_shapes_into_many_blocks(shape, row_blocks, column_blocks):
    rows, cols = shape
    plan = _C.adafactor_gpu_plan([(rows * cols, rows, cols)])
    assert plan["row_blocks"] == row_blocks and plan["column_blocks"] == column_blocks


def test_gpu_plan_of_the_wide_embedding_alone():
    # One [4096, 128256] matrix: each row in 16 segments of 8016 columns (65536 row blocks, whose
    # 4096 x 16 partial row sums 16 row-combine blocks add), 16 strips of 256 rows in 501 column
    # tiles, 16 x 128256 column partials added by 251 combine blocks of 512 columns.
    plan = _C.adafactor_gpu_plan([(4096 * 128256, 4096, 128256)])
    assert plan["row_blocks"] == 4096 * 16 and plan["row_combine_blocks"] == 16
    assert plan["column_blocks"] == 16 * 501 and plan["combine_blocks"] == 251
    assert plan["workspace_bytes"] == 16 * 4096 * 16 + 4 * (16 * 128256 + 4096 * 16 + 1) + 8


def test_gpu_plan_packs_tiny_matrices():
    # 1,048,576 one-element matrices: 8192 per block in every launch, no partials, no means.
    plan = _C.adafactor_gpu_plan([(2048 * 512, 1, 1)])
    assert plan["row_blocks"] == plan["column_blocks"] == 128
    assert plan["combine_blocks"] == plan["mean_blocks"] == 0


@pytest.mark.parametrize("shape", [(64, 3000), (96, 64, 1, 1), (600, 40), (3, 700, 70), (1, 5), (3, 20000),
                                   (1, 70000), (70000, 1), (5000, 3), (700, 300), (70000, 300)],
                         ids=["wide", "tiny-matrices", "tall-narrow", "tall-stack", "one-row", "segmented-rows",
                              "one-long-row", "one-long-column", "lanes-per-column", "strips-of-256",
                              "combine-lanes"])
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_cuda_matches_cpu_on_the_shapes_the_plan_cuts_differently(device, shape):
    # Scaled-down versions of the planned cases: several strips (600 and 700 rows), warp rows and
    # thread rows, tiny matrices packed per block.
    torch.manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(shape))
    gpu = torch.nn.Parameter(cpu.detach().to(device))
    cpu_opt, gpu_opt = optim.Adafactor([cpu], beta1=0.9), optim.Adafactor([gpu], beta1=0.9)
    for _ in range(3):
        cpu.grad = torch.randn(shape)
        gpu.grad = cpu.grad.to(device)
        cpu_opt.step()
        gpu_opt.step()
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=1e-5, atol=1e-6)
    for key, value in cpu_opt.state[cpu].items():
        torch.testing.assert_close(gpu_opt.state[gpu][key].cpu(), value, rtol=1e-5, atol=1e-7)
