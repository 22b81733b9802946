"""The closure convention every optimizer here shares with torch.optim."""

from __future__ import annotations

import torch


def closure_loss(closure):
    """The loss of ``closure`` evaluated with grad enabled (steps run under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
