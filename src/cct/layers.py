"""Building blocks of the CCT family: drop path, positional embeddings, attention, encoder blocks.

Two encoder-block layouts live here, each exactly as its source writes it:

* `OfficialBlock` follows SHI-Labs/Compact-Transformers (`src/utils/transformers.py`), used by
  every variant of the paper (Hassani et al., 2021). Its quirk, kept on purpose: after the
  attention residual the *residual stream itself* is layer-normalised (`x = norm1(x)`).
* `KerasBlock` follows the keras.io example "Compact Convolutional Transformers": a plain
  pre-norm block whose MLP applies the tanh-approximate GELU after *each* Dense layer.

Speed on a CPU (measured by benchmarks/bench_cpu.py; same math, only cheaper to compute):
* dropout masks come from 16 random bits per element (`dropout`), several times cheaper than
  `bernoulli_` on a CPU, where the random numbers dominate the cost of dropout;
* attention goes through `F.scaled_dot_product_attention` (its fused CPU kernel) where that is
  the fastest, and through a plain matmul → softmax → dropout → matmul where SDPA would fall
  back to an unfused path (attention dropout) or is slower (bf16, short sequences; see
  `Attention._matmul_path`).
* the tanh-approximate GELU of a bfloat16 tensor is looked up in a table of all 65,536 bf16 values
  (`gelu_tanh`), bit for bit PyTorch's, whose CPU tanh is the slowest elementwise kernel of a step;
* attention whose heads are wider than half the stream (the Keras example's 2 heads of 128 on a
  128-wide stream) runs *folded* (`Attention._folded_forward`), in training as in inference:
  query·key and value·output products merged into one matrix per head, half the projection GEMMs,
  the same function and gradients up to rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def dropout_mask(shape: tuple[int, ...], p: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The multiplier of inverted dropout: 0 with probability p, else 1 / (1 - p).

    On a CPU the random numbers are most of the cost of dropout, so each element gets 16 random
    bits (a quarter of a 64-bit draw) rather than a float: the drop probability is p rounded to a
    multiple of 2^-16 (|error| <= 7.6e-6), and the kept scale uses that same rounded p, so the
    expectation is exactly preserved. The bits become the mask by integer arithmetic, several times
    cheaper than a comparison and a bool → float conversion: a clamp gives 0/1, and multiplying by
    the bit pattern of the scale gives the float's bits (0 → +0.0).
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


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with the cheaper CPU mask of `dropout_mask` (CUDA keeps PyTorch's fused kernel)."""
    if p == 0.0 or not training:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * dropout_mask(x.shape, p, dtype=x.dtype, device=x.device)


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


_GELU_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


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


def _tracing() -> bool:
    """Whether a tracer or compiler records this call: exports keep PyTorch's own operators."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()  # torch >= 2.3
    return torch.jit.is_tracing() or compiling


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` (Keras 3's GELU), by table lookup for bfloat16 on a CPU."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _tracing():
        return _GeluTanhBF16.apply(x)
    return F.gelu(x, approximate="tanh")


class Dropout(nn.Module):
    """`nn.Dropout` computed by `dropout` (no parameters, so state dicts are unaffected)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop whole residual branches per sample.

    Same rule as timm's `drop_path` and the Keras example's `StochasticDepth`: a kept
    sample is scaled by 1 / (1 - p) so the expectation is unchanged.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sinusoidal_embedding(num_tokens: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine embedding of Vaswani et al. (2017), as the official CCT code builds it.

    Returns (1, num_tokens, dim): even channels sin(p / 10000^(2i/dim)), odd channels cos.
    """
    position = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    channel = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = position / torch.pow(10000.0, 2 * torch.div(channel, 2, rounding_mode="floor") / dim)
    pe = torch.empty(num_tokens, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle[:, 0::2])
    pe[:, 1::2] = torch.cos(angle[:, 1::2])
    return pe.float().unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int = 0) -> torch.Tensor:
    """Bicubic interpolation of a learnable (1, prefix + gh*gw, dim) embedding onto a new token grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    assert grid.shape[1] == old_grid[0] * old_grid[1], f"{grid.shape[1]} tokens do not form a {old_grid} grid"
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, dim, gh, gw)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


