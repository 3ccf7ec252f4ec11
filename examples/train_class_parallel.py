"""A tiny class-parallel training run: a DDP backbone and an ``mvloss.distributed.ClassParallelHead``.

Synthetic data (noisy copies of random class prototypes), so it runs anywhere in seconds:

    torchrun --standalone --nproc_per_node=2 examples/train_class_parallel.py             # CPU (gloo) or GPUs (nccl)
    torchrun --standalone --nproc_per_node=8 examples/train_class_parallel.py --num-classes 1000000 --sample-rate 0.1
    python examples/train_class_parallel.py                                                # one process, no torchrun

Each rank owns a slice of the class weights; the loss printed is the loss of the global batch (every rank's rows).
At the end it writes per-rank shards (``head_rank{r}.pt``, the insightface PartialFC_V2 layout) and the full W
(``head_full.pt``) to ``--out``, and reloads the shards into a fresh head to show that the loss is unchanged.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from mvloss.distributed import ClassParallelHead


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-classes", type=int, default=97)
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="rows per rank")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=1.0, help="PartialFC negative-class sampling rate")
    p.add_argument("--loss", choices=["arcface", "cosface", "mv-arc"], default="mv-arc")
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="class_parallel_ckpt")
    return p.parse_args()


LOSSES = {
    "arcface": dict(scale=32.0, m2=0.5),
    "cosface": dict(scale=32.0, m3=0.35),
    "mv-arc": dict(scale=32.0, m2=0.5, mv="adaptive", t=0.2),
}


def setup():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def batch(prototypes, args, generator, device):
    """Noisy inputs around random class prototypes (the same generator state on every rank would give every rank the
    same rows, so each rank's generator is seeded with its rank)."""
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
    x = prototypes[labels] + 0.5 * torch.randn(args.batch_size, args.input_size, generator=generator)
    return x.to(device), labels.to(device)


def main():
    args = parse_args()
    rank, world, device = setup()
    torch.manual_seed(0)  # the same backbone init on every rank (DDP also broadcasts rank 0's)
    prototypes = torch.randn(args.num_classes, args.input_size, generator=torch.Generator().manual_seed(1))
    data_gen = torch.Generator().manual_seed(1000 + rank)

    backbone = nn.Sequential(nn.Linear(args.input_size, 128), nn.ReLU(), nn.Linear(128, args.embedding_size))
    backbone = backbone.to(device)
    if world > 1:
        backbone = nn.parallel.DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda"
                                                       else None)
    # ddp_compensation: DDP averages the backbone's gradients over ranks; this makes them the gradient of the
    # global-batch loss (as insightface PartialFC does).  Do not wrap the head in DDP.
    head = ClassParallelHead(args.embedding_size, args.num_classes, sample_rate=args.sample_rate,
                             backend=args.backend, ddp_compensation=True, init_seed=0, **LOSSES[args.loss]).to(device)
    if rank == 0:
        print(f"world {world} on {device}; rank 0 owns classes [{head.class_start}, {head.class_end}) of "
              f"{args.num_classes}; global batch {args.batch_size * world}")
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=args.lr, momentum=0.9, weight_decay=5e-4)

    start = time.time()
    for step in range(args.steps):
        x, labels = batch(prototypes, args, data_gen, device)
        loss = head(backbone(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 25 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)")

    # Checkpoints: per-rank shards (restart with the same world size) and the full W (any world size).
    head.eval()
    os.makedirs(args.out, exist_ok=True)
    torch.save(head.state_dict(), os.path.join(args.out, f"head_rank{rank}.pt"))
    full = head.full_state_dict()  # a collective: every rank calls it; rank 0 gets the full W
    if rank == 0:
        torch.save(full, os.path.join(args.out, "head_full.pt"))
    if world > 1:
        dist.barrier()

    x, labels = batch(prototypes, args, torch.Generator().manual_seed(7 + rank), device)
    with torch.no_grad():
        before = head(backbone(x), labels)
        again = ClassParallelHead(args.embedding_size, args.num_classes, backend=args.backend,
                                  **LOSSES[args.loss]).to(device).eval()
        shards = [torch.load(os.path.join(args.out, f"head_rank{r}.pt"), map_location=device) for r in range(world)]
        again.reshard(shards)  # also loads shards saved with another world size
        after = again(backbone(x), labels)
    if rank == 0:
        print(f"eval loss {before.item():.4f}; after reloading the shards {after.item():.4f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
