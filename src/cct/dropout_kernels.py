"""Inverted dropout on a CPU, drawn the cheaper of two ways: a mask of random bits, or the dropped positions.

Both compute `F.dropout`'s function: each element is zeroed independently with probability p and the
others are scaled by 1 / (1 - p). On a CPU the random numbers are most of dropout's cost (PyTorch's CPU
generator is serial), so the two ways differ in how many they draw:

* `dropout_mask`: 16 random bits for every element, turned into the float multiplier by integer
  arithmetic; its cost does not depend on p.
* `dropped_positions`: one uniform float per *dropped* element, the gaps between dropped elements
  being geometric; about p·n draws, then the scaled copy gets zeros written at those positions (no
  mask tensor at all, and the backward keeps only the positions). Cheaper at small p, dearer at large.

`draws_positions` picks by measurement (benchmarks/README.md): positions for 4- and 8-byte floats at
2^-12 ≤ p ≤ 0.25, where dropout's forward and backward took ×0.76–0.86 the mask's time on the 2-core AMX Xeon
((128, 4, 256, 256) and (128, 64, 128) float32 at p = 0.1), the mask elsewhere (bf16 was level, and at
p = 0.5 positions cost ×2.3–3.2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIN_P = 2.0 ** -12  # the smallest rate drawn as positions (`draws_positions`)


def dropout_mask(shape: tuple[int, ...], p: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The multiplier of inverted dropout: 0 with probability p, else 1 / (1 - p).

    Each element gets 16 random bits (a quarter of a 64-bit draw) rather than a float: the drop
    probability is p rounded to a multiple of 2^-16 (|error| <= 7.6e-6), and the kept scale uses that
    same rounded p, so the expectation is exactly preserved. The bits become the mask by integer
    arithmetic, several times cheaper than a comparison and a bool → float conversion: a clamp gives
    0/1, and multiplying by the bit pattern of the scale gives the float's bits (0 → +0.0).
    """
    dropped = round(p * 65536)
    if dropped == 0 or dropped == 65536:  # nothing (p < 7.6e-6) or everything dropped
        return torch.full(shape, 1.0 if dropped == 0 else 0.0, dtype=dtype, device=device)
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    bits = bits.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    threshold = dropped - 32768  # kept where bits >= threshold: probability 1 - dropped / 65536
    keep = bits.clamp(threshold - 1, threshold).sub_(threshold - 1)  # int16 0/1
    scale = torch.ones((), dtype=dtype).mul_(65536 / (65536 - dropped))  # rounded as 1 * scale would be
    integer = _INT_OF_WIDTH[dtype.itemsize]
    return keep.to(integer).mul_(int(scale.view(integer))).view(dtype)


def dropped_positions(n: int, p: float, *, device: torch.device | str = "cpu",
                      batch: int | None = None) -> torch.Tensor:
    """The flat indices, sorted, of the elements that dropout zeroes: each of n independently with probability p.

    The gap from one dropped element to the next is geometric, P(gap = g) = (1 - p)^(g-1)·p, so it is
    drawn as floor(log(1 - u) / log(1 - p)) + 1 from one uniform u; positions are the gaps' running
    sum. u is a float32 uniform (multiples of 2^-24), so each gap's distribution is exact up to about
    2^-24 (its tail beyond (1 - p)^g < 2^-24 is cut, and float32 rounding moves the boundaries between
    gap lengths by as little), where the 16-bit mask rounds p by up to 7.6e-6. Gaps are drawn `batch` at a time
    (default: enough for all n with overwhelming probability) until the positions pass n; the
    uniforms come off the generator in order, so the result does not depend on `batch`.
    """
    assert _MIN_P <= p < 1.0, f"p must be in [2^-12, 1) to be drawn as positions, got {p}"
    log_keep = math.log1p(-p)
    parts, start = [], 0  # start: the first index not yet decided
    while start < n:
        rest = n - start
        m = batch or int(rest * p + 8 * math.sqrt(rest * p) + 64)
        u = torch.empty(m, dtype=torch.float32, device=device).uniform_()
        pos = torch.log1p(u.neg_()).div_(log_keep).floor_().to(torch.int64).add_(1).cumsum_(0).add_(start - 1)
        if int(pos[-1]) >= n:
            parts.append(pos[:int(torch.searchsorted(pos, n))])
            break
        parts.append(pos)
        start = int(pos[-1]) + 1
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


def draws_positions(p: float, dtype: torch.dtype) -> bool:
    """Whether `dropout` draws the dropped positions (else a mask) for this rate and dtype (module docstring).

    Not below p = 2^-12, where the uniforms' 2^-24 steps would no longer be small against p (and gaps of
    1/p would overflow int64 long before p reached 1e-17).
    """
    return dtype.is_floating_point and dtype.itemsize >= 4 and _MIN_P <= p <= 0.25


def _memory_offsets(positions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The storage offsets (from t's first element) of t's elements at these row-major flat indices.

    Unravelled in float64, exact below 2^53 (the floor of a correctly rounded quotient of two such integers is the
    integer quotient), where int64 division, which CPUs do not vectorise, made a transposed dropout 3× slower.
    """
    if t.is_contiguous():
        return positions
    rest = positions.double()
    offsets = torch.zeros_like(rest)
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        quotient = rest.div(size).floor_()
        offsets.add_(rest.sub_(quotient * size), alpha=stride)  # rest: the index along this dimension
        rest = quotient
    return offsets.add_(rest, alpha=t.stride(0)).long()


def dropped_copy(x: torch.Tensor, positions: torch.Tensor, p: float,
                 known: tuple[tuple[int, ...], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / (1 - p) with the elements at the row-major flat indices `positions` zeroed, their storage offsets in it).

    The copy is laid out as `empty_like` lays it (x's layout where x is dense, else row-major), so it is always
    dense. `known`: (strides, offsets) computed before, reused where the copy has those strides.
    """
    y = torch.mul(x, 1.0 / (1.0 - p), out=torch.empty_like(x))
    offsets = known[1] if known is not None and known[0] == y.stride() else _memory_offsets(positions, y)
    y.as_strided((y.numel(),), (1,)).index_fill_(0, offsets, 0)
    return y, offsets


class _DropAt(torch.autograd.Function):
    """`dropped_copy` of x; the gradient likewise (by this function again, so second derivatives work)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, p: float,
                known: tuple[tuple[int, ...], torch.Tensor] | None = None) -> torch.Tensor:
        y, offsets = dropped_copy(x, positions, p, known)
        ctx.save_for_backward(positions, offsets)
        ctx.p, ctx.strides = p, y.stride()
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        positions, offsets = ctx.saved_tensors
        return _DropAt.apply(grad, positions, ctx.p, (ctx.strides, offsets)), None, None, None


def drop_at(x: torch.Tensor, positions: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of x that zeroes the elements at the row-major flat indices `positions`."""
    return _DropAt.apply(x, positions, p)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout` (CUDA keeps PyTorch's fused kernel); on a CPU the cheaper draw of `draws_positions`.

    The result has x's memory layout where x is dense (else it is row-major), so a transposed view is dropped
    in its logical order (as the reference layer would draw it) without a copy.
    """
    if p == 0.0 or not training:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    if draws_positions(p, x.dtype):
        return drop_at(x, dropped_positions(x.numel(), p, device=x.device), p)
    return x * dropout_mask(x.shape, p, dtype=x.dtype, device=x.device)  # a product takes its first operand's layout


class FastDropout(nn.Dropout):
    """`nn.Dropout` computed by `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
