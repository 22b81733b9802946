"""8-bit and 4-bit optimizer states: the maps, quantize/dequantize against the reference, step
parity of AdamW8bit/Adam8bit/AdamW4bit/Lion8bit with dldna_fused.reference.lowbit, state_dict
round trips and conversions, GradScaler, clipping, argument errors and opcheck."""

import copy
import io

import pytest
import torch

import dldna_fused.reference.lowbit as R
from dldna_fused import optim
from dldna_fused.quantization import dequantize_blockwise, quantize_blockwise
from conftest import DEVICES

OPS = torch.ops.dldna_fused
MAPS = [(8, True), (8, False), (4, True), (4, False)]
MAP_IDS = ["8bit-signed", "8bit-unsigned", "4bit-signed", "4bit-unsigned"]
LOWBIT = [
    (optim.AdamW8bit, R.AdamW8bit, {}),
    (optim.Adam8bit, R.Adam8bit, {"weight_decay": 0.1}),
    (optim.AdamW4bit, R.AdamW4bit, {}),
    (optim.Lion8bit, R.Lion8bit, {"weight_decay": 0.1}),
]
LOWBIT_IDS = ["AdamW8bit", "Adam8bit", "AdamW4bit", "Lion8bit"]


def _codes(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """One int per element, 4-bit codes unpacked."""
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
    return codes[:numel].int()


@pytest.mark.parametrize("bits,signed", MAPS, ids=MAP_IDS)
def test_native_map_is_the_reference_map(bits, signed):
    values = R.quantization_map(bits, signed)
    assert values.numel() == 2**bits and bool((values[1:] > values[:-1]).all())
    assert values.max().item() == 1.0 and values.min().item() == (-values[-2].item() if signed else values[0].item())
    # Every code once, with absmax 1: the native map value for value.
    codes = torch.arange(2**bits, dtype=torch.uint8)
    if bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    native = OPS.dequantize_blockwise(codes, torch.ones(1), bits=bits, signed=signed, block_size=256,
                                      numel=2**bits)
    assert torch.equal(native, values)


def test_maps_are_the_papers():
    signed8 = R.dynamic_map(8, True)
    # 7 decades of 1, 2, ..., 64 levels each side, plus 0 and 1 (Dettmers et al. 2022).
    assert (signed8 > 0).sum() == 128 and (signed8 < 0).sum() == 127 and (signed8 == 0).sum() == 1
    positive = signed8[signed8 > 0]
    assert torch.allclose(positive[:1], torch.tensor([0.55e-6])) and positive[-2].item() > 0.99
    unsigned8 = R.dynamic_map(8, False)
    assert unsigned8[0].item() == 0.0 and (unsigned8 > 0).sum() == 255
    assert torch.equal(R.quantization_map(4, False), torch.arange(1, 17) / 16.0)  # no zero (Li et al. 2023)


def _hard_values(n: int, signed: bool, dtype) -> torch.Tensor:
    """Random magnitudes over 9 decades, exact map midpoints, 0, -0, NaN-free extremes."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-9, 0, n)[torch.randperm(n, generator=g)]
    if n >= 8:
        x[:4] = torch.tensor([0.0, -0.0, 1e-30, -1.0])
    if not signed:
        x = x.abs()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("block_size", [64, 256, 4096], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("n", [0, 1, 7, 255, 4097, 70001], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits,signed", MAPS, ids=MAP_IDS)
def test_quantize_matches_reference(bits, signed, n, block_size, dtype):
    x = _hard_values(n, signed, dtype)
    codes, absmax = quantize_blockwise(x, bits, signed, block_size)
    ref_codes, ref_absmax = R.quantize_blockwise(x, bits, signed, block_size)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    back = dequantize_blockwise(codes, absmax, (n,), bits, signed, block_size)
    assert torch.equal(back, R.dequantize_blockwise(ref_codes, ref_absmax, bits, signed, block_size, n))


@pytest.mark.parametrize("bits,signed", MAPS, ids=MAP_IDS)
def test_quantize_is_nearest_code_at_midpoints(bits, signed):
    values = R.quantization_map(bits, signed)
    mids = (values[:-1] + values[1:]) / 2
    # Each midpoint, and the floats just below and above it, in a block whose absmax is 1.
    x = torch.cat([mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0))])
    x = torch.cat([x, torch.ones(1)])
    codes, _ = quantize_blockwise(x, bits, signed, 4096)
    got = values[_codes(codes, bits, x.numel()).long()]
    distance = (got - x).abs()
    best = (values[None, :] - x[:, None]).abs().min(dim=1).values
    # Nearest up to the rounding of the fp32 midpoint: at most a few ulps of x farther.
    assert bool((distance - best <= 4 * torch.finfo(torch.float32).eps * x.abs()).all())
    k = mids.numel()
    assert torch.equal(_codes(codes, bits, x.numel())[:k], torch.arange(k, dtype=torch.int32))  # ties go down


def test_nan_and_inf_follow_the_rule():
    x = torch.tensor([1.0, float("nan"), -2.0, 0.5])
    codes, absmax = quantize_blockwise(x, 8, True, 64)
    assert torch.equal(codes, R.quantize_blockwise(x, 8, True, 64)[0]) and absmax.isnan().all()
    y = torch.tensor([float("inf"), 1.0])
    assert torch.equal(quantize_blockwise(y, 8, True, 64)[0], R.quantize_blockwise(y, 8, True, 64)[0])


def _step_pair(cls, ref_cls, kwargs, shapes, dtype, steps, lr=1e-2, **extra):
    """Steps the fused and the reference optimizer from the same states, copying the fused states
    into the reference after each step, and yields (fused param, reference param, fused state,
    reference state) of every param after every step."""
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    ours = cls(ps, lr=lr, **kwargs, **extra)
    ref = ref_cls(qs, lr=lr, **kwargs, **extra)
    for _ in range(steps):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ps, qs):
            yield p, q, ours.state[p], ref.state[q], ours.param_groups[0]
            ref.state[q] = copy.deepcopy(ours.state[p])
            q.detach().copy_(p.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cls,ref_cls,kwargs", LOWBIT, ids=LOWBIT_IDS)
def test_step_matches_reference(cls, ref_cls, kwargs, dtype):
    shapes = [(300, 101), (17,), (4097,), (0,), (70001,)]  # 17 keeps float32 states
    differing = total = 0
    for p, q, state, ref_state, group in _step_pair(cls, ref_cls, kwargs, shapes, dtype, steps=4):
        assert set(state) == set(ref_state)
        for key, value in state.items():
            expected = ref_state[key]
            if value.dtype == torch.uint8:
                a, b = _codes(value, group["bits"], p.numel()), _codes(expected, group["bits"], p.numel())
                assert a.numel() == 0 or int((a - b).abs().max()) <= 1, key  # float rounding at a midpoint
                differing += int((a != b).sum())
                total += a.numel()
            else:
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
        # One ulp of the param's dtype (FMA contraction), wherever the codes agree.
        torch.testing.assert_close(p, q, rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert differing <= max(2, total // 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cls,ref_cls,kwargs", LOWBIT, ids=LOWBIT_IDS)
def test_thread_count_does_not_change_the_result(cls, ref_cls, kwargs, dtype):
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            p = torch.randn(300_001, dtype=dtype, requires_grad=True)
            opt = cls([p], **kwargs)
            for _ in range(3):
                p.grad = torch.randn_like(p)
                opt.step()
            results.append((p.detach().clone(), copy.deepcopy(opt.state[p])))
    finally:
        torch.set_num_threads(threads)
    (p1, s1), (p2, s2) = results
    assert torch.equal(p1, p2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cls,ref_cls,kwargs", LOWBIT, ids=LOWBIT_IDS)
def test_state_dict_round_trip_is_exact(cls, ref_cls, kwargs, dtype):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 3)).to(dtype)
    opt = cls(model.parameters(), **kwargs)
    data = torch.randn(16, 64, dtype=dtype)
    for _ in range(3):
        model(data).square().mean().backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin_model = copy.deepcopy(model)
    twin = cls(twin_model.parameters(), **kwargs)
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer))
    for a, b in ((model, opt), (twin_model, twin)):
        a(data).square().mean().backward()
        b.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], twin.state[q][k]) for k in opt.state[p])


@pytest.mark.parametrize("low,full", [(optim.AdamW8bit, optim.AdamW), (optim.AdamW4bit, optim.AdamW),
                                      (optim.Lion8bit, optim.Lion)], ids=["AdamW8bit", "AdamW4bit", "Lion8bit"])
def test_switching_between_fp32_and_lowbit_states(low, full):
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(100, 50))
    bias = torch.nn.Parameter(torch.randn(50))
    fp32 = full([weight, bias])
    for _ in range(2):
        weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
        fp32.step()
    lowbit = low([weight, bias])
    lowbit.load_state_dict(fp32.state_dict())
    group = lowbit.param_groups[0]
    for key in lowbit._state_keys:
        codes, absmax = quantize_blockwise(fp32.state[weight][key], group["bits"], key == "exp_avg",
                                           group["block_size"])
        assert torch.equal(lowbit.state[weight][f"{key}_codes"], codes)
        assert torch.equal(lowbit.state[weight][f"{key}_absmax"], absmax)
        assert torch.equal(lowbit.state[bias][key], fp32.state[bias][key])  # below min_8bit_size
    # And back: the fp32 optimizer reads the dequantized states.
    back = full([weight, bias])
    back.load_state_dict(lowbit.state_dict())
    for key in lowbit._state_keys:
        expected = dequantize_blockwise(lowbit.state[weight][f"{key}_codes"], lowbit.state[weight][f"{key}_absmax"],
                                        weight.shape, group["bits"], key == "exp_avg", group["block_size"])
        assert torch.equal(back.state[weight][key], expected)
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    back.step()


@pytest.mark.parametrize("cls,expected", [(optim.AdamW8bit, 2 + 2 * 4 / 256), (optim.AdamW4bit, 1 + 2 * 4 / 128),
                                          (optim.Lion8bit, 1 + 4 / 256)], ids=["AdamW8bit", "AdamW4bit", "Lion8bit"])
def test_state_bytes_per_param(cls, expected):
    # Codes plus one float32 absmax per block and state: 2.03 B (8-bit AdamW), 1.0625 B (4-bit).
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    p.grad = torch.zeros_like(p)
    opt = cls([p])
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert state_bytes / p.numel() == expected


@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["finite", "found_inf"])
def test_grad_scaler_tensors(found_inf):
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(p.detach().clone())
    scaled, plain = optim.AdamW8bit([p]), optim.AdamW8bit([q])
    grad = torch.randn(5000)
    p.grad, q.grad = grad * 1024, grad.clone()
    scaled.grad_scale, scaled.found_inf = torch.tensor([1024.0]), torch.tensor([found_inf])
    scaled.step()
    if found_inf:
        assert torch.equal(p.grad, grad * 1024) and scaled.state[p]["step"].item() == 0
        return
    plain.step()
    torch.testing.assert_close(p.grad, grad)  # left unscaled, as torch's fused optimizers do
    assert torch.equal(p, q)


def test_max_grad_norm_and_tensor_lr():
    torch.manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(6000)), torch.nn.Parameter(torch.randn(30))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    folded = optim.AdamW8bit(ps, lr=torch.tensor(0.01), max_grad_norm=0.5)
    plain = optim.AdamW8bit(qs, lr=0.01)
    for p, q in zip(ps, qs):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(qs, 0.5)
    folded.step()
    plain.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_param_groups_with_their_own_block_size():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(9000))
    opt = optim.AdamW8bit([{"params": [a], "block_size": 64}, {"params": [b]}])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[a]["exp_avg_absmax"].numel() == 79 and opt.state[b]["exp_avg_absmax"].numel() == 36


@pytest.mark.parametrize("kwargs,message", [
    ({"amsgrad": True}, "amsgrad=True is not supported"),
    ({"block_size": 100}, "block_size must be a power of two"),
    ({"block_size": 8192}, "block_size must be a power of two"),
    ({"min_8bit_size": -1}, "min_8bit_size must be an int >= 0"),
    ({"lr": -1.0}, "Invalid learning rate"),
], ids=["amsgrad", "block-size-not-power-of-two", "block-size-too-large", "min-size-negative", "lr"])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_op_names_the_wrong_state():
    p = torch.zeros(5000)
    codes, absmax = torch.zeros(5000, dtype=torch.uint8), torch.zeros(20)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_absmaxes\[0\] must have 20 elements"):
        OPS.fused_adam_lowbit_([p], [p.clone()], [codes], [absmax], [codes.clone()], [torch.zeros(3)],
                               [torch.zeros(())], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                               maximize=False, decoupled_weight_decay=True, bits=8, block_size=256)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4, got 2"):
        OPS.quantize_blockwise(p, bits=2, signed=True, block_size=256)


def test_a_failed_step_changes_nothing():
    p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(6000))
    before = p.detach().clone()
    opt = optim.AdamW8bit([{"params": [p]}, {"params": [q]}])
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.param_groups[1]["block_size"] = 100  # the second group fails its check
    with pytest.raises(ValueError, match="param group 1: block_size must be a power of two"):
        opt.step()
    assert not opt.state and torch.equal(p, before)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(1000, device=device)
    torch.library.opcheck(OPS.quantize_blockwise.default, (x,), {"bits": 8, "signed": True, "block_size": 256})
    codes, absmax = OPS.quantize_blockwise(x, bits=4, signed=False, block_size=128)
    torch.library.opcheck(OPS.dequantize_blockwise.default, (codes, absmax),
                          {"bits": 4, "signed": False, "block_size": 128, "numel": 1000})
    p, g = torch.randn(5000, device=device), torch.randn(5000, device=device)
    state = [torch.zeros(5000, dtype=torch.uint8, device=device), torch.zeros(20, device=device)]
    torch.library.opcheck(
        OPS.fused_adam_lowbit_.default,
        ([p], [g], [state[0]], [state[1]], [state[0].clone()], [state[1].clone()],
         [torch.zeros((), device=device)]),
        {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "eps": 1e-8, "maximize": False,
         "decoupled_weight_decay": True, "bits": 8, "block_size": 256})
    torch.library.opcheck(
        OPS.fused_lion_lowbit_.default,
        ([p.to(torch.bfloat16)], [g.to(torch.bfloat16)], [torch.zeros(5000, dtype=torch.uint8, device=device)],
         [torch.zeros(20, device=device)], [torch.zeros((), device=device)]),
        {"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "maximize": False, "bits": 8,
         "block_size": 256, "grad_scale": torch.tensor([4.0], device=device),
         "found_inf": torch.tensor([0.0], device=device)})


@pytest.mark.parametrize("cls,ref_cls,kwargs", LOWBIT, ids=LOWBIT_IDS)
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_cuda_matches_cpu(device, cls, ref_cls, kwargs):
    # Compared code-aware, one step at a time. nvcc contracts multiply-adds where the CPU build may
    # not (or the other way), so m and v can differ by one rounding; a value at a code midpoint
    # then gets the neighbouring code. Within a step that costs nothing (the param update reads
    # the fp32 m and v before they are quantized), but a later step would read the neighbouring
    # code's value and move the param by lr x a code gap. So each step starts from the CPU's
    # params and states, copied to the GPU, and the check is per step: codes within one, params
    # and absmax to fp32 rounding. (Making CUDA round exactly as each CPU build would need the
    # GPU to verify and would still differ between the CPU's AVX2 and default builds.)
    torch.manual_seed(5)
    cpu_params = [torch.nn.Parameter(torch.randn(s)) for s in ((300, 101), (70001,), (17,))]
    cuda_params = [torch.nn.Parameter(p.detach().to(device)) for p in cpu_params]
    cpu_opt, cuda_opt = cls(cpu_params, **kwargs), cls(cuda_params, **kwargs)
    bits = cpu_opt.param_groups[0]["bits"]
    for _ in range(3):
        for p, q in zip(cpu_params, cuda_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.to(device)
        cpu_opt.step()
        cuda_opt.step()
        for p, q in zip(cpu_params, cuda_params):
            torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)
            for key, value in cpu_opt.state[p].items():
                other = cuda_opt.state[q][key].cpu()
                if value.dtype == torch.uint8:
                    assert int((_codes(value, bits, p.numel()) - _codes(other, bits, p.numel())).abs().max()) <= 1
                else:
                    torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-7)
            with torch.no_grad():  # the next step starts from the same params and states
                q.copy_(p)
                for key, value in cpu_opt.state[p].items():
                    cuda_opt.state[q][key].copy_(value)


@pytest.mark.parametrize("bits,signed", MAPS, ids=MAP_IDS)
def test_lookup_table_agrees_with_search_on_a_float_sweep(bits, signed):
    # Every 4096th float32 bit pattern in [0, 1] and, for signed maps, [-1, 0]: the CPU's bucket
    # table ([Note: nearest-code lookup]) against searchsorted over the midpoints.
    magnitudes = torch.arange(0, 0x3F800001, 4096, dtype=torch.int32).view(torch.float32)
    x = torch.cat([magnitudes, -magnitudes]) if signed else magnitudes
    x = torch.cat([x, torch.ones(1)])  # absmax 1 in every block, so y = x
    x = x[: x.numel() // 4096 * 4096].view(-1, 4096)
    x[:, -1] = 1.0
    codes, _ = quantize_blockwise(x, bits, signed, 4096)
    assert torch.equal(codes, R.quantize_blockwise(x, bits, signed, 4096)[0])


@pytest.mark.parametrize("bits,signed", MAPS, ids=MAP_IDS)
def test_codes_next_to_every_midpoint_match_the_reference(bits, signed):
    # The 129 floats on either side of, and at, every midpoint of the map (and their negatives for
    # signed maps): where a vectorized code estimate would go wrong ([Note: vectorized nearest code]).
    midpoints = (R.quantization_map(bits, signed)[1:] + R.quantization_map(bits, signed)[:-1]) / 2
    midpoints = midpoints.abs().unique()
    offsets = torch.arange(-64, 65, dtype=torch.int32)
    magnitudes = (midpoints.view(torch.int32)[:, None] + offsets).reshape(-1).view(torch.float32).clamp(0, 1)
    x = torch.cat([magnitudes, -magnitudes]) if signed else magnitudes
    x = torch.nn.functional.pad(x, (0, -x.numel() % 4095), value=0.5).view(-1, 4095)
    x = torch.cat([torch.ones(x.shape[0], 1), x], dim=1)  # absmax 1 in every block, so y = x
    codes, _ = quantize_blockwise(x, bits, signed, 4096)
    assert torch.equal(codes, R.quantize_blockwise(x, bits, signed, 4096)[0])


def _avx512_vbmi_kernels() -> bool:
    """Whether this process runs the AVX-512 low-bit kernels (cpu_kernels() in csrc/cpu/parallel.cpp)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512vbmi" in flags


_THREE_STEPS = """
import sys, torch
from dldna_fused import optim
out = {}
for name, kwargs in [("AdamW8bit", {}), ("Adam8bit", {"weight_decay": 0.1}), ("AdamW4bit", {}),
                     ("Lion8bit", {"weight_decay": 0.1, "maximize": True})]:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for scale in (None, 1024.0):  # GradScaler's tensors: the grads are written back unscaled
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in ((300, 101), (70001,), (4113,), (17,))]
            opt = getattr(optim, name)(ps, min_8bit_size=0, **kwargs)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p) * (scale or 1.0)
                if scale is not None:
                    opt.grad_scale, opt.found_inf = torch.tensor([scale]), torch.tensor([0.0])
                opt.step()
            out[name, str(dtype), scale] = [(p.detach(), p.grad, dict(opt.state[p])) for p in ps]
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not _avx512_vbmi_kernels(), reason="needs the AVX-512 VBMI low-bit kernels")
def test_avx512_and_avx2_kernels_agree_bit_for_bit(tmp_path):
    # The same three steps with ATEN_CPU_CAPABILITY=avx2 (the AVX2 kernels) and =avx512: params,
    # grads and every state entry equal, for every low-bit class and param dtype, with and without
    # GradScaler's tensors.
    import os
    import subprocess
    import sys

    results = {}
    for capability in ("avx2", "avx512"):
        path = tmp_path / f"{capability}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        subprocess.run([sys.executable, "-c", _THREE_STEPS, str(path)], env=env, check=True)
        results[capability] = torch.load(path)
    assert results["avx2"].keys() == results["avx512"].keys()
    for case, tensors in results["avx512"].items():
        for (p, grad, state), (p2, grad2, state2) in zip(tensors, results["avx2"][case]):
            assert torch.equal(p, p2) and torch.equal(grad, grad2), case
            assert state.keys() == state2.keys()
            assert all(torch.equal(state[k], state2[k]) for k in state), case


@pytest.mark.slow
@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.Lion8bit], ids=["AdamW8bit", "Lion8bit"])
def test_compiled_step_has_no_graph_break_and_matches_eager(cls):
    torch.manual_seed(6)
    ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(100))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    compiled, eager = cls(ps), cls(qs)
    explained = cls([torch.nn.Parameter(p.detach().clone()) for p in ps])
    for p, q, r in zip(ps, qs, explained.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
        q.grad, r.grad = p.grad.clone(), p.grad.clone()
    explanation = torch._dynamo.explain(explained.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.compile(compiled.step)()
    eager.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert all(torch.equal(compiled.state[p][k], eager.state[q][k]) for k in eager.state[q])


def test_changing_min_8bit_size_converts_the_states():
    torch.manual_seed(7)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = optim.AdamW8bit([p], min_8bit_size=10_000)  # float32 states first
    p.grad = torch.randn_like(p)
    opt.step()
    exp_avg = opt.state[p]["exp_avg"].clone()
    opt.param_groups[0]["min_8bit_size"] = 0
    opt.step()
    assert "exp_avg" not in opt.state[p] and "exp_avg_codes" in opt.state[p]
    # The momentum carried over: quantized, then one more step of the same gradient.
    expected = 0.9 * dequantize_blockwise(*quantize_blockwise(exp_avg, 8, True, 256), (5000,)) + 0.1 * p.grad
    got = dequantize_blockwise(opt.state[p]["exp_avg_codes"], opt.state[p]["exp_avg_absmax"], (5000,))
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())


def test_lists_are_reused_after_a_load():
    # A rebuild after load_state_dict keeps the loaded (packed) state tensors; it does not copy them.
    p = torch.nn.Parameter(torch.randn(5000))
    opt = optim.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    loaded = dict(opt.state[p])
    opt.step()
    opt.step()
    assert all(opt.state[p][k] is t for k, t in loaded.items())
