"""Augmentation policies built from `cct.augment`'s ops, and the training-batch pipeline.

- `rand_augment`: RandAugment (Cubuk et al., 2020) as timm's `rand_augment_transform`, the one the
  official CCT CIFAR configs use (`rand-m9-mstd0.5-inc1`);
- `auto_augment_cifar10`: AutoAugment's CIFAR-10 policy (Cubuk et al., 2019) as torchvision's
  `AutoAugment(AutoAugmentPolicy.CIFAR10)`;
- `AugmentConfig` and `augment_batch`: which ops a training batch gets, in timm's order.

A policy draws, per sample, which kernel of `cct.augment` to apply and with which argument, then hands
each round to `apply_ops`. Choices where references differ: geometric RandAugment ops fill with timm's
`img_mean` (the normalisation mean x 255, or timm's grey 128 without one), AutoAugment with
torchvision's 0; posterize to 0 bits gives black (TF and Pillow < 10; newer Pillow refuses 0 bits).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from .augment import (INTERPOLATIONS, KERNEL_ID, apply_ops, hflip, interp_codes, mixup_cutmix, normalize,
                      random_erasing, random_resized_crop, random_translate, uniform)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# RandAugment (timm)

# timm's level → argument rules; L = magnitude / 10 (timm's _LEVEL_DENOM), s = random sign ±1
_RAND_OPS = {
    "AutoContrast": ("autocontrast", lambda L, s, H, W: torch.zeros_like(L)),
    "Equalize": ("equalize", lambda L, s, H, W: torch.zeros_like(L)),
    "Invert": ("invert", lambda L, s, H, W: torch.zeros_like(L)),
    "Rotate": ("rotate", lambda L, s, H, W: 30 * L * s),
    "Posterize": ("posterize", lambda L, s, H, W: (4 * L).floor()),
    "PosterizeIncreasing": ("posterize", lambda L, s, H, W: 4 - (4 * L).floor()),
    "Solarize": ("solarize", lambda L, s, H, W: (256 * L).floor()),
    "SolarizeIncreasing": ("solarize", lambda L, s, H, W: 256 - (256 * L).floor()),
    "SolarizeAdd": ("solarize_add", lambda L, s, H, W: (110 * L).floor()),
    "Color": ("color", lambda L, s, H, W: 1.8 * L + 0.1),
    "ColorIncreasing": ("color", lambda L, s, H, W: (1 + 0.9 * L * s).clamp(min=0.1)),
    "Contrast": ("contrast", lambda L, s, H, W: 1.8 * L + 0.1),
    "ContrastIncreasing": ("contrast", lambda L, s, H, W: (1 + 0.9 * L * s).clamp(min=0.1)),
    "Brightness": ("brightness", lambda L, s, H, W: 1.8 * L + 0.1),
    "BrightnessIncreasing": ("brightness", lambda L, s, H, W: (1 + 0.9 * L * s).clamp(min=0.1)),
    "Sharpness": ("sharpness", lambda L, s, H, W: 1.8 * L + 0.1),
    "SharpnessIncreasing": ("sharpness", lambda L, s, H, W: (1 + 0.9 * L * s).clamp(min=0.1)),
    "ShearX": ("shear_x", lambda L, s, H, W: 0.3 * L * s),
    "ShearY": ("shear_y", lambda L, s, H, W: 0.3 * L * s),
    "TranslateXRel": ("translate_x", lambda L, s, H, W: 0.45 * L * s * W),  # timm's translate_pct 0.45
    "TranslateYRel": ("translate_y", lambda L, s, H, W: 0.45 * L * s * H),
}
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentParams:
    ops: tuple[str, ...]
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    prob: float = 0.5  # timm's AugmentOp applies each chosen op with probability 0.5


@functools.lru_cache(maxsize=None)
def parse_rand_augment(config: str) -> RandAugmentParams:
    """timm's RandAugment string: 'rand' then dash-separated m<magnitude>, n<layers>, mstd<std>
    (over 100: uniform in [0, m]), mmax<clip>, inc<0|1> (the increasing-severity op set), p<prob>."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand': {config!r}")
    kw, increasing = {}, False
    for part in parts[1:]:
        key, val = (re.split(r"(\d.*)", part) + [""])[:2]
        if key == "m":
            kw["magnitude"] = float(val)
        elif key == "n":
            kw["num_layers"] = int(val)
        elif key == "mstd":
            kw["magnitude_std"] = math.inf if float(val) > 100 else float(val)
        elif key == "mmax":
            kw["magnitude_max"] = float(val)
        elif key == "inc":
            increasing = bool(int(val))
        elif key == "p":
            kw["prob"] = float(val)
        else:  # timm's 'w' (op weights) is experimental and not supported
            raise ValueError(f"unknown or unsupported RandAugment section {part!r} in {config!r}")
    ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    params = RandAugmentParams(ops=ops, **kw)
    if not 0 < params.num_layers <= len(ops):
        raise ValueError(f"RandAugment needs 1..{len(ops)} layers, got {params.num_layers}")
    return params


