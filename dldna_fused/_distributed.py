"""DTensor plumbing shared by the optimizers and the clipping functions (see [Note: sharded
params] in dldna_fused/optim/_group_lists.py)."""

from __future__ import annotations

import torch


def dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch.distributed is not built."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def to_local(tensors: list) -> list:
    """``tensors`` with each DTensor replaced by its local shard (see [Note: sharded params])."""
    DTensor = dtensor_type()
    if DTensor is None or not any(isinstance(t, DTensor) for t in tensors):
        return tensors
    with torch.no_grad():
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