_BF16_MATMUL_MAX_TOKENS = 196  # see Attention._matmul_path


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    Official CCT: head_dim = dim / heads, qkv without bias. The Keras example's
    `MultiHeadAttention(num_heads=2, key_dim=128)` is the same computation with
    head_dim = 128 (attention width 256 on a 128-wide stream) and q/k/v biases; its separate
    query/key/value kernels are stored here concatenated.
    """

    def __init__(self, dim: int, *, num_heads: int, head_dim: int | None = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.fold = True  # compute through `_folded_forward` where that pays (False: the plain path)
        self._fold_cache: tuple | None = None  # (the weights it was computed from, folded weights)

    def _matmul_path(self, q: torch.Tensor) -> bool:
        """matmul → softmax → matmul rather than `F.scaled_dot_product_attention`, where that is faster.

        SDPA's CPU kernels have no dropout (with it they fall back to an unfused path), and in bf16
        on a CPU its flash kernel is slower than two batched matmuls for short sequences: on the
        2-core test machine forward+backward of (128, 2, 64, 128) took 13 ms vs 35 ms and
        (128, 4, 256, 64) 216 ms vs 290 ms; inference (256, 6, 196, 64) 23 ms vs 47 ms, but
        (256, 4, 256, 64) 204 ms vs 152 ms. In fp32 SDPA is as fast or faster everywhere.
        """
        if self.training and self.attn_drop > 0:
            return True
        if q.dtype != torch.bfloat16 or q.device.type != "cpu":
            return False
        return self.training or q.shape[-2] <= _BF16_MATMUL_MAX_TOKENS

    def _folds(self) -> bool:
        """Through `_folded_forward`: where it costs fewer multiplies, unless turned off or traced."""
        return self.fold and 2 * self.head_dim > self.qkv.in_features and not _tracing()

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

    def _folded_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """`_fold` for inference: computed in float64, the value biases moved into the output bias (every
        row of P_h sums to 1 without dropout), cached until a weight changes.

        The cache keeps a copy of the weights it was computed from and compares values, not version
        counters: fused AdamW (and anything through `.data`) updates weights in place without bumping
        them, and a stale fold would evaluate old weights.
        """
        params = [p for p in (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias) if p is not None]
        if self._fold_cache is not None:
            source, folded = self._fold_cache
            if all(a.dtype == b.dtype and a.device == b.device and torch.equal(a, b) for a, b in zip(source, params)):
                return folded
        dtype = self.qkv.weight.dtype
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(self.qkv.weight.device.type, enabled=False):
            w_qk, b_qk, w_vo, b_vo, b_o = self._fold(torch.float64)
            if b_vo is not None:
                b_vo = b_vo.view(self.num_heads, -1).sum(0)
                b_o = b_vo if b_o is None else b_o + b_vo
            folded = tuple(None if t is None else t.to(dtype) for t in (w_qk, b_qk, w_vo, b_o))
            source = [p.detach().clone() for p in params]
        self._fold_cache = (source, folded)
        return folded

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention through the folded weights: the keys are the tokens themselves, and each head's
        values are already through its share of the output projection, so the heads just add up.

        Per token that is 2·heads·dim² multiplies instead of 4·heads·head_dim·dim: fewer whenever
        head_dim > dim / 2 (for the Keras example's 2 heads of 128 on 128, half the projection work).
        The same function, up to rounding, and in training the same gradients: the fold is part of the
        graph, computed from the parameters each step (in their dtype, outside autocast), and the
        attention dropout is the plain path's mask, element for element. Inference with gradients off
        uses cached float64 products instead.
        """
        B, N, D = x.shape
        H = self.num_heads
        cached = not (self.training or torch.is_grad_enabled())
        if cached:
            w_qk, b_qk, w_vo, b_o = self._folded_weights()
            b_vo = None
        else:
            with torch.autocast(x.device.type, enabled=False):
                w_qk, b_qk, w_vo, b_vo, b_o = self._fold(self.qkv.weight.dtype)
        q = F.linear(x, w_qk, b_qk)  # (B, N, heads*dim)
        v = F.linear(x, w_vo, b_vo)  # (B, N, heads*dim)
        k = x.to(q.dtype)  # (B, N, dim)
        if cached and not self._matmul_path(q):
            q, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, v))  # (B, heads, N, dim)
            x = F.scaled_dot_product_attention(q, k.unsqueeze(1).expand(B, H, N, D), v, scale=1.0).sum(1)
        else:
            attn = (q.view(B, N * H, D) @ k.transpose(1, 2)).softmax(dim=-1)  # (B, N*heads, N), rows (token, head)
            if self.training and self.attn_drop > 0:  # the plain path's mask (on a CPU), drawn as (B, heads, N, N)
                mask = dropout_mask((B, H, N, N), self.attn_drop, dtype=attn.dtype, device=attn.device)
                attn = attn.view(B, N, H, N) * mask.transpose(1, 2)
            v = v.view(B, N, H, D).transpose(1, 2).reshape(B, H * N, D)  # rows (head, token)
            x = attn.reshape(B, N, H * N) @ v  # the sum over heads and keys in one matmul: (B, N, dim)
        return self.proj_drop(x if b_o is None else x + b_o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folds():
            return self._folded_forward(x)
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self._matmul_path(q):
            attn = (q @ k.transpose(-2, -1)).mul_(self.head_dim ** -0.5).softmax(dim=-1)  # (B, heads, N, N)
            x = dropout(attn, self.attn_drop, self.training) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class OfficialBlock(nn.Module):
    """The official CCT encoder layer (SHI-Labs `TransformerEncoderLayer`)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, eps: float = 1e-5):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.pre_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = Dropout(drop) if drop > 0 else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.pre_norm(x)), self.drop_path, self.training)
        x = self.norm1(x)  # normalises the residual stream itself, as the official code does
        y = self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))
        return x + drop_path(y, self.drop_path, self.training)


class KerasBlock(nn.Module):
    """The keras.io CCT example's block: pre-norm attention and MLP, GELU after every Dense."""

    def __init__(self, dim: int, *, num_heads: int, head_dim: int | None, mlp_ratio: float, drop: float,
                 attn_drop: float, drop_path: float, eps: float = 1e-5):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=True, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = Dropout(drop) if drop > 0 else nn.Identity()
        self.drop_path = drop_path

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(gelu_tanh(self.fc1(x)))  # Keras 3 `keras.ops.gelu` default: tanh-approximate
        return self.dropout(gelu_tanh(self.fc2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def keras_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Keras's `compute_fans` on a *Keras-layout* kernel shape (last axis = outputs)."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def glorot_uniform_(tensor: torch.Tensor, keras_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Keras's glorot_uniform, with fans computed on the kernel's Keras shape when given."""
    fan_in, fan_out = keras_fans(tuple(keras_shape or tensor.shape[::-1]))
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(tensor, -limit, limit)


def he_normal_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Keras's he_normal: a normal truncated at 2 std, rescaled so its std is sqrt(2 / fan_in)."""
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