def rand_augment(x: Tensor, generator: torch.Generator, config: str = "rand-m9-mstd0.5-inc1", *,
                 fill: tuple[int, ...] | None = None, interpolation: str = "random") -> Tensor:
    """RandAugment (Cubuk et al., 2020, arXiv:1909.13719) as timm's `rand_augment_transform(config)`.

    Per image: `n` distinct ops drawn uniformly (timm draws without replacement), each applied with
    probability 0.5 at magnitude ~ N(m, mstd) clipped to [0, mmax], with timm's level-to-argument rules
    and a random sign for signed ops. Geometric ops fill with `fill` (timm's `img_mean`: the dataset
    mean x 255; default timm's (128, 128, 128)) and interpolate per `interpolation` ('random': bilinear
    or bicubic per image, as timm's default).

    Args:
        x: (B, C, H, W) uint8 images.
        generator: source of every random draw.
        config: timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (the official CCT CIFAR setting).
    Returns:
        (B, C, H, W) uint8.
    """
    p = parse_rand_augment(config)
    B, C, H, W = x.shape
    fill_t = torch.tensor(fill if fill is not None else (128,) * C, dtype=torch.float32)[:C]
    kernel_of = torch.tensor([KERNEL_ID[_RAND_OPS[name][0]] for name in p.ops])
    chosen = torch.rand(B, len(p.ops), generator=generator).argsort(1)[:, :p.num_layers]  # distinct ops per image
    out = x.float()
    for layer in range(p.num_layers):
        op = chosen[:, layer]
        apply = torch.rand(B, generator=generator) <= p.prob
        if math.isinf(p.magnitude_std):
            magnitude = uniform(B, 0.0, p.magnitude, generator)
        else:
            magnitude = p.magnitude + p.magnitude_std * torch.randn(B, generator=generator)
        level = magnitude.clamp(0.0, p.magnitude_max) / 10.0
        sign = torch.where(torch.rand(B, generator=generator) < 0.5, 1.0, -1.0)
        args = torch.stack([_RAND_OPS[name][1](level, sign, H, W) for name in p.ops])  # (ops, B)
        arg = args.gather(0, op[None]).squeeze(0)
        kernel = torch.where(apply, kernel_of[op], -1)
        out = apply_ops(out, kernel, arg, interp_codes(interpolation, B, generator), fill_t)
    return out.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# AutoAugment, CIFAR-10 policy (torchvision)

CIFAR10_POLICY = (  # torchvision's AutoAugmentPolicy.CIFAR10: (op, probability, magnitude bin of 10)
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def _aa_magnitude(op: str, bin_: int | None, H: int, W: int) -> tuple[str, float, bool, float]:
    """(kernel, magnitude, signed, offset) from torchvision's AutoAugment._augmentation_space(10)."""
    i = bin_ or 0
    if op in ("ShearX", "ShearY"):
        return op.lower().replace("shear", "shear_"), 0.3 * i / 9, True, 0.0
    if op in ("TranslateX", "TranslateY"):  # int() pixels; negated: torchvision moves content by +t, Pillow by -t
        extent = W if op == "TranslateX" else H
        return "translate_" + op[-1].lower(), -float(int(150 / 331 * extent * i / 9)), True, 0.0
    if op == "Rotate":
        return "rotate", 30.0 * i / 9, True, 0.0
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):  # factor 1 + signed magnitude
        return op.lower(), 0.9 * i / 9, True, 1.0
    if op == "Posterize":
        return "posterize", float(8 - round(i / (9 / 4))), False, 0.0
    if op == "Solarize":
        return "solarize", 255.0 * (1 - i / 9), False, 0.0
    return op.lower(), 0.0, False, 0.0  # AutoContrast, Equalize, Invert


