"""Several processes: DDP and FSDP2 (gloo, 2 processes on this CPU, loopback only) give the same
training step as one process on the concatenated batch; ``vgmr-fast train`` under ``torchrun``.

The test spawns this file as a script (``--worker``), one process per rank, with the environment
``torchrun`` would set (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT = a free port).
Determinism: dropout p = 0 everywhere and value_fraction = 1. ``kappa = 0`` switches L_reg off:
its batch standard deviation is over each process's local batch (documented in
docs/training.md), so it is the one term that is not the concatenated batch's.
"""
import argparse
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = [6, 4, 3]
B = 8  # global batch: 4 samples per rank
LR = 0.5


def build():
    import vgmr_fast
    from vgmr_fast.models import Transformer

    torch.manual_seed(0)
    return Transformer(W, num_classes=3, d_model=8, nhead=2, num_layers=1, dropout=0.0,
                       refiner=vgmr_fast.VGMR(W, d=4, dropout=0.0))


def batch():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, T, D, generator=g) for T, D in zip([5, 3, 2], W)]
    masks = [torch.rand(B, x.shape[1], generator=g) > 0.25 for x in xs]
    y = torch.randint(0, 3, (B,), generator=g)
    return xs, masks, y


def step(model, params, xs, masks, y):
    """One SGD step of the docs/math.md §6 objective (p = 0, value_fraction = 1, L_reg off)."""
    from vgmr_fast.objective import vgmr_objective

    opt = torch.optim.SGD(params, lr=LR)
    loss, _ = vgmr_objective(model, xs, masks, y, kappa=0.0, value_fraction=1.0)
    loss.backward()
    opt.step()


def local(xs, masks, y, rank, world):
    sl = slice(rank * B // world, (rank + 1) * B // world)
    return [x[sl] for x in xs], [m[sl] for m in masks], y[sl]


def single_process(half=None):
    """The reference: one process on the whole batch (or, with ``half``, on one rank's half only)."""
    model = build()
    xs, masks, y = batch()
    if half is not None:
        xs, masks, y = local(xs, masks, y, half, 2)
    step(model, model.parameters(), xs, masks, y)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(sizes=(3, 1)):
    """``vgmr-fast train``'s own step (``vgmr_fast.train.loop.train_step``, method "none", SGD) on
    whole batches of ``sizes`` samples: under torchrun each process slices them itself (3 -> 1 + 2
    samples, 1 -> an empty slice on rank 0)."""
    import argparse as _argparse

    from vgmr_fast.train.loop import train_step

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xs, masks, y = batch()
    start = 0
    for n in sizes:
        sl = slice(start, start + n)
        start += n
        train_step(model, "none", [x[sl] for x in xs], [m[sl] for m in masks], y[sl], opt, None, 0,
                   _argparse.Namespace())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(mode: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build()
        xs, masks, y = local(*batch(), rank, world)
        if mode == "train_steps":
            state = train_steps()
        elif mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model)
            step(ddp, ddp.parameters(), xs, masks, y)
            state = {k: v.detach() for k, v in model.state_dict().items()}
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            mesh = init_device_mesh("cpu", (world,))
            fully_shard(model.refiner, mesh=mesh)
            fully_shard(model, mesh=mesh)
            # the objective's removal pass calls backbone_logits: FSDP must gather for it too
            register_fsdp_forward_method(model, "backbone_logits")
            step(model, model.parameters(), xs, masks, y)
            state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                     for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
        # every rank done before any tears gloo down: a rank that exits while the other is still
        # in a collective or on the store can abort it ("terminate called without an active
        # exception", torch 2.11)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, tmp_path, world: int = 2):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", mode, "--out", str(tmp_path)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def assert_same_as_one_process(states):
    whole = single_process()
    half = single_process(half=0)
    init = {k: v.detach() for k, v in build().state_dict().items()}
    moved = max((whole[k] - init[k]).abs().max().item() for k in whole)
    assert moved > 1e-3  # the step changed the parameters: equality below is not trivial
    apart = max((whole[k] - half[k]).abs().max().item() for k in whole)
    assert apart > 1e-4  # one rank's half alone gives a different step: the processes must talk
    for rank, state in enumerate(states):
        assert set(state) == set(whole)
        for k in whole:
            torch.testing.assert_close(state[k], whole[k], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {k}")


def test_ddp_gloo_step_matches_one_process_on_the_whole_batch(tmp_path):
    assert_same_as_one_process(launch("ddp", tmp_path))


def test_fsdp2_distributed_gloo_step_matches_one_process_on_the_whole_batch(tmp_path):
    assert_same_as_one_process(launch("fsdp2", tmp_path))


def test_distributed_train_steps_with_uneven_and_empty_slices_match_one_process(tmp_path):
    """Batches of 3 and 1 samples over 2 processes: slices of 1 + 2 samples and an empty one. The
    step must still be the whole batch's (size-weighted gradient average; the empty slice adds
    nothing and produces no NaN)."""
    whole = train_steps()
    for rank, state in enumerate(launch("train_steps", tmp_path)):
        for k in whole:
            assert torch.isfinite(state[k]).all(), f"rank {rank}: {k}"
            torch.testing.assert_close(state[k], whole[k], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {k}")


def test_distributed_train_refuses_balancers_with_per_process_state(monkeypatch):
    from vgmr_fast.train import distributed

    monkeypatch.setattr(distributed, "rank_and_size", lambda: (0, 2))
    args = argparse.Namespace(methods=["none", "vgmr+ogm", "iibalance"], out="unused", no_progress=False)
    with pytest.raises(ValueError, match=r"--methods: \['vgmr\+ogm', 'iibalance'\].*2 processes"):
        distributed.init_distributed(args)


def test_distributed_train_cli_under_torchrun_rank0_writes(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "vgmr_fast", "train", "--quick", "--no-progress", "--settings", "bimodal", "--backbones", "concat",
           "--methods", "none,vgmr@0.5", "--epochs", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.load(open(out / "results.json"))
    assert data["environment"]["world_size"] == 2
    assert {r["method"] for r in data["summary"]} == {"none", "vgmr@0.5"}
    assert (out / "results.md").exists()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["ddp", "fsdp2", "train_steps"], required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    worker(a.worker, a.out)
