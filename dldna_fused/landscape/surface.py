"""Loss surfaces along two directions and linear interpolation between two models.

[Note: grid evaluation]
A grid point sets every parameter to theta + a*d1 + b*d2 in place (foreach ops, no state_dict
load, no model copy), under no_grad, and evaluates the loss under inference_mode on batches moved
to the device once. The parameters and buffers are cloned before and copied back afterwards, in a
finally block, so the model is bitwise unchanged even when the loss raises. The model is in eval
mode meanwhile (its mode is restored). Points are evaluated one after the other: batched
evaluation of many points (torch.func.functional_call + vmap) was reported slower on the CPU for
small models by the issue that asked for this function; we have not measured it ourselves.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from dldna_fused.landscape._vectors import trainable
from dldna_fused.landscape.hessian import eval_mode


def _cache(data_loader, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.to(device), y.to(device)) for x, y in data_loader]


@torch.inference_mode()
def _loss_and_accuracy(model: nn.Module, batches, loss_func) -> tuple[float, float]:
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in batches:
        out = model(x)
        loss_sum += loss_func(out, y).item() * len(x)
        if out.dim() == 2 and y.dim() == 1:
            correct += (out.argmax(dim=1) == y).sum().item()
        total += len(x)
    return loss_sum / total, correct / total


def default_lambdas(radius: float = 1.0, points: int = 41) -> np.ndarray:
    """``points`` coordinates from -radius to radius; an odd count includes the centre (0), which an
    even one misses."""
    return np.linspace(-radius, radius, points).astype(np.float32)


def xy_perturb_loss(model: nn.Module, top_eigenvectors, data_loader, loss_func, lambda1=None, lambda2=None,
                    device=None, progress: bool | None = None):
    """The loss on the plane theta + a*d1 + b*d2, with (d1, d2) = ``top_eigenvectors`` (two
    directions: lists of per-parameter tensors, e.g. from ``hessian_eigenvectors`` or
    ``random_directions``). ``lambda1``/``lambda2`` are the a and b coordinates (default 41 points
    in [-1, 1], centre included). Returns ``(X, Y, Z)`` as ``numpy.meshgrid(lambda1, lambda2)``:
    ``Z[i, j]`` is the loss at a = lambda1[j], b = lambda2[i]. See [Note: grid evaluation];
    ``progress`` (default: on for more than 400 points) shows a tqdm bar.
    """
    from tqdm.auto import tqdm

    if len(top_eigenvectors) != 2:
        raise ValueError(f"need exactly two directions, got {len(top_eigenvectors)}")
    lambda1 = default_lambdas() if lambda1 is None else np.asarray(lambda1)
    lambda2 = default_lambdas() if lambda2 is None else np.asarray(lambda2)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    params = trainable(model)
    d1 = [d.to(device=device, dtype=p.dtype) for d, p in zip(top_eigenvectors[0], params)]
    d2 = [d.to(device=device, dtype=p.dtype) for d, p in zip(top_eigenvectors[1], params)]
    if len(d1) != len(params) or any(a.shape != p.shape for a, p in zip(d1 + d2, params + params)):
        raise ValueError("each direction needs one tensor per trainable parameter, of its shape")
    batches = _cache(data_loader, device)
    base = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    Z = np.empty((len(lambda2), len(lambda1)))
    show = progress if progress is not None else Z.size > 400
    bar = tqdm(total=Z.size, desc="loss surface", disable=not show, leave=False)  # transient: no line left
    try:
        with eval_mode(model), torch.no_grad():
            for i, b in enumerate(lambda2):
                for j, a in enumerate(lambda1):
                    torch._foreach_copy_(params, base)
                    torch._foreach_add_(params, d1, alpha=float(a))
                    torch._foreach_add_(params, d2, alpha=float(b))
                    Z[i, j] = _loss_and_accuracy(model, batches, loss_func)[0]
                    bar.update(1)
    finally:
        bar.close()
        with torch.no_grad():
            torch._foreach_copy_(params, base)
            for buf, saved in zip(model.buffers(), buffers):
                buf.copy_(saved)
    X, Y = np.meshgrid(lambda1, lambda2)
    return X, Y, Z


def linear_interpolation(model1: nn.Module, model2: nn.Module, data_loader, loss_func, device=None, alphas=None,
                         interpolate_buffers: bool = True):
    """Loss and accuracy of the models with weights (1 - alpha) w1 + alpha w2, for each alpha
    (default 21 points in [0, 1]). Floating-point buffers (BatchNorm's running mean and variance)
    are interpolated the same way when ``interpolate_buffers``, else taken from ``model1``; integer
    buffers (``num_batches_tracked``) come from ``model1``. Neither model is changed. Returns
    ``(alphas, losses, accuracies)``.
    """
    alphas = np.linspace(0.0, 1.0, 21) if alphas is None else np.asarray(alphas, dtype=float)
    device = torch.device(device) if device is not None else next(model1.parameters()).device
    work = copy.deepcopy(model1).to(device)
    s1 = {k: v.to(device) for k, v in model1.state_dict().items()}
    s2 = {k: v.to(device) for k, v in model2.state_dict().items()}
    if s1.keys() != s2.keys() or any(s1[k].shape != s2[k].shape for k in s1):
        raise ValueError("the two models must have the same parameters and buffers (names and shapes)")
    param_names = {name for name, _ in work.named_parameters()}
    batches = _cache(data_loader, device)
    losses, accuracies = [], []
    state = work.state_dict()
    with eval_mode(work), torch.no_grad():
        for alpha in alphas:
            for name, tensor in state.items():
                mix = name in param_names or (interpolate_buffers and tensor.is_floating_point())
                if mix:
                    torch.lerp(s1[name], s2[name], float(alpha), out=tensor)
                else:
                    tensor.copy_(s1[name])
            loss, accuracy = _loss_and_accuracy(work, batches, loss_func)
            losses.append(loss)
            accuracies.append(accuracy)
    return alphas, losses, accuracies
