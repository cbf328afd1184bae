"""Data-parallel training across processes and machines: process group, ranks, collectives.

`torchrun` (torch.distributed.run) starts one process per device and describes the job in
environment variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
`process_group()` reads them, joins the group (gloo on CPUs, nccl on CUDA GPUs) and leaves it at
the end. Without torchrun, WORLD_SIZE is unset and everything here is a no-op that returns its
input, so a single-process run pays nothing.

Who draws what (the contract `cct.train` follows):
- the data order (the epoch's permutation) comes from a generator seeded identically on every rank,
  and `cct.data.batch_indices` gives each rank its shard of every global batch;
- augmentation and dropout/drop-path draw from streams seeded from (seed, rank) — `rank_seed` — so
  ranks do not repeat each other's random crops and masks; rank 0's streams are a single process's;
- every decision that ends or reshapes the loop (a non-finite loss, a signal, the time budget) is
  agreed through a collective, so no rank waits forever for the others.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import CCTError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ(environ: dict | None = None) -> DistEnv:
    """The job as torchrun describes it in the environment; one process when WORLD_SIZE is unset."""
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank, local_rank = int(environ["RANK"]), int(environ.get("LOCAL_RANK", "0"))
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return DistEnv(rank, world_size, local_rank, local_world_size)


def is_active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own random stream (augmentation, dropout); rank 0's is `seed` itself."""
    return seed + 1_000_003 * rank


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def process_group(device: str = "auto", *, threads: int = 0, timeout_minutes: float = 30.0) -> Iterator[DistEnv]:
    """Join the torchrun job described by the environment for the duration of the block.

    gloo when training on CPUs, nccl on CUDA (each process then owns `cuda:LOCAL_RANK`). On CPUs the
    cores are shared out: `threads` (`--workers`) per process if given, else cores // processes
    on this machine. Outside torchrun (or with one process) nothing is set up.
    """
    env = env_from_environ()
    if env.world_size == 1 or is_active():
        yield env
        return
    if not dist.is_available():
        raise CCTError("this PyTorch build has no torch.distributed; run with one process")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= env.local_rank:
            raise CCTError(f"process {env.local_rank} of this machine has no GPU: {torch.cuda.device_count()} "
                           "visible; start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(env.local_rank)
    else:
        torch.set_num_threads(threads or max(1, _cpu_cores() // env.local_world_size))
    backend = "nccl" if use_cuda else "gloo"
    kwargs = {"device_id": torch.device("cuda", env.local_rank)} if use_cuda else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    try:
        yield env
        # every rank reaches the teardown together: a rank that destroys its group while a peer is
        # still inside a collective can die in gloo's threads (SIGABRT) on exit
        barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """`cuda` made explicit as this process's GPU (`cuda:LOCAL_RANK` under torchrun)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _comm_device() -> torch.device:
    """Where collective tensors must live: the process's GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- collectives (no-ops for one process)
def barrier() -> None:
    if is_active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over processes of `values`, on the CPU (a copy of `values` for one process)."""
    if not is_active():
        return values.detach().cpu()
    buffer = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu()


def any_true(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over processes: one collective for several decisions every rank must share."""
    if not is_active():
        return tuple(bool(f) for f in flags)
    buffer = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in buffer.tolist())


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one sync; with DDP, no rank may skip a backward alone)."""
    finite = torch.isfinite(loss)
    if not is_active():
        return bool(finite)
    buffer = finite.to(device=_comm_device(), dtype=torch.int32).reshape(1)
    dist.all_reduce(buffer, op=dist.ReduceOp.MIN)
    return bool(buffer.item())


def min_int(value: int) -> int:
    """The smallest `value` over processes (e.g. the number of steps that fits every rank's time budget)."""
    if not is_active():
        return int(value)
    buffer = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MIN)
    return int(buffer.item())


def from_main(value: bool) -> bool:
    """Rank 0's `value` on every process."""
    if not is_active():
        return bool(value)
    buffer = torch.tensor([int(bool(value))], dtype=torch.int32, device=_comm_device())
    dist.broadcast(buffer, src=0)
    return bool(buffer.item())


def all_gather_object(obj) -> list:
    """Every process's `obj` (picklable), in rank order."""
    if not is_active():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every other process's `module`."""
    if not is_active():
        return
    device = _comm_device()
    with torch.no_grad():
        for tensor in module.state_dict().values():
            buffer = tensor.to(device).contiguous()  # collectives need dense memory (channels-last is not)
            dist.broadcast(buffer, src=0)
            if buffer is not tensor:
                tensor.copy_(buffer)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `local` (shapes may differ in the first dimension), concatenated in rank order."""
    if not is_active():
        return local
    counts = all_reduce_sum(torch.nn.functional.one_hot(torch.tensor(dist.get_rank()), dist.get_world_size())
                            * len(local)).tolist()
    device = _comm_device()
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])


def shard_bounds(n: int) -> tuple[int, int]:
    """This process's contiguous share [start, stop) of n items (sizes differ by at most one)."""
    if not is_active():
        return 0, n
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return n * rank // world_size, n * (rank + 1) // world_size


def sharded_rows(fn: Callable[[object], torch.Tensor], items) -> torch.Tensor:
    """`fn(items)` computed as shards over processes (`items` sliceable, `fn` row-wise), gathered everywhere."""
    if not is_active():
        return fn(items)
    start, stop = shard_bounds(len(items))
    return gather_rows(fn(items[start:stop]))


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on each other machine's first process, then on the rest.

    For building caches: rank 0 writes a shared cache once while the others wait, then they read
    it; on machines that do not share its filesystem, one process per machine builds the local copy.
    Every process passes the same two barriers, even when its block raises.
    """
    if not is_active():
        yield
        return
    env = env_from_environ()
    turn = 0 if env.rank == 0 else 1 if env.local_rank == 0 else 2
    for _ in range(turn):
        barrier()
    try:
        yield
    finally:
        for _ in range(2 - turn):
            barrier()
