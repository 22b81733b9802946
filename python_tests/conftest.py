"""Shared fixtures and the one tolerance table of the parity tests."""

import importlib.util

import pytest
import torch

import dldna_fused  # noqa: F401  (loads the ops)

CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not (torch.cuda.is_available() and dldna_fused.ops.has_kernel("cuda")),
                             reason="needs an NVIDIA GPU and the CUDA kernels"),
)
DEVICES = ["cpu", CUDA]

# The analysis extras' own dependencies (requirements.txt installs both); the GPU machine's image
# has neither and installs nothing, so the tests that need them skip there and run here.
NEEDS_GUDHI = pytest.mark.skipif(importlib.util.find_spec("gudhi") is None, reason="needs gudhi (topology)")
NEEDS_PYWT = pytest.mark.skipif(importlib.util.find_spec("pywt") is None, reason="needs pywavelets (multiscale)")

# fp32: relative error (by norm, per tensor) of fused vs reference. Both run fp32 math; they differ
# in operation order (torch's lerp/addcmul) and in FMA contraction (the AVX2 and CUDA builds fuse
# b2*v + (1-b2)*g*g): up to a few ulps per state per step. Over a tensor of n elements these
# independent errors average down by sqrt(n), so 1e-6 holds for all but tiny tensors; a 1-element
# tensor gets no averaging (its v was measured 3.8e-6 apart after 8 steps), so the bound is
# 4 ulps per step, divided by sqrt(n), and never below 1e-6.
FP32_RTOL = 1e-6


def fp32_tolerance(numel: int, steps: int) -> float:
    return max(FP32_RTOL, 4 * steps * torch.finfo(torch.float32).eps / max(numel, 1) ** 0.5)


# fp16/bf16: our error against a float64 run must be at most this multiple of torch.optim's error
# at the same dtype (the "2x the error of the same computation in torch" rule).
LOW_PRECISION_FACTOR = 2.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 for two empty or two zero tensors)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures the plotting functions return stay open in pyplot; close them after each test."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
