#!/usr/bin/env python3
"""PyTorch + gloo reference for dtrain's training modes (run by hand; needs torch).

One process per rank, configured like torchrun through the environment (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE; GLOO_SOCKET_IFNAME picks the interface), so that
scripts/cluster_bench.py can start it inside network namespaces next to dtrain:

    MASTER_ADDR=10.77.0.1 MASTER_PORT=29600 RANK=0 WORLD_SIZE=2 GLOO_SOCKET_IFNAME=eth0 \\
        python3 scripts/torch_ddp.py --mode ddp --iters 8 --batch-size 128

The model is the original repository's model.py VGG (conv3x3 + BatchNorm + ReLU blocks,
max-pools, one Linear(512, 10)), imported from engine/tests/fixtures/make_reference.py (which
needs safetensors too). Optimizer:
SGD lr 0.1, momentum 0.9, weight decay 1e-4 (dtrain's defaults). Data: synthetic
CIFAR-shaped batches (random images and labels, fixed seed per rank), since only the step time
is measured. Modes as dtrain's:
  single          one process, no communication (WORLD_SIZE 1, no process group)
  gather-scatter  per parameter: gather to rank 0, average there, scatter the mean
  allreduce       per parameter: all_reduce(SUM), divide by the world size
  ddp             torch.nn.parallel.DistributedDataParallel (25 MB buckets, overlap)
`--grad-compression bf16|fp16` (ddp, allreduce): DDP registers PyTorch's own
`default_hooks.bf16_compress_hook` / `fp16_compress_hook` (round to 16 bits, divide by the
world size, all-reduce, widen back); allreduce does the same per parameter.

Prints, like dtrain, `Average time for N iterations: S s` (the mean wall time of iterations
1..iters-1; iteration 0 is warm-up) and `Final loss: L`.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

# The original model.py's VGG, as the PyTorch reference fixtures use it (one copy of it).
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine", "tests", "fixtures"))
from make_reference import VGG  # noqa: E402

MODELS = ["VGG11", "VGG13", "VGG16", "VGG19"]


def sync_gather_scatter(model, rank, world):
    for p in model.parameters():
        grad = p.grad
        if rank == 0:
            parts = [torch.empty_like(grad) for _ in range(world)]
            dist.gather(grad, gather_list=parts, dst=0)
            mean = torch.stack(parts).sum(dim=0) / world
            dist.scatter(grad, scatter_list=[mean] * world, src=0)
        else:
            dist.gather(grad, dst=0)
            dist.scatter(grad, src=0)


def sync_allreduce(model, world, wire_dtype):
    for p in model.parameters():
        if wire_dtype is None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world
        else:  # as default_hooks.{bf16,fp16}_compress_hook, per parameter
            wire = p.grad.to(wire_dtype).div_(world)
            dist.all_reduce(wire, op=dist.ReduceOp.SUM)
            p.grad.copy_(wire)


WIRE_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["single", "gather-scatter", "allreduce", "ddp"], default="ddp")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="VGG11", type=str.upper, choices=MODELS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-compression", choices=list(WIRE_DTYPES), default="none")
    args = ap.parse_args()
    if args.grad_compression != "none" and args.mode not in ("ddp", "allreduce"):
        raise SystemExit("torch_ddp.py: error: --grad-compression needs --mode ddp or allreduce")

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.mode == "single":
        if world != 1:
            raise SystemExit("torch_ddp.py: error: --mode single needs WORLD_SIZE=1")
    else:
        # Gloo's default timeout is 30 min; a hung peer should fail a bench run sooner.
        from datetime import timedelta

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))

    torch.manual_seed(args.seed)  # same initial parameters on every rank
    model = VGG(args.model)
    criterion = nn.CrossEntropyLoss()
    net = nn.parallel.DistributedDataParallel(model) if args.mode == "ddp" else model
    wire_dtype = WIRE_DTYPES[args.grad_compression]
    if args.mode == "ddp" and wire_dtype is not None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = {torch.bfloat16: default_hooks.bf16_compress_hook,
                torch.float16: default_hooks.fp16_compress_hook}[wire_dtype]
        net.register_comm_hook(None, hook)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    g = torch.Generator().manual_seed(1000 + rank)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g)

    times = []
    loss = None
    for _ in range(args.iters):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = criterion(net(images), labels)
        loss.backward()
        if args.mode == "gather-scatter":
            sync_gather_scatter(model, rank, world)
        elif args.mode == "allreduce":
            sync_allreduce(model, world, wire_dtype)
        optimizer.step()
        times.append(time.perf_counter() - t0)

    if len(times) > 1:
        timed = times[1:]
        print(f"Average time for {len(timed)} iterations: {sum(timed) / len(timed):.4f}s")
    print(f"Final loss: {loss.item():.6f}")
    if args.mode != "single":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
