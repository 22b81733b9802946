"""The per-rank side of test_deepspeed.py, run under torchrun with DS_ACCELERATOR=cpu: one ZeRO
stage with CPU offload ("offload_optimizer": {"device": "cpu"}), a small model trained for STEPS
steps with each client optimizer, and a save_checkpoint/load_checkpoint round trip mid-run.

    python -m torch.distributed.run --nproc-per-node 2 deepspeed_worker.py STAGE OUT_DIR

Rank 0 writes OUT_DIR/stage<STAGE>.json: per client, the losses of every rank (gathered) and
whether the reloaded run continued as the uninterrupted one did."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR)

from dldna_fused import optim  # noqa: E402

STEPS = 6
LR = 1e-2
CLIP = 0.5  # DeepSpeed's own gradient clipping, below the grads' norm: every step clips
# The client optimizers: ours, fp32 and 8-bit states, against DeepSpeed's own CPU Adam.
CLIENTS = ["dldna_fused.AdamW", "dldna_fused.AdamW8bit", "DeepSpeedCPUAdam"]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def config(stage: int, client: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
           # The two flags that let a ZeRO-Offload run step a client optimizer on the host.
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    if client == "DeepSpeedCPUAdam":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}
    return cfg


def engine_for(stage: int, client: str):
    net = model()
    if client == "DeepSpeedCPUAdam":
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config(stage, client))
        return engine
    cls = optim.AdamW if client == "dldna_fused.AdamW" else optim.AdamW8bit
    # min_8bit_size=0: every partition quantized, whatever its size.
    extra = {} if cls is optim.AdamW else {"min_8bit_size": 0}
    opt = cls(net.parameters(), lr=LR, weight_decay=0.01, **extra)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config(stage, client))
    return engine


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(engine, steps, rank: int) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step, rank)
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    stage, out = int(sys.argv[1]), Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for client in CLIENTS:
        engine = engine_for(stage, client)
        losses = train(engine, range(STEPS), rank)
        # Half way: save, build a fresh engine from other weights, load, and continue both.
        first = engine_for(stage, client)
        train(first, range(STEPS // 2), rank)
        folder = out / f"ckpt-{stage}-{client}"
        first.save_checkpoint(str(folder), tag="half")
        second = engine_for(stage, client)
        train(second, [STEPS + 7], rank)  # moves its weights and states away from the checkpoint's
        second.load_checkpoint(str(folder), tag="half")
        continued = train(first, range(STEPS // 2, STEPS), rank)
        reloaded = train(second, range(STEPS // 2, STEPS), rank)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"losses": losses, "continued": continued, "reloaded": reloaded,
                                          "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__})
        results[client] = gathered
    if rank == 0:
        (out / f"stage{stage}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # DeepSpeed's CPU accelerator leaves native threads behind (its shared-memory comm op), which
    # can abort the interpreter's teardown ("terminate called without an active exception", seen
    # once in CI after the results were written). Everything is written and the process group is
    # gone, so the teardown is skipped.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
