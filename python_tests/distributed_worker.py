"""The per-rank side of test_distributed.py: each scenario trains a small model under DDP,
ZeroRedundancyOptimizer or FSDP2 (gloo, CPU) and saves what the test compares."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dldna_fused
from dldna_fused import optim

STEPS = 4
CLIP = 0.05  # below the gradients' norm, so every step clips
GLOBAL_BATCH = 16
OPTIMIZERS = {
    "adam": (optim.Adam, dict(lr=1e-2)),
    "adamw": (optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "lion": (optim.Lion, dict(lr=1e-3, weight_decay=0.1)),
    "sophia": (optim.Sophia, dict(lr=1e-2, rho=0.05, k=2)),
    "adafactor": (optim.Adafactor, dict(beta1=0.9, weight_decay=0.01)),
}
# Low-bit states, every param quantized (the model is tiny); under FSDP2 the blocks are the local
# shard's, so only DDP and ZeRO reproduce a single process exactly.
LOWBIT = {"adamw8bit": (optim.AdamW8bit, dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0, block_size=64))}
ALL = {**OPTIMIZERS, **LOWBIT}


class Net(nn.Module):
    """Matrices split evenly (16 x 8) and unevenly (5 x 16) over two ranks, a 3-D parameter (a batch
    of matrices for AdaFactor), and 1-D biases."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)
        self.mix = nn.Parameter(torch.randn(6, 5, 3) * 0.3)
        self.head = nn.Linear(18, 4)

    def forward(self, x):
        h = self.fc2(F.relu(self.fc1(x)))
        h = torch.einsum("bi,kij->bkj", h, self.mix).reshape(len(x), 18)
        return self.head(torch.tanh(h))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def train(model, opt, data, hessian_opt=None):
    """STEPS steps; Sophia's Hessian from the batch loss's grads every other step (averaged across
    ranks by the wrapper exactly as the gradients are)."""
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if hessian_opt is not None and step % 2 == 1:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            hessian_opt.update_hessian()
            opt.zero_grad()


def single_process(name: str):
    cls, kwargs = ALL[name]
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, batches(), opt if name == "sophia" else None)
    return model, opt


def local_half(data, rank: int, world: int):
    per = GLOBAL_BATCH // world
    return [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) for x, y in data]


def run_ddp(name, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    cls, kwargs = ALL[name]
    model = DDP(make_model())
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, local_half(batches(), rank, world), opt if name == "sophia" else None)
    return {"params": [p.detach().clone() for p in model.module.parameters()],
            "steps": [opt.state[p]["step"].item() for p in model.module.parameters()]}