@functools.lru_cache(maxsize=8)
def _aa_tables(H: int, W: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = [[(KERNEL_ID[k], p, m, s, o) for (op, p, b) in sub for k, m, s, o in [_aa_magnitude(op, b, H, W)]]
            for sub in CIFAR10_POLICY]
    t = torch.tensor([[list(map(float, stage)) for stage in row] for row in rows])  # (25, 2, 5)
    return t[..., 0].long(), t[..., 1], t[..., 2], t[..., 3].bool(), t[..., 4]


def auto_augment_cifar10(x: Tensor, generator: torch.Generator, *, fill: tuple[int, ...] | None = None,
                         interpolation: str = "nearest") -> Tensor:
    """AutoAugment (Cubuk et al., 2019, arXiv:1805.09501), CIFAR-10 policy, as torchvision's
    `AutoAugment(AutoAugmentPolicy.CIFAR10)` with its defaults (nearest, fill 0).

    Per image: one of the 25 sub-policies, uniformly; each of its two ops applies when a uniform draw
    is <= its probability, at its magnitude bin's value, negated with probability 1/2 for signed ops.

    Args:
        x: (B, C, H, W) uint8.
        generator: source of every random draw.
    Returns:
        (B, C, H, W) uint8.
    """
    B, C, H, W = x.shape
    kernels, probs, magnitudes, signed, offsets = _aa_tables(H, W)
    fill_t = torch.tensor(fill if fill is not None else (0,) * C, dtype=torch.float32)[:C]
    policy = torch.randint(len(CIFAR10_POLICY), (B,), generator=generator)
    draws = torch.rand(B, 2, generator=generator)
    negate = torch.randint(2, (B, 2), generator=generator) == 0
    out = x.float()
    for stage in range(2):
        k, p, m = kernels[policy, stage], probs[policy, stage], magnitudes[policy, stage]
        arg = torch.where(signed[policy, stage] & negate[:, stage], -m, m) + offsets[policy, stage]
        kernel = torch.where(draws[:, stage] <= p, k, -1)
        out = apply_ops(out, kernel, arg, interp_codes(interpolation, B, generator), fill_t)
    return out.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# The whole pipeline


@dataclass
class AugmentConfig:
    """Which augmentations a training batch gets; defaults do nothing but scale to [0, 1]."""
    translate: int = 0  # random crop padding, pixels
    hflip: bool = False
    rrc_scale: tuple[float, float] | None = None  # RandomResizedCrop area range, e.g. (0.8, 1.0)
    rrc_interpolation: str = "random"
    rand_augment: str | None = None  # timm config, e.g. 'rand-m9-mstd0.5-inc1'
    auto_augment: bool = False  # AutoAugment CIFAR-10 policy
    erasing: float = 0.0  # random erasing probability ('pixel' mode)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_mode: str = "batch"
    label_smoothing: float = 0.0  # folded into the soft targets when mixing
    mean: tuple[float, ...] | None = None  # None: scale to [0, 1] only
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rand_augment is not None:
            parse_rand_augment(self.rand_augment)
        if self.rand_augment and self.auto_augment:
            raise ValueError("choose RandAugment or AutoAugment, not both")
        if self.rrc_interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.rrc_interpolation!r}")
        if self.mix_mode not in ("batch", "elem"):
            raise ValueError(f"mix mode must be 'batch' or 'elem', got {self.mix_mode!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def augment_batch(x: Tensor, labels: Tensor, generator: torch.Generator, cfg: AugmentConfig, *, num_classes: int,
                  mix: bool = True, out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A training batch: geometric and colour ops on uint8, normalise, erase, then mixup/cutmix.

    The order is timm's training transform (RandomResizedCrop, flip, auto-augment, normalise,
    random erasing) with mixing last, as timm's training loop does; `translate` (airbench's CIFAR
    crop) comes right after the resized crop.

    Args:
        x: (B, C, H, W) uint8 images.
        labels: (B,) int64.
        generator: source of every random draw.
        cfg: what to apply.
        num_classes: width of soft targets.
        mix: False turns mixing off (e.g. timm's mixup_off_epoch).
    Returns:
        (images (B, C, H, W) of out_dtype, targets): soft targets (B, num_classes) with label
        smoothing when mixing is on, else the int64 labels (the loss applies smoothing).
    """
    assert x.dtype == torch.uint8, "augment_batch takes uint8 images"
    if cfg.rrc_scale is not None:
        x = random_resized_crop(x, generator, tuple(x.shape[-2:]), cfg.rrc_scale, interpolation=cfg.rrc_interpolation)
    if cfg.translate:
        x = random_translate(x, generator, cfg.translate)
    if cfg.hflip:
        x = hflip(x, generator)
    if cfg.auto_augment:
        x = auto_augment_cifar10(x, generator)
    if cfg.rand_augment:
        fill = tuple(min(255, round(255 * m)) for m in cfg.mean) if cfg.mean else None  # timm's img_mean
        x = rand_augment(x, generator, cfg.rand_augment, fill=fill)
    out = normalize(x, cfg.mean, cfg.std)
    if cfg.erasing > 0:
        out = random_erasing(out, generator, p=cfg.erasing, mode="pixel")
    targets = labels
    if mix and cfg.mixing:
        out, targets = mixup_cutmix(out, labels, generator, num_classes=num_classes, mixup_alpha=cfg.mixup_alpha,
                                    cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob, switch_prob=cfg.switch_prob,
                                    mode=cfg.mix_mode, label_smoothing=cfg.label_smoothing)
    return out.to(out_dtype), targets  # soft targets stay float32: smoothing's small values need the precision
