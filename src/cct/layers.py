"""Building blocks of the CCT family: drop path, positional embeddings, attention, encoder blocks.

Two encoder-block layouts live here, each exactly as its source writes it:

* `OfficialBlock` follows SHI-Labs/Compact-Transformers (`src/utils/transformers.py`), used by
  every variant of the paper (Hassani et al., 2021). Its quirk, kept on purpose: after the
  attention residual the *residual stream itself* is layer-normalised (`x = norm1(x)`).
* `KerasBlock` follows the keras.io example "Compact Convolutional Transformers": a plain
  pre-norm block whose MLP applies the tanh-approximate GELU after *each* Dense layer.

This is the reference math, what export, explanation, MAC counting and the parity tests see.
The CPU kernels that compute the same functions faster (folded attention, cheap dropout masks,
the bf16 GELU table, ...) live in `cct.kernels` and are chosen explicitly with
`cct.kernels.use_kernels(model, "fast")`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection: qkv → softmax(q·kᵀ / √d) → dropout → ·v → proj.

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
        self.scale = self.head_dim ** -0.5
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, heads*head_dim)
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
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, dim) throughout
        x = x + drop_path(self.attn(self.pre_norm(x)), self.drop_path, self.training)
        x = self.norm1(x)  # normalises the residual stream itself, as the official code does
        y = self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))
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
        self.act = nn.GELU(approximate="tanh")  # Keras 3 `keras.ops.gelu` default: tanh-approximate
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.drop_path = drop_path

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act(self.fc1(x)))
        return self.dropout(self.act(self.fc2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, dim) throughout
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def official_init_(module: nn.Module) -> None:
    """The official code's initialisation, in module order: kaiming-normal convs, trunc-normal(0.02)
    linears with zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


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


class ClassifierHead:
    """timm's classifier interface over a model's `head` (an nn.Linear, or nn.Identity for none) and its `cfg`
    (`num_classes`, `embed_dim`, `pooling`); a model starts new head weights as it initialises them
    (`_init_head_weight`)."""

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def num_features(self) -> int:
        """Width of the pooled features `forward_head(..., pre_logits=True)` returns."""
        return self.cfg.embed_dim

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: none, `forward` returns the pooled features); `global_pool` is
        timm's argument, and only None or the model's own pooling ("seq" or "cls") is accepted: sequence pooling,
        or a class token, is part of the trained model, not a choice of head."""
        assert type(num_classes) is int and num_classes >= 0, \
            f"num_classes must be a non-negative int (0: no classifier), got {num_classes!r}"
        pooling = self.cfg.pooling
        assert global_pool in (None, pooling), f"this model pools with {pooling!r} (sequence pooling or a class " \
                                               f"token), not global_pool={global_pool!r}"
        self.cfg.num_classes = num_classes
        self.head = nn.Linear(self.cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            self._init_head_weight(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.class_names = None

    def _init_head_weight(self, weight: torch.Tensor) -> None:
        nn.init.trunc_normal_(weight, std=0.02)
