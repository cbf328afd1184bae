"""Throughput and FLOP accounting — `cct bench`.

A timed training step is exactly what `cct train` does per batch, through the same object
(`cct.step.make_train_step`): a uint8 batch → the recipe's augmentation → forward with dropout on
→ loss → backward → optimiser step, with the loop's own work on a batch where the recipe has it (the
alternating flip, the lookahead's update). A timed inference step is what `cct eval` does per batch
(`cct.evaluate.predict_logits`: normalise → forward in eval mode → logits). Each rate is the median
of several timed windows of consecutive steps, after warm-up steps that absorb one-time costs
(allocator growth, oneDNN kernel selection).

Achieved GFLOP/s count 2 FLOPs per multiply-accumulate of `cct.model.count_macs` (convolutions,
linears, attention); a training step costs three forward passes (forward, and backward through
activations and weights). The share of peak compares them with the GEMM rate this machine reaches
right now in the same precision (a large square matmul), so a loaded machine lowers both. The
count is the model's as defined: where attention runs folded (`cct.layers.Attention`, heads wider
than half the stream, in training and inference) it does fewer multiplies, so its GFLOP/s are
effective ones.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from . import distributed, recipes
from .augment import flip_where
from .evaluate import predict_logits
from .kernels import fuse, use_kernels
from .model import count_macs, num_params
from .preprocess import Preprocessing
from .registry import create_model
from .runtime import configure_threads, cpu_supports_bf16, resolve_device, resolve_precision, tune_allocator
from .step import augment_config, make_optimizer, make_train_step, wrap_model

try:
    import resource  # POSIX: the peak resident set size
except ImportError:  # Windows
    resource = None


def timed_windows(fn: Callable[[], object], *, warmup: int, steps: int, windows: int,
                  device: torch.device | None = None) -> list[float]:
    """Seconds taken by each of `windows` windows of `steps` consecutive calls, after `warmup` calls.

    In a job of several processes (`--procs`) every window starts and ends at a barrier, so that it
    times the whole job's work. On a CUDA `device` it also starts and ends with a synchronisation:
    the calls only queue GPU work, and a window must not end before that work does.
    """
    def settle() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()

    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(windows):
        settle()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        settle()
        seconds.append(time.perf_counter() - start)
    return seconds


def gemm_peak_gflops(precision: str, device: torch.device | str = "cpu", *, size: int = 2048,
                     min_seconds: float = 0.3) -> float:
    """GFLOP/s of a (size × size) @ (size × size) matmul in `precision` (median of a few timings)."""
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    flops = 2 * size ** 3
    rates = []
    for _ in range(5):
        start, n = time.perf_counter(), 0
        while True:
            a @ b
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 5:
                break
        rates.append(n * flops / elapsed / 1e9)
    return statistics.median(rates)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the peak resident set size
    (None where the platform has no `resource` module to tell it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def benchmark(model: str = "cct_2_3x2_32_keras", *, batch_size: int = 128, infer_batch_size: int = 256,
              precision: str = "auto", steps: int = 10, windows: int = 5, warmup: int = 10,
              recipe: str | None = None, device: str = "auto", threads: int | None = None,
              train: bool = True, infer: bool = True, peak: bool = True, seed: int = 0,
              quiet: bool = True, world_size: int = 1, kernels: str = "fast") -> dict:
    """Training and inference throughput of a registered model on random CIFAR-like data.

    Args:
        model: a registered model name.
        batch_size: training batch.
        infer_batch_size: inference batch.
        precision: "auto" (bf16 where the CPU runs it natively, else fp32), "fp32", "bf16".
        steps: steps per timed window; the reported rate is the median over `windows` windows.
        warmup: untimed steps before the windows.
        recipe: the training recipe whose augmentation and optimiser are timed (default: the model's).
        device: "auto", "cpu" or "cuda".
        threads: CPU threads (default: as `cct train` sets them, see `cct.runtime.configure_threads`).
        train, infer, peak: which measurements to make.
        world_size: processes of the job this one belongs to (`--procs`, inside `distributed.process_group`):
            each computes its share of every batch, as `cct train --procs` does; rates are the job's.
        kernels: "fast" (`cct.kernels`, as training and evaluation run by default), "native" (those and the
            compiled attention core of `cct.native`) or "reference".
    Returns:
        a dict with `train_images_per_second`, `infer_images_per_second`, GFLOP/s, share of the
        measured GEMM peak, peak memory and the settings.
    """
    if world_size > 1 and (batch_size % world_size or infer_batch_size % world_size):
        raise ValueError(f"--batch-size {batch_size} and --infer-batch-size {infer_batch_size} must be multiples "
                         f"of the {world_size} processes")
    threads = configure_threads(threads)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    torch.manual_seed(seed)
    recipe = recipe or recipes.default_recipe(model)
    cfg = recipes.make_config(model, "", "", recipe=recipe, batch_size=batch_size, precision=prec)
    # the model as `cct train` builds it for this recipe: its dropout rates decide the attention path
    drop_rates = recipes.drop_rates(cfg)
    net = use_kernels(create_model(model, **drop_rates), kernels)
    macs = count_macs(net)  # the model as defined, at its native input size
    net = net.to(dev)
    C, (H, W) = net.cfg.in_chans, net.cfg.img_size
    num_classes = max(net.cfg.num_classes, 1)
    g = torch.Generator().manual_seed(seed)
    result: dict = {
        "model": model, "params": num_params(net), "gflops_per_image_forward": round(2 * macs / 1e9, 4),
        "precision": prec, "device": str(dev), "threads": threads, "batch_size": batch_size,
        "infer_batch_size": infer_batch_size, "steps_per_window": steps, "windows": windows, "warmup": warmup,
        "torch": torch.__version__, "cpu_bf16": cpu_supports_bf16(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "drop_rates": drop_rates, "allocator_tuned": tune_allocator(),
        "procs": world_size, "kernels": kernels,
    }
    local_batch, local_infer_batch = batch_size // world_size, infer_batch_size // world_size

    if train:
        mean = std = None
        if cfg.normalize != "none":  # the cost of normalising does not depend on the values
            mean, std = (0.5,) * C, (0.25,) * C
        optimizer = make_optimizer(net, cfg, precision=prec)
        step = make_train_step(wrap_model(net, world_size), optimizer, augment_config(cfg, mean, std),
                               precision=prec, device=dev, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes, generator=torch.Generator().manual_seed(seed + 1),
                               world_size=world_size, lookahead=cfg.lookahead)
        pool = 8  # distinct batches, cycled, so no step sees a cached input
        images = torch.randint(0, 256, (pool, local_batch, C, H, W), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (pool, local_batch), generator=g)
        flips = (torch.rand((pool, local_batch), generator=torch.Generator().manual_seed(seed + 3)) < 0.5
                 if cfg.alternate_flip else None)
        net.train()
        counter = iter(range(1 << 62))

        def train_step() -> None:
            n = next(counter)
            i = n % pool
            # with the loop's own work on a batch (`cct.train`): the alternating flip, the lookahead's update
            batch = flip_where(images[i], flips[i]) if flips is not None else images[i]
            step(batch, labels[i], cfg.lr * 1e-3)  # a small lr: random data must not blow the weights up
            if step.lookahead is not None:
                step.lookahead.update(n + 1, 1 << 62)

        _log(quiet, f"timing training: {model}, batch {batch_size}, {prec}, recipe {recipe}, "
                    f"{world_size} process(es) of {threads} thread(s)")
        seconds = timed_windows(train_step, warmup=warmup, steps=steps, windows=windows, device=dev)
        rates = [steps * batch_size / s for s in seconds]
        rate = statistics.median(rates)
        result.update(recipe=recipe, train_images_per_second=round(rate, 1),
                      train_window_rates=[round(r, 1) for r in rates],
                      train_ms_per_step=round(1e3 * batch_size / rate, 2),
                      train_gflops=round(rate * 3 * 2 * macs / 1e9, 1))
        del step, optimizer

    if infer:
        fuse(net.eval())  # as evaluation starts
        pool = 4
        images = torch.randint(0, 256, (pool, local_infer_batch, C, H, W), dtype=torch.uint8, generator=g)
        counter = iter(range(1 << 62))
        prep = Preprocessing((H, W), C, precision=prec, batch_size=local_infer_batch)

        def infer_step() -> None:
            predict_logits(net, images[next(counter) % pool], prep, device=dev)

        _log(quiet, f"timing inference: batch {infer_batch_size}, {prec}")
        seconds = timed_windows(infer_step, warmup=max(2, warmup // 2), steps=steps, windows=windows, device=dev)
        rates = [steps * infer_batch_size / s for s in seconds]
        rate = statistics.median(rates)
        result.update(infer_images_per_second=round(rate, 1), infer_window_rates=[round(r, 1) for r in rates],
                      infer_gflops=round(rate * 2 * macs / 1e9, 1))

    if peak:
        _log(quiet, f"measuring the {prec} GEMM peak")
        distributed.barrier()
        all_threads = torch.get_num_threads()
        if world_size > 1:  # the other processes wait: the first measures with every core
            torch.set_num_threads(threads * world_size)
        gemm = gemm_peak_gflops(prec, dev) if distributed.env_from_environ().is_main else 0.0
        torch.set_num_threads(all_threads)
        gemm = float(distributed.all_reduce_sum(torch.tensor([gemm], dtype=torch.float64))[0])  # rank 0's
        result["gemm_peak_gflops"] = round(gemm, 1)
        for kind in ("train", "infer"):
            if f"{kind}_gflops" in result:
                result[f"{kind}_share_of_peak"] = round(result[f"{kind}_gflops"] / gemm, 3)
    memory = peak_memory_mb(dev)
    result["peak_memory_mb"] = round(memory, 1) if memory is not None else None
    return result
