"""Faster kernels for the reference layers of `cct.layers` and `cct.model`, chosen explicitly.

`use_kernels(model, "fast")` swaps the class of the modules it has a kernel for (no parameter,
buffer or state-dict key changes) and `use_kernels(model, "reference")` swaps them back, as Hugging
Face transformers picks an `attn_implementation`. Each kernel computes its reference module's
function, with the same parameters and gradients (up to rounding), and each is tested against it
(tests/test_kernels.py). Measured by benchmarks/bench_cpu.py on the project's 2-core CPUs:

* `FastDropout` (`cct.dropout_kernels`): on a CPU, where the random numbers dominate, either 16 random bits
  per element turned into the scale by integer arithmetic (2.3× `F.dropout`), or, for float32/64 at small
  rates, only the dropped positions drawn;
* `FastGELU`: the tanh-approximate GELU of a bfloat16 tensor looked up in a table of all 65,536
  bf16 values, bit for bit PyTorch's, whose CPU tanh is the slowest elementwise kernel of a step;
* `FastAttention`: matmul → softmax → dropout → matmul or `F.scaled_dot_product_attention`, whichever
  measured faster; heads wider than half the stream (the Keras example's 2 heads of 128 on a 128-wide
  stream) run *folded*: query·key and value·output products merged into one matrix per head, half
  the projection GEMMs, in training (inside the graph) as in inference (after `fuse`); in float32/64 training
  with attention dropout, the core (`_AttentionCore`) in fewer passes over the attention maps;
* `FastConvTokenizer`: channels-last convolutions, max-pool before the ReLU (they commute), with the
  zero padding turned into the pool's padding;
* text models (`cct.text_model`): `FastMaskedAttention` (scale and key mask in one `baddbmm`), and
  from `cct.text_kernels` `FastTextConvTokenizer` (the word-window conv as one GEMM) and
  `FastEmbedding` (the weight gradient by one `index_add_`).

`fuse(model)` is the explicit inference step, like ultralytics' `model.fuse()`: it computes the folded
attention weights once, in float64. Evaluation calls it when it starts; `model.train()` drops them, so
weights changed by training are never evaluated through stale folded copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .dropout_kernels import FastDropout, draws_positions, dropout, dropped_copy, dropped_positions
from .layers import Attention
from .model import ConvTokenizer, _same_pool_padding
from .text_kernels import FastEmbedding, FastTextConvTokenizer
from .text_model import MaskedAttention, TextConvTokenizer

KERNELS = ("reference", "fast", "native")

# ---------------------------------------------------------------------- tanh-GELU of bf16 by table
_GELU_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _gelu_tanh_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every bfloat16's tanh-GELU (bf16) and its derivative (float32), by PyTorch's own kernels.

    Indexed by the value's 16 bits read as unsigned; built once per device.
    """
    tables = _GELU_TABLES.get(device)
    if tables is None:
        index = torch.arange(65536, dtype=torch.int32, device=device)
        values = torch.where(index >= 32768, index - 65536, index).to(torch.int16).view(torch.bfloat16)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            gelu = F.gelu(values, approximate="tanh")
            slope = torch.ops.aten.gelu_backward(torch.ones(65536, device=device), values.float(), approximate="tanh")
        tables = _GELU_TABLES[device] = (gelu, slope)
    return tables


def _table_index(x: torch.Tensor) -> torch.Tensor:
    """The unsigned 16 bits of each bfloat16 in x, as flat int32 indices into a 65,536-entry table."""
    return x.reshape(-1).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)


