"""Moving the small tensors a step reads (clip factors, GradScaler's scale and found_inf) to the
device of each op call."""

from __future__ import annotations

import torch


def scalar_to(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``t`` on ``device`` as ``dtype``. A copy to an accelerator is non-blocking: it is ordered
    before the kernels that read it on that device's stream. A copy to the host is blocking: a
    non-blocking device-to-host copy returns before the value has landed, and the CPU kernel that
    reads it at once would see stale memory. It is one number per step, so the sync costs nothing
    that matters."""
    device = torch.device(device)
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")
