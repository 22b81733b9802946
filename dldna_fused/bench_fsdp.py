"""The FSDP2 rows of ``dldna-fused bench --offload``: AdamW stepping the sharded params of
``fully_shard(..., offload_policy=CPUOffloadPolicy())`` in host memory, on 2 gloo ranks of one
thread each. Ours on the DTensor shards against torch's fused and foreach AdamW on the same
shards, and against ours on the same shards as plain tensors (what the DTensor path costs)."""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile

import torch

WORLD = 2
# AdamW reads p, g, m, v and writes p, m, v: 7 fp32 elements per param element.
BYTES_PER_ELEMENT = 7 * 4
IMPLEMENTATIONS = ("dldna_fused on DTensor shards", "dldna_fused on plain shards", "torch fused on DTensor shards",
                   "torch foreach on DTensor shards")
BASELINE = "torch fused on DTensor shards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, layers: int, width: int, warmup: int, repeats: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from dldna_fused import optim
    from dldna_fused.bench import _time_interleaved, copy_bandwidth, optimizer_state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per rank, as ranks on one host share its cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        mesh = init_device_mesh("cpu", (world,))
        policy = CPUOffloadPolicy(pin_memory=False)
        for layer in model:
            fully_shard(layer, mesh=mesh, offload_policy=policy)
        fully_shard(model, mesh=mesh, offload_policy=policy)
        model(torch.randn(8, width)).pow(2).mean().backward()
        params = list(model.parameters())  # DTensors in host memory, with their DTensor grads
        plain = []
        for p in params:
            q = torch.nn.Parameter(p.to_local().detach().clone())
            q.grad = p.grad.to_local().clone()
            plain.append(q)
        optimizers = {
            "dldna_fused on DTensor shards": optim.AdamW(params, lr=1e-3),
            "dldna_fused on plain shards": optim.AdamW(plain, lr=1e-3),
            "torch fused on DTensor shards": torch.optim.AdamW(params, lr=1e-3, fused=True),
            "torch foreach on DTensor shards": torch.optim.AdamW(params, lr=1e-3, foreach=True),
        }
        for opt in optimizers.values():
            opt.step()  # creates the states
        local = sum(q.numel() for q in plain)
        dist.barrier()
        copy_gbps = copy_bandwidth(local, torch.float32, "cpu", warmup, repeats)
        times = _time_interleaved({name: opt.step for name, opt in optimizers.items()}, "cpu", warmup, repeats,
                                  budget_s=30.0)
        result = {"local_elements": local, "copy_gbps": copy_gbps,
                  "times": times, "state_bytes": {n: optimizer_state_bytes(o) for n, o in optimizers.items()}}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(layers: int, width: int, warmup: int, repeats: int) -> list:
    """The rows (rank 0's medians; each rank steps its own half of every layer at once)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from dldna_fused.bench import Row

    if not (dist.is_available() and dist.is_gloo_available()):
        return []
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(WORLD, _free_port(), layers, width, warmup, repeats, folder), nprocs=WORLD)
        with open(os.path.join(folder, "rank0.json")) as f:
            result = json.load(f)
    label = f"{layers} x {width}x{width}, {WORLD} ranks"
    medians = {name: statistics.median(result["times"][name]) for name in IMPLEMENTATIONS}
    base = medians[BASELINE]
    return [Row(optimizer="offload-fsdp2", shape=label, implementation=name, median_ms=medians[name] * 1e3,
                speedup=base / medians[name], baseline=BASELINE,
                effective_gbps=BYTES_PER_ELEMENT * result["local_elements"] / medians[name] / 1e9,
                copy_gbps=result["copy_gbps"], state_bytes=result["state_bytes"][name],
                repeats=len(result["times"][name]))
            for name in IMPLEMENTATIONS]
