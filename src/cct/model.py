"""The CCT model family: convolutional tokenizer → transformer encoder → sequence pooling → head.

Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers" (2021):
* CCT: a small convolutional tokenizer (conv → ReLU → max-pool, stacked) instead of patches;
* CVT: non-overlapping patches (one strided conv), with sequence pooling;
* ViT-Lite: patches and a class token (section 3 of the paper).
One `CCT` class covers all three; `CCTConfig` says which, and is saved inside checkpoints so
that a checkpoint rebuilds its model alone. `block="keras"` selects the keras.io example's
layout and initialisers for `cct_2_3x2_32_keras`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (ClassifierHead, KerasBlock, OfficialBlock, glorot_uniform_, he_normal_, official_init_,
                     resize_pos_embed, sinusoidal_embedding)

POSITIONAL_EMBEDDINGS = ("learnable", "sine", "none")
BLOCKS = ("official", "keras")
POOLINGS = ("seq", "cls")


@dataclass
class CCTConfig:
    img_size: tuple[int, int] = (32, 32)
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 2
    head_dim: int | None = None  # None: embed_dim // num_heads
    mlp_ratio: float = 1.0
    # tokenizer: `conv_layers` × [conv → (ReLU) → (zero pad) → (max-pool)]
    conv_layers: int = 2
    conv_channels: int = 64  # width of every conv but the last (the official `in_planes`)
    conv_widths: tuple[int, ...] | None = None  # each conv's output width (the last = embed_dim); None: as above
    pool_layers: tuple[int, ...] | None = None  # the convs a max-pool follows (0-based); None: every one
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    conv_bias: bool = False
    conv_act: bool = True
    post_pad: int = 0  # zero padding after the ReLU (the Keras example's ZeroPadding2D)
    max_pool: bool = True
    pool_kernel: int = 3
    pool_stride: int = 2
    pool_padding: int | str = 1  # an int, or "same" for TensorFlow's asymmetric padding
    # encoder
    block: str = "official"
    pooling: str = "seq"
    positional_embedding: str = "learnable"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-5

    def __post_init__(self):
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        assert isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size), \
            f"img_size must be a positive int or (h, w) of ints, got {self.img_size!r}"  # not "32", read as (3, 2)
        self.img_size = tuple(size)
        assert self.positional_embedding in POSITIONAL_EMBEDDINGS, \
            f"positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, got {self.positional_embedding!r}"
        assert self.block in BLOCKS, f"block must be one of {BLOCKS}, got {self.block!r}"
        assert self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}"
        assert self.pool_padding == "same" or isinstance(self.pool_padding, int), \
            f"pool_padding must be an int or 'same', got {self.pool_padding!r}"
        if self.conv_widths is not None:
            self.conv_widths = tuple(int(w) for w in self.conv_widths)
            assert len(self.conv_widths) == self.conv_layers and self.conv_widths[-1] == self.embed_dim, \
                f"conv_widths must give {self.conv_layers} widths ending in embed_dim {self.embed_dim}, " \
                f"got {self.conv_widths}"
        if self.pool_layers is not None:
            self.pool_layers = tuple(int(i) for i in self.pool_layers)
            assert all(0 <= i < self.conv_layers for i in self.pool_layers), \
                f"pool_layers must be conv indices in [0, {self.conv_layers}), got {self.pool_layers}"
        for name, least in (("in_chans", 1), ("depth", 1), ("conv_layers", 1), ("embed_dim", 1), ("num_heads", 1),
                            ("conv_channels", 1), ("kernel_size", 1), ("stride", 1), ("padding", 0), ("post_pad", 0),
                            ("pool_kernel", 1), ("pool_stride", 1), ("head_dim", 1)):
            value = getattr(self, name)  # a bool is an int to Python, never a width or a count here
            assert (value is None and name == "head_dim") or (type(value) is int and value >= least), \
                f"{name} must be an int >= {least}, got {value!r}"
        assert self.head_dim is not None or self.embed_dim % self.num_heads == 0, \
            f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads} (or give head_dim)"
        assert type(self.num_classes) is int and self.num_classes >= 0, \
            f"num_classes must be a non-negative int (0: no classifier), got {self.num_classes!r}"
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            assert 0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        for name in ("conv_widths", "pool_layers"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    def pools_after(self, i: int) -> bool:
        """Whether a max-pool follows conv `i`."""
        return self.max_pool and (self.pool_layers is None or i in self.pool_layers)

    @classmethod
    def from_dict(cls, d: dict) -> "CCTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


def _same_pool_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding: output ceil(size / stride), the odd pixel padded after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvTokenizer(nn.Module):
    """Images → tokens. CCT stacks conv → ReLU → max-pool; CVT/ViT-Lite use one strided conv."""

    def __init__(self, cfg: CCTConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.in_chans] + list(cfg.conv_widths or [cfg.conv_channels] * (cfg.conv_layers - 1) + [cfg.embed_dim])
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], cfg.kernel_size, stride=cfg.stride, padding=cfg.padding,
                      bias=cfg.conv_bias)
            for i in range(cfg.conv_layers))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.pool_padding != "same":
            return F.max_pool2d(x, cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding)
        top, bottom = _same_pool_padding(x.shape[-2], cfg.pool_kernel, cfg.pool_stride)
        left, right = _same_pool_padding(x.shape[-1], cfg.pool_kernel, cfg.pool_stride)
        if top or bottom or left or right:  # -inf, so padding never wins the max (as in TF)
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, cfg.pool_kernel, cfg.pool_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        for i, conv in enumerate(self.convs):  # (B, C, H, W) → (B, C', H', W') per layer
            x = conv(x)
            if cfg.conv_act:
                x = F.relu(x)
            if cfg.post_pad:
                x = F.pad(x, (cfg.post_pad,) * 4)
            if cfg.pools_after(i):
                x = self._pool(x)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, embed_dim)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (gh, gw) for an input of `img_size`, by arithmetic (no forward pass)."""
        cfg = self.cfg
        dims = []
        for size in img_size:
            for i in range(cfg.conv_layers):
                size = (size + 2 * cfg.padding - cfg.kernel_size) // cfg.stride + 1 + 2 * cfg.post_pad
                if cfg.pools_after(i):
                    if cfg.pool_padding == "same":
                        size = -(-size // cfg.pool_stride)
                    else:
                        size = (size + 2 * cfg.pool_padding - cfg.pool_kernel) // cfg.pool_stride + 1
            if size <= 0:
                raise ValueError(f"input size {tuple(img_size)} is too small for this tokenizer")
            dims.append(size)
        return dims[0], dims[1]


class CCT(ClassifierHead, nn.Module):
    """Compact Convolutional Transformer (and CVT / ViT-Lite), with timm's model interface."""

    def __init__(self, cfg: CCTConfig):
        super().__init__()
        self.cfg = cfg
        self.class_names: list[str] | None = None
        self.tokenizer = ConvTokenizer(cfg)
        self.grid = self.tokenizer.grid(cfg.img_size)
        self.any_grid = False  # `any_token_grid`: other input sizes interpolate a learnable embedding
        self.num_prefix_tokens = 1 if cfg.pooling == "cls" else 0
        num_tokens = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        D = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pooling == "cls" else None
        self.pos_embed = None
        if cfg.positional_embedding == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, D))
        elif cfg.positional_embedding == "sine":
            # a buffer, not a weight: deterministic, recomputed for the input size, never saved
            self.register_buffer("sine_embed", sinusoidal_embedding(num_tokens, D), persistent=False)
        # the official code drops out after the embedding; the Keras example goes straight into its blocks
        self.pos_drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 and cfg.block != "keras" else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        if cfg.block == "keras":
            self.blocks = nn.ModuleList(
                KerasBlock(D, num_heads=cfg.num_heads, head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio,
                           drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=r, eps=cfg.norm_eps)
                for r in rates)
        else:
            assert cfg.head_dim in (None, D // cfg.num_heads), "the official block has head_dim = embed_dim // num_heads"
            self.blocks = nn.ModuleList(
                OfficialBlock(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop=cfg.drop_rate,
                              attn_drop=cfg.attn_drop_rate, drop_path=r, eps=cfg.norm_eps)
                for r in rates)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attention_pool = nn.Linear(D, 1) if cfg.pooling == "seq" else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self) -> None:
        if self.cfg.block == "keras":
            self._init_keras()
        else:
            self._init_official()

    def _init_official(self) -> None:
        """As SHI-Labs: kaiming-normal convs, trunc-normal(0.02) linears, trunc-normal(0.2) embedding."""
        official_init_(self)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2)

    def _init_keras(self) -> None:
        """As the Keras example: he-normal convs, glorot-uniform kernels with Keras's fans, zero biases."""
        for conv in self.tokenizer.convs:
            he_normal_(conv.weight, fan_in=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                glorot_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # MultiHeadAttention kernels are 3-D in Keras, which changes their fans
            attn, D = blk.attn, self.cfg.embed_dim
            for w in blk.attn.qkv.weight.chunk(3, dim=0):
                with torch.no_grad():
                    w.copy_(glorot_uniform_(torch.empty_like(w), keras_shape=(D, attn.num_heads, attn.head_dim)))
            glorot_uniform_(attn.proj.weight, keras_shape=(attn.num_heads, attn.head_dim, D))
        if self.pos_embed is not None:
            glorot_uniform_(self.pos_embed[0], keras_shape=tuple(self.pos_embed.shape[1:]))

    # ------------------------------------------------------------------ timm interface (`ClassifierHead`)
    def _init_head_weight(self, weight: torch.Tensor) -> None:
        if self.cfg.block == "keras":  # the Keras example's Dense
            glorot_uniform_(weight)
        else:
            super()._init_head_weight(weight)

    def _position(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.pos_embed is not None:
            if grid == self.grid:
                return x + self.pos_embed
            if not self.any_grid:
                raise ValueError(f"this model's learnable positional embedding is for a {self.cfg.img_size} input "
                                 f"(token grid {self.grid}); got a token grid {grid}: resize the embedding with "
                                 "model.set_img_size(size)")
            # training at a reduced resolution: the gradient reaches the native-size embedding through the resize
            return x + resize_pos_embed(self.pos_embed, self.grid, grid, self.num_prefix_tokens)
        if self.cfg.positional_embedding == "sine":
            pe = self.sine_embed
            if pe.shape[1] != x.shape[1]:
                pe = sinusoidal_embedding(x.shape[1], x.shape[2]).to(x.device)
            return x + pe.to(x.dtype)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images → (B, tokens, embed_dim) normalised token features."""
        x = x.to(self.norm.weight.dtype)  # computes in the parameters' dtype; autocast is the caller's
        B, _, H, W = x.shape
        x = self.tokenizer(x)  # (B, gh*gw, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + gh*gw, D)
        x = self.pos_drop(self._position(x, self.tokenizer.grid((H, W))))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence-pooling weights (B, tokens): softmax over tokens of a learned score."""
        return F.softmax(self.attention_pool(x).squeeze(-1), dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.attention_pool is not None:
            x = (self.pool_weights(x).unsqueeze(1) @ x).squeeze(1)  # (B, D) sequence pooling
        else:
            x = x[:, 0]  # class token
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Adapt the model to another input size; a learnable embedding is interpolated on the grid."""
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        new_grid = self.tokenizer.grid(size)
        if self.pos_embed is not None:
            resized = resize_pos_embed(self.pos_embed.data, self.grid, new_grid, self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(resized)
        elif self.cfg.positional_embedding == "sine":
            n = new_grid[0] * new_grid[1] + self.num_prefix_tokens
            self.sine_embed = sinusoidal_embedding(n, self.cfg.embed_dim).to(self.norm.weight.device)
        self.cfg.img_size, self.grid = size, new_grid

    def extra_repr(self) -> str:
        return f"img_size={self.cfg.img_size}, tokens={self.grid[0] * self.grid[1]}, " \
               f"positional_embedding={self.cfg.positional_embedding!r}"


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def any_token_grid(model: nn.Module) -> Iterator[None]:
    """Inside it, the `CCT`s in `model` take inputs of any size: a learnable positional embedding is interpolated
    (differentiably, bicubic) onto the input's token grid. Training at reduced resolutions (`--res-schedule`) runs
    its steps inside it; elsewhere an input of another size than the model's is an error, not a silent resize."""
    ccts = [m for m in model.modules() if isinstance(m, CCT)]
    for m in ccts:
        m.any_grid = True
    try:
        yield
    finally:
        for m in ccts:
            m.any_grid = False


def count_macs(model: CCT, img_size: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass (convs, linears, attention) at `img_size` (default: the model's
    native input size).

    Counted on a fresh reference model of the same config (built on the meta device: shapes only), so
    the figure is the model as defined, whatever faster kernels `model` runs with.
    """
    img_size = tuple(img_size or model.cfg.img_size)
    with torch.device("meta"):
        reference = CCT(replace(model.cfg, img_size=img_size)).eval()
    macs = 0

    def conv_hook(m, inp, out):
        nonlocal macs
        macs += out.numel() // out.shape[0] * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m, inp, out):
        nonlocal macs
        macs += out.numel() // out.shape[0] * m.in_features

    for m in reference.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        reference(torch.zeros(1, model.cfg.in_chans, *img_size, device="meta"))
    tokens = reference.grid[0] * reference.grid[1] + reference.num_prefix_tokens
    for blk in reference.blocks:  # q·k and attn·v: 2 × tokens² × width
        macs += 2 * tokens * tokens * blk.attn.num_heads * blk.attn.head_dim
    return macs
