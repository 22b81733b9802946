"""Data-parallel training with a fused optimizer: the chapter's MLP on digits, one process per
rank on the CPU (gloo) or one per GPU (nccl).

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py [--optimizer adamw] [--epochs 5]

Each rank reads its own shard of the training set (DistributedSampler); DDP averages the
gradients, and every rank runs the same fused step on its full copy of the weights.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from dldna_fused import optim
from dldna_fused.experiments import SimpleNetwork, get_dataset

# Every dldna_fused optimizer works under DDP: each rank steps its full copy of the weights.
OPTIMIZERS = {"adam": (optim.Adam, dict(lr=1e-3)), "adamw": (optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
              "lion": (optim.Lion, dict(lr=1e-4)), "sophia": (optim.Sophia, dict(lr=1e-3)),
              "adafactor": (optim.Adafactor, dict()), "adamw8bit": (optim.AdamW8bit, dict(lr=1e-3)),
              "adam8bit": (optim.Adam8bit, dict(lr=1e-3)), "adamw4bit": (optim.AdamW4bit, dict(lr=1e-3)),
              "lion8bit": (optim.Lion8bit, dict(lr=1e-4))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--out", default="results/ddp",
                        help="folder (made if missing, relative to the current directory) where rank 0 writes "
                             "model.pt, the trained weights; default results/ddp")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    train, test = get_dataset("digits")
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DDP(SimpleNetwork(input_shape=64).to(device), device_ids=[device.index] if cuda else None)
    cls, kwargs = OPTIMIZERS[args.optimizer]
    opt = cls(model.parameters(), **kwargs)

    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        total, count = torch.zeros(2, device=device), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total[0] += loss.detach() * len(x)
            total[1] += len(x)
        dist.all_reduce(total)
        model.eval()
        with torch.no_grad():
            x, y = test.tensors[0].to(device), test.tensors[1].to(device)
            accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        if rank == 0:
            print(f"rank {rank}/{world} epoch {epoch}: train loss {(total[0] / total[1]).item():.4f}, "
                  f"test accuracy {accuracy:.4f}", flush=True)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(model.module.state_dict(), Path(args.out) / "model.pt")
        print(f"wrote the trained weights to {Path(args.out).resolve() / 'model.pt'}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
