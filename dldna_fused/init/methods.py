"""The chapter's weight initializations, each for a whole model or a single tensor.

A method called on a module initializes the weights of every Linear and Conv layer, in module
order, and sets their biases to zero; called on a tensor it initializes that tensor. Conv weights
``out x in x kh x kw`` count ``in * kh * kw`` as their fan-in and are orthogonalized as
``out x (in * kh * kw)`` matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model``'s Linear and Conv layers, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() > 1 else weight.shape[0]


def _model_level(fn):
    """Marks ``fn(tensor, ...)`` as one of ours and lets it take a module: each weight layer's weight
    gets ``fn`` and its bias zero. Runs under no_grad; returns its target."""

    def apply(target, *args, **kwargs):
        with torch.no_grad():
            if isinstance(target, torch.Tensor):
                fn(target, *args, **kwargs)
                return target
            for _, layer in weight_layers(target):
                fn(layer.weight, *args, **kwargs)
                if layer.bias is not None:
                    layer.bias.zero_()
            return target

    apply.__name__, apply.__doc__, apply.__wrapped__ = fn.__name__, fn.__doc__, fn
    apply.model_level = True
    return apply


@_model_level
def lecun(weight: torch.Tensor) -> None:
    """LeCun (1998): normal with std = 1/sqrt(fan_in), which keeps the forward variance of a linear
    layer (Var(W) = 1/n_in)."""
    weight.normal_(0.0, 1.0 / math.sqrt(fan_in(weight)))


@_model_level
def xavier_normal(weight: torch.Tensor, gain: float = 1.0) -> None:
    """Glorot & Bengio (2010): normal with std = gain * sqrt(2 / (fan_in + fan_out))."""
    nn.init.xavier_normal_(weight, gain=gain)


@_model_level
def kaiming_normal(weight: torch.Tensor, nonlinearity: str = "relu", a: float = 0.0) -> None:
    """He et al. (2015): normal with std = gain / sqrt(fan_in), gain = sqrt(2) for ReLU
    (sqrt(2 / (1 + a^2)) for leaky ReLU with slope a)."""
    nn.init.kaiming_normal_(weight, a=a, mode="fan_in", nonlinearity=nonlinearity)


@_model_level
def orthogonal(weight: torch.Tensor, gain: float = 1.0) -> None:
    """Saxe et al. (2014): a (semi-)orthogonal matrix (all singular values = gain)."""
    nn.init.orthogonal_(weight, gain=gain)


@_model_level
def scaled_orthogonal(weight: torch.Tensor, nonlinearity: str = "relu") -> None:
    """Orthogonal times the activation's gain (torch.nn.init.calculate_gain: sqrt(2) for ReLU, 5/3
    for tanh, 1 for linear): every singular value equals the gain, so a ReLU layer, which halves
    the signal's second moment, passes it on at the same scale (Saxe et al. 2014 with He et al.'s
    ReLU correction)."""
    nn.init.orthogonal_(weight, gain=nn.init.calculate_gain(nonlinearity))


@_model_level
def l_momentum(weight: torch.Tensor, momentum: float = 0.9) -> None:
    """A documented heuristic, not a published method: we found no source for the chapter's
    "L-Momentum initialization (2024)". Its formula: W ~ U(-sqrt(6/n_in), sqrt(6/n_in)), then
    W <- W * sqrt(alpha / Var(W)) with alpha = momentum^2. The result has variance alpha whatever
    the layer's size (std 0.9 at the default momentum), far above 1/n_in for any realistic width;
    the chapter's own run with it diverged (nan)."""
    bound = math.sqrt(6.0 / fan_in(weight))
    weight.uniform_(-bound, bound)
    var = weight.var()
    if var > 0:
        weight.mul_(math.sqrt(momentum**2 / var.item()))


def emergence_promoting(target, alpha: float = 1.1, base: str = "kaiming"):
    """Li, George & Silva (2024), "Advancing Neural Network Performance through Emergence-Promoting
    Initialization Scheme" (arXiv:2407.19044): a standard initialization (``base``: "kaiming" or
    "xavier"), then layer-wise scaling around the middle of the network. With L weight layers in
    module order, the n-th layer before the middle is divided by alpha^n and the n-th after it
    multiplied by alpha^n (the middle layer of an odd L is unchanged), so early layers shrink,
    late layers grow and the product of all scales is 1. ``alpha`` = 1.1 is our default; the
    paper tunes it per architecture (larger with batch normalization). A single tensor gets the
    base initialization only (it has no position in a network).

    (The chapter attributes a different formula, nu_l = (1 + ln l / ln d) / sqrt(d_in), to "Chen
    et al. 2023"; we found no such paper and do not implement it.)
    """
    if base not in ("kaiming", "xavier"):
        raise ValueError(f"base must be 'kaiming' or 'xavier', got {base!r}")
    base_init = kaiming_normal if base == "kaiming" else xavier_normal
    base_init(target)
    if isinstance(target, torch.Tensor):
        return target
    layers = weight_layers(target)
    with torch.no_grad():
        for (_, layer), scale in zip(layers, emergence_scales(len(layers), alpha)):
            layer.weight.mul_(scale)
    return target


emergence_promoting.model_level = True


def emergence_scales(num_layers: int, alpha: float) -> list[float]:
    """The per-layer factors of ``emergence_promoting``: alpha^-n ... 1 ... alpha^n."""
    half = num_layers // 2
    scales = [alpha ** -(half - i) for i in range(half)]
    if num_layers % 2:
        scales.append(1.0)
    return scales + [alpha ** (i + 1) for i in range(half)]


init_methods = {
    "lecun": lecun,
    "xavier_normal": xavier_normal,
    "kaiming_normal": kaiming_normal,
    "orthogonal": orthogonal,
    "scaled_orthogonal": scaled_orthogonal,
    "l-momentum": l_momentum,
    "emergence_promoting": emergence_promoting,
}


# The chapter's own names (``from ...initialization.base import init_weights_lecun, ...``).
init_weights_lecun = lecun
init_weights_xavier_normal = xavier_normal
init_weights_kaiming_normal = kaiming_normal
init_weights_orthogonal = orthogonal
init_weights_scaled_orthogonal = scaled_orthogonal
init_weights_lmomentum = l_momentum
init_weights_emergence = emergence_promoting


def apply_init(method, model: nn.Module) -> nn.Module:
    """Initializes ``model`` with ``method``: one of ours (it takes the module) or a tensor
    initializer such as ``torch.nn.init.xavier_normal_`` (applied to every Linear/Conv weight,
    biases set to zero), as the chapter's ``init_methods`` mixes both."""
    if getattr(method, "model_level", False):
        return method(model)
    with torch.no_grad():
        for _, layer in weight_layers(model):
            method(layer.weight)
            if layer.bias is not None:
                layer.bias.zero_()
    return model
