"""Where and how computation runs: device, precision, autocast, threads.

Precision is the caller's business (training, evaluation, benchmark), never the model's:
`forward` computes in the parameters' dtype, and these helpers wrap it in autocast.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> torch.device:
    assert device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {device!r}"
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


def autocast(precision: str, device: torch.device | str = "cpu"):
    """An autocast context for a resolved precision ('fp32' → no autocast)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_threads(threads: int | None = None) -> int:
    """Set the CPU threads of intra-op parallelism (default: one per core, torch's own choice); returns it.

    On a small CPU every thread should compute: torch's default is already one per physical core,
    so this only pins a requested count (e.g. `--workers` / `--threads`) and keeps the inter-op
    pool at one thread, since a training step has no independent operators worth overlapping.
    """
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op parallel work
        pass
    return torch.get_num_threads()
