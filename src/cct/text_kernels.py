"""Faster kernels for the text models' tokenizer and embedding (`cct.text_model`), chosen by `cct.kernels`.

`cct.kernels.use_kernels(model, "fast")` swaps these in for `TextConvTokenizer` and `nn.Embedding`
(and `cct.kernels.FastMaskedAttention` for the attention); each computes its reference module's
function with the same parameters and gradients up to rounding, tested in tests/test_text_serve.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .text_model import TextConvTokenizer


def _diagonal(y: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """The view (B, n, k, dim) of y (B, Lp, k, dim) whose element (b, t, i, d) is y[b, t·s + i, i, d]."""
    B, Lp, k, D = y.shape
    return y.as_strided((B, n, k, D), (Lp * k * D, s * k * D, (k + 1) * D, 1), y.storage_offset())


class _DiagonalSum(torch.autograd.Function):
    """Σ_i y[:, t·s + i, i] for each window t, summed in float32 at least; its backward writes the gradient
    into the same view of a zero tensor (autograd's own `as_strided` backward builds index maps of the
    whole storage and scatters through them: as costly as the GEMM it follows)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, n: int, s: int) -> torch.Tensor:
        ctx.shape, ctx.n, ctx.s = y.shape, n, s
        return _diagonal(y, n, s).sum(2, dtype=torch.promote_types(y.dtype, torch.float32)).to(y.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g = grad.new_zeros(ctx.shape)
        _diagonal(g, ctx.n, ctx.s).copy_(grad.unsqueeze(2).expand(-1, -1, ctx.shape[2], -1))
        return g, None, None


class FastTextConvTokenizer(TextConvTokenizer):
    """`TextConvTokenizer` as one GEMM over the word vectors, max-pooling before the ReLU.

    Its conv has one input channel and spans the whole word vector (kernel (k, word_dim)), a shape
    oneDNN's convolutions run slowly (a third of a text_cct_2 training step). The same sums come from
    one GEMM of every padded word position by all k kernel rows, (B·L, word_dim) @ (word_dim, k·dim),
    then, per window, the sum of row i of its i-th word through one strided view (in float32 under
    autocast, as the conv accumulates), already (B, tokens, dim). The ReLU commutes with the max-pool
    (as in `FastConvTokenizer`); side-by-side pool windows are a max over a view. The mask is as the reference's."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        B, _, W = x.shape
        k, s = cfg.kernel_size, cfg.stride
        mask = F.pad(mask, (0, self.tail), value=False)
        x = F.pad(x, (0, 0, cfg.padding, cfg.padding + self.tail))  # (B, Lp, word_dim)
        n = (x.shape[1] - k) // s + 1  # windows
        rows = self.conv.weight.view(-1, k, W).transpose(0, 1).reshape(-1, W)  # (k·dim, word_dim), rows (i, d)
        y = F.linear(x, rows).view(B, x.shape[1], k, -1)  # (B, Lp, k, dim): every word by every kernel row
        x = _DiagonalSum.apply(y, n, s)  # (B, n, dim)
        m = F.conv1d(mask.unsqueeze(1).to(x.dtype), x.new_ones(1, 1, k), stride=s, padding=cfg.padding)  # (B, 1, n)
        if self.act_and_pool:
            pk, ps, pp = cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding
            m = F.max_pool1d(m, pk, ps, pp)
            if pk == ps:  # windows side by side: a max over a (B, N, pk, dim) view, not a 1-channel image pool
                N = m.shape[-1]  # tokens
                x = F.pad(x, (0, 0, pp, max(0, N * pk - n - pp)), value=float("-inf"))[:, :N * pk]
                x = x.view(B, N, pk, -1).max(2).values
            else:
                x = F.max_pool2d(x.unsqueeze(1), (pk, 1), (ps, 1), (pp, 0)).squeeze(1)
            x = F.relu(x)
        return x, m.squeeze(1) > 0  # (B, N, dim), (B, N)


class _EmbeddingLookup(torch.autograd.Function):
    """Row lookup whose backward is one `index_add_` into a zero table (the padding row's gradient zeroed)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        table = grad.new_zeros(ctx.shape)
        table.index_add_(0, ids.reshape(-1), grad.reshape(-1, ctx.shape[1]))
        if ctx.padding_idx is not None:
            table[ctx.padding_idx] = 0
        return None, table, None


class FastEmbedding(nn.Embedding):
    """`nn.Embedding` whose weight gradient is one `index_add_` into a zero table: PyTorch's dense gradient
    (its CPU backward sorts the ids first, as costly as the adding), the same sums up to their order.
    `max_norm`, `scale_grad_by_freq` and `sparse` keep PyTorch's own path."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return super().forward(ids)
        return _EmbeddingLookup.apply(ids, self.weight, self.padding_idx)
