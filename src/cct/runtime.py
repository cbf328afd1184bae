"""Where and how computation runs: device, precision, autocast, threads.

Precision is the caller's business (training, evaluation, benchmark), never the model's:
`forward` computes in the parameters' dtype, and these helpers wrap it in autocast.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

# the choices of every --precision and --device flag
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    assert device in DEVICES, f"device must be one of {DEVICES}, got {device!r}"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 is a speed-up."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def processor_name(device: torch.device | str = "cpu") -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else `platform.processor()`), or the GPU's on CUDA."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'auto' → 'bf16' where the hardware runs it fast, else 'fp32'."""
    assert precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {precision!r}"
    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("--precision fp16 is for CUDA; use bf16 or fp32 on a CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def faster_precision(step: Callable[[str], object], *, rounds: int = 3, margin: float = 0.9,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict[str, float]]:
    """"bf16" if `step("bf16")` takes less than `margin` × `step("fp32")`'s time, else "fp32"; and each one's
    median milliseconds.

    For models whose GEMMs are too narrow for bf16 to pay everywhere: on one CPU with native bf16 a text
    model's step is faster in bf16, on another slower (benchmarks/README.md, "Text models"), so only a
    trial on the machine can tell. One untimed step each, then `rounds` timed in turns, so that a host
    slowing down mid-trial slows both alike. A near tie goes to fp32, the more exact.
    """
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in times:
        step(precision)
    for _ in range(rounds):
        for precision, seen in times.items():
            start = clock()
            step(precision)
            seen.append(1e3 * (clock() - start))
    ms = {p: statistics.median(seen) for p, seen in times.items()}
    return ("bf16" if ms["bf16"] < margin * ms["fp32"] else "fp32"), ms


def recorded_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The precision a checkpoint recorded in training, for running it on `device`.

    fp16 exists for CUDA (autocast with a gradient scaler); a checkpoint trained so on a GPU is
    evaluated in fp32 on a CPU, where `resolve_precision` refuses fp16. A precision the user asks
    for explicitly does not come through here, so `--precision fp16` on a CPU stays an error.
    """
    return "fp32" if precision == "fp16" and torch.device(device).type == "cpu" else precision


def autocast(precision: str, device: torch.device | str = "cpu"):
    """An autocast context for a resolved precision ('fp32' → no autocast)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_threads(threads: int | None = None) -> int:
    """Set the CPU threads of intra-op parallelism (default: one per core, torch's own choice); returns it.

    Also tunes the C allocator for repeated large allocations (`tune_allocator`).

    On a small CPU every thread should compute: torch's default is already one per physical core,
    so this only pins a requested count (e.g. `--workers` / `--threads`) and keeps the inter-op
    pool at one thread, since a training step has no independent operators worth overlapping.
    """
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op parallel work
        pass
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed activation memory in the process instead of handing it back to the kernel.

    A training step allocates and frees the same activations every step. glibc serves blocks
    above its mmap threshold (128 kB at start, adapting upwards slowly, at most 32 MB) with fresh
    `mmap` pages and returns them on free, so each step pays page faults to zero them again. Here
    every block comes from the heap (no mmap at all: the paper's models have activations of
    60-130 MB, above any threshold glibc allows), and freed heap is returned to the kernel only
    beyond 1 GB. Measured on the 2-core test machine with benchmarks/bench_allocator.py:
    `cct_2_3x2_32_keras` +10-15% training and inference images/s, `cct_7_3x1_32` training ×1.6.
    Costs: the heap keeps its peak size (up to 1 GB more than in use), ~15% more peak memory.
    Only glibc has `mallopt`; elsewhere (macOS, musl, Windows) this does nothing and returns False,
    as it does with the environment variable CCT_TUNE_ALLOCATOR=0 (for A/B runs,
    benchmarks/bench_allocator.py). Idempotent; returns whether the settings are in effect.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if os.environ.get("CCT_TUNE_ALLOCATOR", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _allocator_tuned = all([mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),  # only if mmap is back on
                                    mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 1 << 30)])
    return _allocator_tuned
