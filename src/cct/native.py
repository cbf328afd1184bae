"""The "native" kernels: `cct.kernels`' fast kernels plus an attention core compiled on the user's machine.

`use_kernels(model, "native")` (`--kernels native`) builds `csrc/attention_core.cpp` with PyTorch's
`torch.utils.cpp_extension` the first time it is asked for on a machine (about 20 s; a C++ compiler and ninja,
`pip install ninja`), caches it under PyTorch's extensions folder (`TORCH_EXTENSIONS_DIR`) and loads it from
there afterwards. Where it cannot be built, `load` raises `NativeUnavailable` saying why: nothing falls back.

What it computes: `Attention`'s core in float32 training on a CPU with attention dropout (the paper's models:
softmax → dropout → ·v over 256 tokens), one (sample, head) pair at a time so that the (N, N) maps stay in the
core's cache; PyTorch's operators pass over them a dozen times through main memory. Same function and
gradients as the reference (up to rounding) and the same dropped elements from the same draw as
`FastDropout` (tests/test_native.py). Everything else runs as "fast" does (`cct.kernels.NativeAttention`).
One attention core of `cct_7_3x1_32` (batch 128, float32, forward and backward, 2 threads): 246 → 151 ms
against `_AttentionCore` on the 2-core AMX Xeon; its training step ×1.12 (benchmarks/README.md, thirtieth session).
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from .dropout_kernels import dropped_positions
from .errors import CCTError

SOURCE = Path(__file__).with_name("csrc") / "attention_core.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # built where it runs, for the CPU it runs on
_module: ModuleType | None = None


class NativeUnavailable(CCTError):
    """`--kernels native` asked for on a machine where the attention core cannot be built or loaded."""


def _cpu_key() -> str:
    """What `-march=native` compiles for: the CPU's model and features as Linux lists them (x86: model name and
    flags; ARM: implementer, part and features), else the machine's name."""
    import platform

    fields = ("model name", "flags", "Features", "CPU implementer", "CPU part", "CPU architecture")
    try:
        lines = {line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(fields)}
    except OSError:
        lines = set()
    return "\n".join(sorted(lines)) or platform.machine() + platform.processor()


def extension_name() -> str:
    """The extension's name, distinct per source, PyTorch, Python, flags and CPU, so that a build made for
    another CPU (a shared home folder), another PyTorch or another Python is never loaded."""
    key = "\n".join([SOURCE.read_text(), torch.__version__, sys.version, " ".join(_FLAGS), _cpu_key()])
    return "cct_native_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _find_ninja() -> None:
    """Put the ninja of the `ninja` package (or of this Python's environment) on PATH, where PyTorch looks for it:
    `pip install ninja` into a virtual environment that was not activated leaves it off PATH."""
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "")
    missing = [f for f in folders if f and f not in path.split(os.pathsep)]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*missing, path]) if path else os.pathsep.join(missing)


def _first_error(message: str) -> str:
    """The compiler's first error in a failed build's output (PyTorch's message starts with the command line)."""
    lines = [line.strip() for line in message.splitlines()]
    for marker in ("error:", "error", "Error"):
        found = [line for line in lines[1:] if marker in line]
        if found:
            return found[0]
    return lines[0] if lines else "no output"


def load() -> ModuleType:
    """The compiled attention core, built on first use; `NativeUnavailable` (one line) where it cannot be.

    A build killed half-way can leave PyTorch's `lock` file in its folder, and later builds then wait on it:
    delete the folder the "compiling" line names.
    """
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which((shlex.split(compiler) or [""])[0]) is None:
        raise NativeUnavailable(f"--kernels native needs a C++ compiler: {compiler!r} is not on PATH (set CXX)")
    if not cpp_extension.is_ninja_available():
        _find_ninja()
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable("--kernels native needs ninja to build its C++ core: pip install ninja")
    try:
        name = extension_name()
    except OSError as e:
        raise NativeUnavailable(f"--kernels native: cannot read its source {SOURCE}: {e.strerror}") from e
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    if not any(folder.glob(f"{name}*.so")):
        print(f"cct: compiling the native attention core into {folder} (once per machine, about 20 s)",
              file=sys.stderr, flush=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                                     build_directory=str(folder))
    except (RuntimeError, OSError, ImportError) as e:
        raise NativeUnavailable(f"--kernels native: building {SOURCE.name} failed: {_first_error(str(e))[:300]}") from e
    return _module


class _NativeAttentionCore(torch.autograd.Function):
    """`_AttentionCore`'s function (float32, CPU), computed by the compiled core; saves qkv, the softmax
    and the dropped positions."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float, p: float) -> torch.Tensor:
        qkv = qkv.contiguous()
        B, N, _ = qkv.shape
        positions = dropped_positions(B * heads * N * N, p, device=qkv.device)  # as `FastDropout` draws them
        out, attn = load().attention_core_forward(qkv, heads, scale, p, positions)
        ctx.save_for_backward(qkv, attn, positions)
        ctx.heads, ctx.scale, ctx.p = heads, scale, p
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives: the reference kernels
    def backward(ctx, grad: torch.Tensor):
        qkv, attn, positions = ctx.saved_tensors
        dqkv = load().attention_core_backward(grad.contiguous(), qkv, attn, ctx.heads, ctx.scale, ctx.p, positions)
        return dqkv, None, None, None


def attention_core(qkv: torch.Tensor, heads: int, scale: float, p: float) -> torch.Tensor:
    """(B, N, heads·d) from the float32 qkv projection (B, N, 3·heads·d) on a CPU, in training: softmax(scale·q kᵀ),
    inverted dropout at rate p, ·v; differentiable once."""
    return _NativeAttentionCore.apply(qkv, heads, scale, p)
