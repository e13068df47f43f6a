"""Training under ``torchrun``: the process group, each process's slice of a batch, and the
gradient average that makes every process take the same optimiser step."""
from __future__ import annotations

import os
from typing import Tuple

import torch
from torch import nn

from .methods import parse_method


def rank_and_size() -> Tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(args) -> None:
    """Join the process group of a ``torchrun`` launch; rank != 0 writes to a scratch directory."""
    import tempfile

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = rank_and_size()
    # OGM-GE's coefficients and IIBalance's prototypes come from each process's own slice: the
    # processes would take different steps and drift apart, so they are refused, not run wrong.
    per_process = [m for m in args.methods if parse_method(m)[1] in ("ogm", "iibalance")]
    if world > 1 and per_process:
        raise ValueError(f"--methods: {per_process} keep per-process state (OGM-GE coefficients, IIBalance "
                         f"prototypes) and cannot run over {world} processes; run them in one process")
    if world > 1 and rank != 0:
        args.out = tempfile.mkdtemp(prefix=f"vgmr_train_rank{rank}_")
        args.no_progress = True


def shard(xs, masks, y):
    """This process's slice of a batch: contiguous, sizes differing by at most one (a batch smaller
    than the number of processes leaves some slices empty; their process contributes no gradient)."""
    rank, world = rank_and_size()
    if world == 1:
        return xs, masks, y
    n = y.shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    return ([x[sl] for x in xs], None if masks is None else [None if m is None else m[sl] for m in masks], y[sl])


def average_gradients(model: nn.Module, count: int) -> None:
    """The whole batch's mean-loss gradient from every process's slice: each process's gradient of
    its slice's mean loss, weighted by its ``count`` samples (slices may differ in size), summed over
    processes and divided by the batch size; every process then takes the same optimiser step."""
    import torch.distributed as dist

    rank, world = rank_and_size()
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.tensor([float(count)], device=params[0].device)
    dist.all_reduce(total)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(count / total.item())
        dist.all_reduce(p.grad)