class _GeluTanhBF16(torch.autograd.Function):
    """tanh-GELU of a bfloat16 tensor by table lookup, bit for bit `F.gelu(x, approximate="tanh")`.

    PyTorch computes the tanh on a CPU with an accurate but slow vectorised routine (≈2 ns an
    element on the test machine, 10× a multiply); a bf16 has only 65,536 values, so looking them
    up is ≈3× faster forward and 2× backward, where the derivative's float32 table times the
    gradient, rounded once, is also what `gelu_backward` computes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gelu, _ = _gelu_tanh_tables(x.device)
        ctx.save_for_backward(x)
        return gelu.index_select(0, _table_index(x)).view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        _, slope = _gelu_tanh_tables(x.device)
        return slope.index_select(0, _table_index(x)).view(x.shape).mul_(grad).to(grad.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` (Keras 3's GELU), by table lookup for bfloat16 on a CPU."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return _GeluTanhBF16.apply(x)
    return F.gelu(x, approximate="tanh")


class FastGELU(nn.GELU):
    """`nn.GELU`; its tanh approximation through `gelu_tanh` (the exact GELU's CPU kernel is already fast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x) if self.approximate == "tanh" else F.gelu(x)


# ---------------------------------------------------------------------- attention
_BF16_MATMUL_MAX_TOKENS = 196  # see FastAttention._matmul_path


class FastAttention(Attention):
    """`Attention` through the fastest of three equivalent computations (see the module docstring)."""

    _fused: tuple | None = None  # set by `fuse`, dropped by `train()`
    _fused_from: tuple | None = None  # which weights `_fused` was computed from (`_weights_key`)

    def _matmul_path(self, q: torch.Tensor) -> bool:
        """matmul → softmax → matmul rather than `F.scaled_dot_product_attention`, where that is faster.

        SDPA's CPU kernels have no dropout (with it they fall back to an unfused path), and in bf16
        on a CPU its flash kernel is slower than two batched matmuls for short sequences: on the
        2-core test machine forward+backward of (128, 2, 64, 128) took 13 ms vs 35 ms and
        (128, 4, 256, 64) 216 ms vs 290 ms; inference (256, 6, 196, 64) 23 ms vs 47 ms, but
        (256, 4, 256, 64) 204 ms vs 152 ms. In fp32 SDPA is as fast or faster everywhere.
        """
        if self.training and self.attn_drop.p > 0:
            return True
        if q.dtype != torch.bfloat16 or q.device.type != "cpu":
            return False
        return self.training or q.shape[-2] <= _BF16_MATMUL_MAX_TOKENS

    def folds(self) -> bool:
        """Whether the folded form costs fewer multiplies: heads wider than half the stream."""
        return 2 * self.head_dim > self.qkv.in_features

    def _fold(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                 torch.Tensor | None, torch.Tensor | None]:
        """(w_qk, b_qk, w_vo, b_vo, b_o) of `_folded_forward`, from the parameters in `dtype`.

        Per head h, with scale s = head_dim^-0.5 and nn.Linear's weights (out, in):
            s·q_h·k_hᵀ = s·(x Wq_hᵀ + bq_h)(Wk_h xᵀ + bk_hᵀ) = (x A_h + c_h) xᵀ + (terms constant along
            each row, which softmax cancels), with A_h = s Wq_hᵀ Wk_h and c_h = s bq_h Wk_h;
            Σ_h P_h (x Wv_hᵀ + bv_h) Wo_hᵀ + bo = Σ_h P_h (x V_h + e_h) + bo, with V_h = Wv_hᵀ Wo_hᵀ and
            e_h = bv_h Wo_hᵀ.
        Differentiable: gradients reach the parameters through these products (bk gets none, as it has
        no effect on the output). Weights in Linear layout (heads·dim, dim), biases (heads·dim).
        """
        H, d, D = self.num_heads, self.head_dim, self.qkv.in_features
        wq, wk, wv = self.qkv.weight.to(dtype).view(3, H, d, D).unbind(0)  # each (heads, head_dim, dim)
        wo = self.proj.weight.to(dtype).view(D, H, d)
        s = d ** -0.5
        w_qk = (s * torch.einsum("hdi,hdj->hji", wq, wk)).reshape(H * D, D)  # A_hᵀ as Linear weights
        w_vo = torch.einsum("hdi,ohd->hoi", wv, wo).reshape(H * D, D)
        b_qk = b_vo = None
        if self.qkv.bias is not None:
            bq, _, bv = self.qkv.bias.to(dtype).view(3, H, d).unbind(0)
            b_qk = (s * torch.einsum("hd,hdj->hj", bq, wk)).reshape(H * D)
            b_vo = torch.einsum("hd,ohd->ho", bv, wo).reshape(H * D)
        b_o = None if self.proj.bias is None else self.proj.bias.to(dtype)
        return w_qk, b_qk, w_vo, b_vo, b_o

    def fuse(self) -> None:
        """Fold the weights for inference, in float64: the value biases join the output bias (without
        dropout every row of P_h sums to 1). Kept until `train()` or the next `fuse`."""
        if not self.folds():
            return
        dtype = self.qkv.weight.dtype
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(self.qkv.weight.device.type, enabled=False):
            w_qk, b_qk, w_vo, b_vo, b_o = self._fold(torch.float64)
            if b_vo is not None:
                b_vo = b_vo.view(self.num_heads, -1).sum(0)
                b_o = b_vo if b_o is None else b_o + b_vo
            self._fused = tuple(None if t is None else t.to(dtype) for t in (w_qk, b_qk, w_vo, b_o))
        self._fused_from = self._weights_key()

    def _weights_key(self) -> tuple:
        """What tells the weights the fold was computed from apart from others: each one's storage, dtype and
        version (which an in-place change, `load_state_dict` included, moves on; `.to()` makes new tensors)."""
        return tuple((p.data_ptr(), p.dtype, p._version) for p in (self.qkv.weight, self.qkv.bias, self.proj.weight,
                                                                  self.proj.bias) if p is not None)

    def train(self, mode: bool = True) -> "FastAttention":
        if mode:
            self._fused = None  # training changes the weights the fold was computed from
        return super().train(mode)

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention through the folded weights: the keys are the tokens themselves, and each head's
        values are already through its share of the output projection, so the heads just add up.

        Per token that is 2·heads·dim² multiplies instead of 4·heads·head_dim·dim: fewer whenever
        head_dim > dim / 2 (for the Keras example's 2 heads of 128 on 128, half the projection work).
        The same function, up to rounding, and with gradients the same gradients: the fold is part of the
        graph, computed from the parameters (in their dtype, outside autocast), and the attention dropout
        is the reference path's mask under `FastDropout`, element for element. Inference with gradients
        off after `fuse` uses the fused float64 products instead.
        """
        B, N, D = x.shape
        H = self.num_heads
        fused = self._fused is not None and not (self.training or torch.is_grad_enabled())
        if fused and self._fused_from != self._weights_key():  # weights loaded, edited or cast since `fuse`
            self.fuse()
        if fused:
            w_qk, b_qk, w_vo, b_o = self._fused
            b_vo = None
        else:
            with torch.autocast(x.device.type, enabled=False):
                w_qk, b_qk, w_vo, b_vo, b_o = self._fold(self.qkv.weight.dtype)
        q = F.linear(x, w_qk, b_qk)  # (B, N, heads*dim)
        v = F.linear(x, w_vo, b_vo)  # (B, N, heads*dim)
        k = x.to(q.dtype)  # (B, N, dim)
        if fused and not self._matmul_path(q):
            q, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, v))  # (B, heads, N, dim)
            x = F.scaled_dot_product_attention(q, k.unsqueeze(1).expand(B, H, N, D), v, scale=1.0).sum(1)
        else:
            attn = (q.view(B, N * H, D) @ k.transpose(1, 2)).softmax(dim=-1)  # (B, N*heads, N), rows (token, head)
            if self.training and self.attn_drop.p > 0:  # the reference path's draw, in its (B, heads, N, N) order
                attn = self.attn_drop(attn.view(B, N, H, N).transpose(1, 2)).transpose(1, 2)  # x's layout kept
            v = v.view(B, N, H, D).transpose(1, 2).reshape(B, H * N, D)  # rows (head, token)
            x = attn.reshape(B, N, H * N) @ v  # the sum over heads and keys in one matmul: (B, N, dim)
        return self.proj_drop(x if b_o is None else x + b_o)

    def _training_core(self, qkv: torch.Tensor, p: float) -> torch.Tensor:
        """(B, N, heads·d) from the qkv projection, in training with dropout drawn as positions."""
        return _AttentionCore.apply(qkv, self.num_heads, self.scale, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds():
            return self._folded_forward(x)
        B, N, _ = x.shape
        qkv = self.qkv(x)  # (B, N, 3*heads*head_dim)
        p = self.attn_drop.p
        if self.attn_drop.training and p > 0 and qkv.device.type == "cpu" and draws_positions(p, qkv.dtype):
            return self.proj_drop(self.proj(self._training_core(qkv, p)))
        qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self._matmul_path(q):
            attn = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(attn) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class _AttentionCore(torch.autograd.Function):
    """softmax(s·q kᵀ), inverted dropout drawn as `dropped_positions`, times v: `Attention`'s core in training on
    a CPU where `dropout` draws positions (float32/64), from the qkv projection (B, N, 3·heads·d) to (B, N, heads·d).

    The same function and gradients (up to rounding) as the reference's matmul → softmax → dropout → matmul
    with `FastDropout`, from the same draw; in fewer passes over the (B·heads, N, N) maps, which dominate
    the time of attention over 256 tokens:
    * the scale goes on q (N·d numbers) rather than on the scores (N·N), exact for head_dim 64 (s = 1/8);
    * the dropped copy is the softmax scaled, with zeros written at the drawn positions: no mask tensor;
    * backward: with y the dropped map and o = y v, the softmax-and-dropout gradient is
      y ⊙ dY − softmax ⊙ rowsum(dO ⊙ o) (rowsum(dY ⊙ y) = rowsum(dO ⊙ o), from FlashAttention), two passes;
    * q, k, v are copied once into (B·heads, N, d) batches, and each product whose natural form would
      read an (N, N) map transposed is computed as the transpose of one that reads it straight;
    * the gradient comes back in the projection's (B, N, 3, heads, d) layout, with no stack or permute.
    One attention layer of `cct_7_3x1_32` (batch 128, float32, forward and backward): 470–500 → 402–425 ms on the
    2-core AMX Xeon, dropout by positions included; its training step ×1.06 (benchmarks/README.md).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float, p: float) -> torch.Tensor:
        B, N, C = qkv.shape
        d = C // (3 * heads)
        q, k, v = qkv.view(B, N, 3, heads, d).unbind(2)  # each (B, N, heads, d)
        qs = torch.mul(q.transpose(1, 2), scale, out=qkv.new_empty(B, heads, N, d)).view(B * heads, N, d)
        k, v = (t.transpose(1, 2).reshape(B * heads, N, d) for t in (k, v))  # (B·heads, N, d) copies
        attn = torch.bmm(qs, k.transpose(1, 2)).softmax(dim=-1)  # (B·heads, N, N)
        dropped, _ = dropped_copy(attn, dropped_positions(attn.numel(), p, device=attn.device), p)
        out = torch.bmm(dropped, v)  # (B·heads, N, d)
        ctx.save_for_backward(qs, k, v, attn, dropped, out)
        ctx.scale = scale
        return out.view(B, heads, N, d).transpose(1, 2).reshape(B, N, heads * d)

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives: the reference kernels (README)
    def backward(ctx, grad: torch.Tensor):
        qs, k, v, attn, dropped, out = ctx.saved_tensors
        BH, N, d = out.shape
        B = grad.shape[0]
        heads = BH // B
        g = grad.view(B, N, heads, d).transpose(1, 2).reshape(BH, N, d)  # dO
        d_dropped = torch.bmm(g, v.transpose(1, 2))  # (B·heads, N, N)
        dv = torch.bmm(g.transpose(1, 2), dropped).transpose(1, 2)  # (dOᵀ y)ᵀ, reading y straight
        rowsum = (g * out).sum(-1, keepdim=True)  # (B·heads, N, 1)
        d_scores = torch.mul(d_dropped, dropped, out=d_dropped).addcmul_(attn, rowsum, value=-1)
        dq = torch.bmm(d_scores, k)
        dk = torch.bmm(qs.transpose(1, 2), d_scores).transpose(1, 2)  # (qsᵀ dS)ᵀ
        dqkv = grad.new_empty(B, N, 3, heads, d)
        torch.mul(dq.view(B, heads, N, d).transpose(1, 2), ctx.scale, out=dqkv[:, :, 0])
        dqkv[:, :, 1].copy_(dk.reshape(B, heads, N, d).transpose(1, 2))
        dqkv[:, :, 2].copy_(dv.reshape(B, heads, N, d).transpose(1, 2))
        return dqkv.view(B, N, 3 * heads * d), None, None, None


class NativeAttention(FastAttention):
    """`FastAttention` whose float32 training core is `cct.native`'s compiled one ("native" kernels)."""

    def _training_core(self, qkv: torch.Tensor, p: float) -> torch.Tensor:
        if qkv.dtype != torch.float32:  # float64: the compiled core is float32 only
            return super()._training_core(qkv, p)
        return native.attention_core(qkv, self.num_heads, self.scale, p)


# ---------------------------------------------------------------------- tokenizer
def _pool_out_sizes(size, kernel: int, stride: int, padding: int, ceil_mode: bool) -> list[int]:
    """PyTorch's max_pool2d output sizes (a ceil-mode window must start inside the input or left padding)."""
    out = []
    for n in size:
        span = n + 2 * padding - kernel
        o = (-(-span // stride) if ceil_mode else span // stride) + 1
        if ceil_mode and (o - 1) * stride >= n + padding:
            o -= 1
        out.append(o)
    return out


class FastConvTokenizer(ConvTokenizer):
    """`ConvTokenizer` on channels-last tensors, max-pooling before the ReLU."""

    def _pool_then_relu(self, x: torch.Tensor) -> torch.Tensor:
        """relu → zero-pad → max-pool, computed as max-pool → relu on the un-padded conv output.

        The same numbers, gradients included: ReLU is monotone, so it commutes with the max, and a
        zero pixel added after the ReLU can change a pooled value only where the window's maximum is
        negative, where the ReLU after the pool gives 0 too. So the zero border becomes part of the
        pool's -inf padding, and the ReLU runs on a quarter of the pixels with no padded copy.
        """
        cfg = self.cfg
        k, s = cfg.pool_kernel, cfg.pool_stride
        size = x.shape[-2:]
        pads = []  # (before, after) per spatial axis, ReLU zeros and pool padding together
        for n in size:
            padded = n + 2 * cfg.post_pad
            if cfg.pool_padding == "same":
                before, after = _same_pool_padding(padded, k, s)
            else:
                before = after = cfg.pool_padding
            pads.append((before + cfg.post_pad, after + cfg.post_pad))
        before = pads[0][0]
        if all(b == before for b, _ in pads) and before <= k // 2:
            # max_pool2d pads `before` on both sides; a longer tail comes from ceil_mode when that
            # yields exactly the output size of the full padding
            wanted = [(n + b + a - k) // s + 1 for n, (b, a) in zip(size, pads)]
            for ceil_mode in (False, True):
                if _pool_out_sizes(size, k, s, before, ceil_mode) == wanted:
                    return F.relu(F.max_pool2d(x, k, s, before, ceil_mode=ceil_mode))
        (top, bottom), (left, right) = pads
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.relu(F.max_pool2d(x, k, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.cfg.conv_act and self.cfg.max_pool):
            return super().forward(x.contiguous(memory_format=torch.channels_last))
        # channels-last (NHWC): oneDNN's convolutions and max-pool run several times faster so on a
        # CPU, and the last one's output flattens into (B, tokens, D) without a copy
        x = x.contiguous(memory_format=torch.channels_last)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.cfg.pools_after(i):
                x = self._pool_then_relu(x)
            else:
                x = F.relu(x)
                if self.cfg.post_pad:
                    x = F.pad(x, (self.cfg.post_pad,) * 4)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, embed_dim)


# ---------------------------------------------------------------------- text attention
class FastMaskedAttention(MaskedAttention):
    """`MaskedAttention` with the scale and the key mask in one `baddbmm`, and `dropout`'s cheap mask.

    softmax(s·q kᵀ + bias), bias 0 for real keys and the dtype's most negative finite value for padded
    ones, is the reference's masked_fill then softmax (a row of padded keys stays uniform in both), in
    one batched GEMM instead of matmul, multiply and fill. Inference runs SDPA with the same bias.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        bias = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~mask[:, None, None, :], torch.finfo(q.dtype).min)  # (B, 1, 1, N)
        if not (self.training and self.attn_drop > 0) and not torch.is_grad_enabled():
            # a float bias, not a boolean mask: a text without tokens keeps the reference's uniform row
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            bias = bias.expand(B, H, 1, N)
            keys = k.reshape(B * H, N, d).transpose(1, 2)
            attn = torch.baddbmm(bias.reshape(B * H, 1, N), q.reshape(B * H, N, d), keys,
                                 alpha=d ** -0.5).softmax(dim=-1)  # (B·heads, N, N)
            attn = dropout(attn, self.attn_drop, self.training)
            x = torch.bmm(attn, v.reshape(B * H, N, d)).view(B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)
        return dropout(self.proj(x), self.proj_drop, self.training)


# ---------------------------------------------------------------------- choosing
_FAST = {Attention: FastAttention, nn.Dropout: FastDropout, nn.GELU: FastGELU, ConvTokenizer: FastConvTokenizer,
         TextConvTokenizer: FastTextConvTokenizer, MaskedAttention: FastMaskedAttention, nn.Embedding: FastEmbedding}
_REFERENCE = {**{fast: reference for reference, fast in _FAST.items()}, NativeAttention: Attention}


def use_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """Compute `model` with the "fast" kernels of this module, those and the compiled attention core of
    `cct.native` ("native"), or its "reference" layers; returns `model`.

    Only module classes change: parameters, buffers, state-dict keys and the random streams stay. "native"
    builds the core on first use (a C++ compiler and ninja) and raises `cct.native.NativeUnavailable` where it
    cannot, before any module changes.
    """
    assert kernels in KERNELS, f"kernels must be one of {KERNELS}, got {kernels!r}"
    table = _FAST
    if kernels == "native":
        native.load()
        table = {**_FAST, Attention: NativeAttention}
    for module in model.modules():
        reference = _REFERENCE.get(type(module), type(module))  # whichever kernels it computes with now
        target = reference if kernels == "reference" else table.get(reference)
        if target is None or target is type(module):
            continue
        module.__class__ = target
        if kernels == "reference":
            module.__dict__.pop("_fused", None)
            module.__dict__.pop("_fused_from", None)
    return model


def fuse(model: nn.Module) -> nn.Module:
    """Precompute what inference reuses (the folded attention weights); `model.train()` undoes it."""
    for module in model.modules():
        if isinstance(module, FastAttention):
            module.fuse()
    return model
