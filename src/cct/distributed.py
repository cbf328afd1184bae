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

`local_workers(procs, argv)` is a torchrun of one machine built into `cct train` and `cct bench`
(`--procs`): on a small CPU, N processes of one thread each, every one on its share of the batch,
can outrun one process whose N threads split every operation, because most operations of these
small models are too short for a thread team to pay off (on the 2-core test machine,
`cct_2_3x2_32_keras` trains at 907 against 764 images/s; benchmarks/README.md, bench_procs.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

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
    threads_before = torch.get_num_threads()
    if not use_cuda:
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
        torch.set_num_threads(threads_before)


# marks the processes `local_workers` starts (ranks 1..N-1), for whoever needs to tell them apart
LOCAL_WORKER_ENV = "CCT_LOCAL_WORKER"


def resolve_procs(procs: int, device: torch.device | str, batch_sizes: Mapping[str, int] | None = None
                  ) -> int:
    """`--procs`: 0 means one process per logical CPU, as many as divide every batch in `batch_sizes`
    (flag → global batch); an explicit count that does not divide one is an error, raised before any
    process is started.

    On a GPU it is one process (start one per GPU with torchrun).
    """
    assert procs >= 0, f"--procs must be 0 (one per core) or positive, got {procs} (callers validate it)"
    if torch.device(device).type != "cpu":
        if procs > 1:
            raise CCTError("--procs is for CPU training; start one process per GPU with torchrun")
        return 1
    batch_sizes = batch_sizes or {}
    n = procs or _cpu_cores()
    while not procs and n > 1 and any(b % n for b in batch_sizes.values()):  # the global batch is split evenly
        n -= 1
    for flag, batch in batch_sizes.items():
        if batch % n:
            raise CCTError(f"{flag} {batch} must be a multiple of --procs {n}")
    return n


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child killed when this process dies (Linux's PR_SET_PDEATHSIG).

    The C function is looked up here, before the fork; the child only calls it, then exits if this
    process already died before the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def _failure(rank: int, procs: int, worker: subprocess.Popen, log) -> str:
    """What a failed worker said last, for the one line the user reads."""
    log.seek(0)
    lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return (f"process {rank} of {procs} failed (exit status {worker.returncode}): "
            + (lines[-1].strip() if lines else "no message"))


def _exit_status(worker: subprocess.Popen, *, within: float) -> int | None:
    """The worker's exit status, waiting up to `within` seconds for it; None while it runs."""
    try:
        return worker.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return None


@contextlib.contextmanager
def local_workers(procs: int, argv: list[str], *, grace_seconds: float = 5.0) -> Iterator[int]:
    """Make this process rank 0 of a `procs`-process job on this machine for the duration of the block.

    Ranks 1..procs-1 are `python -m cct *argv` started here with torchrun's environment variables
    (loopback rendezvous on a free port); `process_group()` then joins them as under torchrun. Their
    output goes to files of their own, so that the user reads rank 0 alone. They are killed if this
    process dies (Linux), and stopped if the block raises. A worker that fails while the block runs
    ends the job: if rank 0 has not stopped with an error of its own after `grace_seconds` (it
    usually meets the same one), the worker's last line is printed and this process exits with 2,
    rather than wait in a collective that will never complete. A no-op for one process or inside a
    job torchrun started. Yields the number of processes.
    """
    if procs <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield 1
        return
    job = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(procs),
           "LOCAL_WORLD_SIZE": str(procs), "GROUP_RANK": "0"}
    saved = {k: os.environ.get(k) for k in (*job, "RANK", "LOCAL_RANK")}
    workers: list[tuple[int, subprocess.Popen, object]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            # 130 and 143: a stop every rank agreed on (a signal), which rank 0 is handling too
            failed = [(rank, w, log) for rank, w, log in workers if w.poll() not in (None, 0, 130, 143)]
            if failed and not done.wait(grace_seconds):
                rank, w, log = failed[0]
                print(f"cct: {_failure(rank, procs, w, log)}", file=sys.stderr, flush=True)
                os._exit(2)

    try:
        for rank in range(1, procs):
            env = {**os.environ, **job, "RANK": str(rank), "LOCAL_RANK": str(rank), LOCAL_WORKER_ENV: "1"}
            log = tempfile.TemporaryFile()
            workers.append((rank, subprocess.Popen([sys.executable, "-m", "cct", *argv], env=env,
                                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                   preexec_fn=_die_with_parent()), log))
        threading.Thread(target=watch, name="cct-local-workers", daemon=True).start()
        os.environ.update(job, RANK="0", LOCAL_RANK="0")
        try:
            yield procs
        except CCTError:  # rank 0's own one-line error (every rank usually meets the same one)
            raise
        except Exception:  # a worker's death breaks rank 0's collective first: report the worker, not the socket
            failed = [(rank, w, log) for rank, w, log in workers if _exit_status(w, within=1.0) not in (None, 0, 130, 143)]
            if failed:
                rank, w, log = failed[0]
                raise CCTError(_failure(rank, procs, w, log)) from None
            raise
        done.set()
        for rank, w, log in workers:
            if w.wait() != 0:
                raise CCTError(_failure(rank, procs, w, log))
    finally:
        done.set()
        for _, w, log in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
            log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def average_gradients(params: Iterable[torch.Tensor], *, finite: bool = True,
                      flags: tuple[bool, ...] = ()) -> tuple[bool, tuple[bool, ...]]:
    """Replace every gradient by its mean over processes, in one collective that also carries decisions.

    What DistributedDataParallel does, without its bucketing, hooks and communication thread, which
    with one CPU core per process cost more than one exchange of a small model's gradients after the
    backward pass. `finite` (this rank's loss) comes back AND-ed over processes and `flags` OR-ed, so
    that a step synchronises the processes once. A parameter that no rank gave a gradient keeps none
    (the optimiser skips it, as in one process). Returns (finite everywhere, flags).
    """
    if not is_active():
        return bool(finite), tuple(bool(f) for f in flags)
    params = list(params)
    decisions = torch.tensor([float(not finite), *map(float, flags), *(float(p.grad is not None) for p in params)])
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), decisions]).to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    decided = flat[-len(decisions):].tolist()
    flat = flat[:-len(decisions)].div_(dist.get_world_size())
    offset = 0
    for p, g, has_grad in zip(params, grads, decided[1 + len(flags):]):
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
        p.grad = g if has_grad else None
    return decided[0] == 0, tuple(v > 0 for v in decided[1:1 + len(flags)])


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