def run_zero(name, rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    cls, kwargs = ALL[name]
    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
    train(model, opt, local_half(batches(), rank, world), opt.optim if name == "sophia" else None)
    opt.consolidate_state_dict(to=0)
    out = {"params": [p.detach().clone() for p in model.module.parameters()]}
    if rank == 0:
        # The consolidated state loads into an unsharded optimizer of the same class.
        fresh = make_model()
        for p, q in zip(fresh.parameters(), model.module.parameters()):
            p.data.copy_(q.detach())
        unsharded = cls(fresh.parameters(), **kwargs)
        unsharded.load_state_dict(opt.state_dict())
        out["state"] = [{k: v.clone() for k, v in unsharded.state[p].items()} for p in fresh.parameters()]
    return out


def shard(model, world, offload=False):
    """FSDP2 over the ranks; with ``offload``, CPUOffloadPolicy: the sharded params, their grads
    and so the optimizer states live on the host and the step runs there (on this CPU-only
    machine that is where they were anyway, but FSDP2 takes its offload code path)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload else {}
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    return model


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_fsdp(name, rank, world, offload=False):
    cls, kwargs = ALL[name]
    model = shard(make_model(), world, offload)
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, local_half(batches(), rank, world), opt if name == "sophia" else None)
    return {"params": [full(p.detach()) for p in model.parameters()],
            "state": [{k: full(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]}


def run_fsdp_checkpoint(name, rank, world, folder: Path, offload=False):
    """Two steps, a torch.distributed.checkpoint save, a fresh model and optimizer loaded from it,
    two more steps on both: they must end equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    cls, kwargs = ALL[name]
    data = local_half(batches(), rank, world)
    model = shard(make_model(), world, offload)
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, data[:2])
    model_sd, optim_sd = get_state_dict(model, opt)
    checkpoint = str(folder / f"{name}{'-offload' if offload else ''}")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    restored = shard(Net(), world, offload)  # other initial weights: the checkpoint must overwrite them
    restored_opt = cls(restored.parameters(), **kwargs)
    model_sd, optim_sd = get_state_dict(restored, restored_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(restored, restored_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, data[2:])
    train(restored, restored_opt, data[2:])
    return {"original": [full(p.detach()) for p in model.parameters()],
            "restored": [full(p.detach()) for p in restored.parameters()]}


# bf16 params written with Kahan summation or stochastic rounding ([Note: bf16 param writes]):
# AdamW's sharded step runs the kernels on the local shards, AdaFactor's the torch-op path.
WRITES = {"kahan": dict(kahan_sum=True), "stochastic": dict(bf16_stochastic_round=True, seed=5)}


def train_bf16(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()


def single_process_bf16(name: str, write: str):
    cls, kwargs = ALL[name]
    model = make_model().bfloat16()
    opt = cls(model.parameters(), **kwargs, **WRITES[write])
    train_bf16(model, opt, batches())
    return model, opt


def run_fsdp_bf16(name, write, rank, world):
    cls, kwargs = ALL[name]
    model = shard(make_model().bfloat16(), world)
    opt = cls(model.parameters(), **kwargs, **WRITES[write])
    train_bf16(model, opt, local_half(batches(), rank, world))
    return {"params": [full(p.detach()) for p in model.parameters()],
            "comps": [full(opt.state[p]["kahan_comp"]) if "kahan_comp" in opt.state[p] else None
                      for p in model.parameters()]}


def run_unused(rank, world):
    """Rank 1 skips fc2's bias on step 1 (a rank-dependent branch); DDP's averaged gradient still
    reaches it, so every rank steps it and the step counts agree."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x, use_b):
            return self.b(self.a(x)) if use_b else self.a(x)

    torch.manual_seed(0)
    model = DDP(Branchy(), find_unused_parameters=True)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 4), use_b=not (rank == 1 and step == 1)).square().mean().backward()
        opt.step()
    return {"steps": [opt.state[p]["step"].item() for p in model.module.parameters()]}


def train_clipped(model, opt, data, clip=None):
    """STEPS steps with the gradient norm clipped to CLIP: by ``clip(params, CLIP)`` before the step,
    or (clip None) by the optimizer's max_grad_norm. Returns the norms each step saw."""
    norms = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            norms.append(full(clip(model.parameters(), CLIP)).detach().clone())
        opt.step()
        if clip is None:
            norms.append(full(opt.last_grad_norm).detach().clone())
    return norms


def single_process_clipped():
    model = make_model()
    norms = train_clipped(model, optim.AdamW(model.parameters(), lr=1e-2), batches(), torch.nn.utils.clip_grad_norm_)
    return model, norms


def run_clipping(mode, folded, rank, world):
    """AdamW with the gradient norm clipped under DDP or FSDP2: folded (max_grad_norm) or through
    dldna_fused.clip_grad_norm_ (on FSDP2's DTensor grads, the norm over both ranks)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model()) if mode == "ddp" else shard(make_model(), world, offload=mode == "fsdp-offload")
    data = local_half(batches(), rank, world)
    if folded:
        norms = train_clipped(model, optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=CLIP), data)
    else:
        norms = train_clipped(model, optim.AdamW(model.parameters(), lr=1e-2), data, dldna_fused.clip_grad_norm_)
    module = model.module if mode == "ddp" else model
    return {"params": [full(p.detach()) for p in module.parameters()], "norms": norms}


def worker(rank: int, world: int, folder: str):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        results = {}
        for name in ALL:
            results[("ddp", name)] = run_ddp(name, rank, world)
            results[("zero", name)] = run_zero(name, rank, world)
            results[("fsdp", name)] = run_fsdp(name, rank, world)
            results[("fsdp-offload", name)] = run_fsdp(name, rank, world, offload=True)
        for name in ("adamw", "adafactor", "adamw8bit"):
            results[("checkpoint", name)] = run_fsdp_checkpoint(name, rank, world, Path(folder))
            results[("checkpoint-offload", name)] = run_fsdp_checkpoint(name, rank, world, Path(folder), offload=True)
        results[("unused", "adamw")] = run_unused(rank, world)
        for name in ("adamw", "adafactor"):
            for write in WRITES:
                results[("fsdp-bf16", name, write)] = run_fsdp_bf16(name, write, rank, world)
        for mode in ("ddp", "fsdp", "fsdp-offload"):
            for folded in (False, True):
                results[("clip", mode, folded)] = run_clipping(mode, folded, rank, world)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
