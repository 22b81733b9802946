"""What the references with ``state_dtype`` share: a load that keeps the states' dtype."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class StateDtypeLoading(Optimizer):
    """torch.optim's ``load_state_dict`` casts every floating-point state to its param's dtype,
    which rounds the float32 states of a bf16/fp16 param under ``state_dtype=torch.float32``.
    After it, those states are taken from the state_dict again in the group's ``state_dtype``."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        dtypes = {id(p): group.get("state_dtype") for group in self.param_groups for p in group["params"]}
        for p, index in zip(params, ids):
            dtype = dtypes[id(p)]
            if dtype is None or index not in saved:
                continue
            for key, value in saved[index].items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
