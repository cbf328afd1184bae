"""Batched data augmentation ops on (B, C, H, W) tensors, every random draw from one torch.Generator.

Each function is pure — `(images, generator, ...) -> images` — with per-sample randomness, as in
airbench (Jordan, 2024), and follows a published definition, cited on the function:

- `hflip`, `random_translate` (random crop with zero padding), `random_resized_crop`: torchvision;
- `alternating_flips`: airbench's derandomised flip, applied by the training loop (it needs the
  images' indices and the epoch);
- `random_erasing`: Random Erasing (Zhong et al., 2020) as timm's `RandomErasing`;
- `mixup_cutmix`: mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) as timm's `Mixup`;
- the colour and geometric kernels of RandAugment and AutoAugment (`cct.policies`), Pillow's
  ImageOps / ImageEnhance / `Image.transform` as tensor math, run by `apply_ops`.

`apply_ops` batches a round of per-sample kernel choices by grouping the samples that drew the same
kernel: colour kernels run as tensor math on each group, and all geometric kernels of the round run as
one `grid_sample` per interpolation mode. Pixel values are kept integral after each kernel, with
Pillow's rounding, so the kernels compose as they do on 8-bit images; the tests check each against
Pillow. Known differences from Pillow: bicubic uses PyTorch's a=-0.75 kernel (Pillow's is -0.5), and
resampling does not antialias (CIFAR crops are upsampled, where it would not apply).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_INTERP = {"nearest": 0, "bilinear": 1, "bicubic": 2}
_INTERP_NAMES = {v: k for k, v in _INTERP.items()}
INTERPOLATIONS = ("random", *_INTERP)  # random: bilinear or bicubic per image


def uniform(shape, low, high, g: torch.Generator) -> Tensor:
    """Uniform floats in [low, high) of `shape`."""
    return torch.rand(shape, generator=g) * (high - low) + low


def _randint(high: Tensor, g: torch.Generator) -> Tensor:
    """Uniform integers in [0, high) with a per-sample (tensor) upper bound."""
    return (torch.rand(high.shape, generator=g) * high).floor().long().clamp_(max=(high - 1).clamp(min=0))


def interp_codes(interpolation: str, n: int, g: torch.Generator) -> Tensor:
    """Per-sample interpolation codes for `apply_ops` and the warps: one of `INTERPOLATIONS`."""
    if interpolation == "random":  # timm's _RANDOM_INTERPOLATION: bilinear or bicubic, per image
        return torch.randint(1, 3, (n,), generator=g)
    assert interpolation in _INTERP, f"unknown interpolation {interpolation!r}"
    return torch.full((n,), _INTERP[interpolation], dtype=torch.long)


def numpy_rng(g: torch.Generator) -> np.random.Generator:
    # torch has no Beta sampler that takes a generator; seed NumPy's from ours to stay reproducible
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))


# ---------------------------------------------------------------------------------------------------
# Geometry: one affine warp for any batch of per-sample matrices


def _warp(x: Tensor, matrix: Tensor, interp: Tensor, fill: Tensor | None,
          out_size: tuple[int, int] | None = None) -> Tensor:
    """Resample float images with per-sample affine maps from output to input pixel coordinates.

    `matrix` (n, 2, 3) follows Pillow's `Image.transform(AFFINE)`: the output point (x, y), in
    continuous coordinates (pixel centres at +0.5), samples the input at (a x + b y + c, d x + e y + f).
    Output pixels whose source lies outside the image get `fill`, as Pillow's `fillcolor`.
    """
    n, C, H, W = x.shape
    Ho, Wo = out_size or (H, W)
    a, b, c, d, e, f = matrix.reshape(n, 6, 1, 1).unbind(1)
    xo, yo = torch.arange(Wo) + 0.5, (torch.arange(Ho) + 0.5).view(Ho, 1)  # output pixel centres
    src_x, src_y = a * xo + b * yo + c, d * xo + e * yo + f  # (n, Ho, Wo)
    # to align_corners=False normalised coordinates, where [-1, 1] spans the image's outer edges
    grid = torch.stack([src_x * (2 / W) - 1, src_y * (2 / H) - 1], -1)  # (n, Ho, Wo, 2)
    # Pillow's nearest takes floor(source), grid_sample rounds half to even: nudge exact ties upwards
    nudge = torch.tensor([2e-4 / W, 2e-4 / H])

    def sample(x_: Tensor, grid_: Tensor, code: int) -> Tensor:
        grid_ = grid_ + nudge if code == _INTERP["nearest"] else grid_
        return F.grid_sample(x_, grid_, mode=_INTERP_NAMES[code], padding_mode="border", align_corners=False)

    codes = interp.unique().tolist()
    if len(codes) == 1:
        out = sample(x, grid, codes[0])
    else:
        out = torch.empty(n, C, Ho, Wo, dtype=x.dtype)
        for code in codes:
            sel = (interp == code).nonzero().squeeze(1)
            out[sel] = sample(x[sel], grid[sel], code)
    if fill is not None:
        outside = ((src_x < 0) | (src_x > W) | (src_y < 0) | (src_y > H)).unsqueeze(1)  # (n, 1, Ho, Wo)
        out = torch.where(outside, fill.view(1, -1, 1, 1).to(out.dtype), out)
    return out


def _rotate(deg: Tensor, H: int, W: int) -> Tensor:
    """Counter-clockwise about the centre, as Pillow's `Image.rotate`."""
    t = deg * (math.pi / 180)
    cos, sin = t.cos(), t.sin()
    cx, cy = W / 2, H / 2
    return torch.stack([torch.stack([cos, -sin, cx - cos * cx + sin * cy], 1),
                        torch.stack([sin, cos, cy - sin * cx - cos * cy], 1)], 1)


def _affine_rows(a, b, c, d, e, f) -> Tensor:
    return torch.stack([torch.stack([a, b, c], 1), torch.stack([d, e, f], 1)], 1)


def _shear_x(v: Tensor, H: int, W: int) -> Tensor:  # timm's shear_x: (1, v, 0, 0, 1, 0)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine_rows(one, v, zero, zero, one, zero)


def _shear_y(v: Tensor, H: int, W: int) -> Tensor:  # (1, 0, 0, v, 1, 0)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return _affine_rows(one, zero, zero, v, one, zero)


def _translate_x(px: Tensor, H: int, W: int) -> Tensor:  # (1, 0, px, 0, 1, 0): content moves left by px
    one, zero = torch.ones_like(px), torch.zeros_like(px)
    return _affine_rows(one, zero, px, zero, one, zero)


def _translate_y(px: Tensor, H: int, W: int) -> Tensor:
    one, zero = torch.ones_like(px), torch.zeros_like(px)
    return _affine_rows(one, zero, zero, zero, one, px)


# ---------------------------------------------------------------------------------------------------
# Colour: Pillow's ImageOps / ImageEnhance as tensor math on float images holding 0..255 integers


def _gray(x: Tensor) -> Tensor:
    """Pillow's convert('L'): ITU-R 601-2 luma, rounded. (n, 1, H, W)"""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).round_()


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow's Image.blend(degenerate, x, factor), which truncates to 8 bits."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).floor_().clamp_(0, 255)


def _color(x: Tensor, factor: Tensor) -> Tensor:
    return x if x.shape[1] == 1 else _blend(_gray(x), x, factor)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = (_gray(x).mean((1, 2, 3), keepdim=True) + 0.5).floor_()  # Pillow rounds the mean luma
    return _blend(mean, x, factor)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(torch.zeros(()), x, factor)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with Pillow's SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13), which leaves the border as is."""
    # the 3x3 sum plus 4x the centre, via avg_pool2d: much faster than a 1-channel conv2d on CPU
    smooth = (9 * F.avg_pool2d(x, 3, stride=1) + 4 * x[:, :, 1:-1, 1:-1]) / 13
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.round_()
    return _blend(degenerate, x, factor)


def _autocontrast(x: Tensor, _: Tensor) -> Tensor:
    """Pillow's ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, ((x - lo) * scale).floor_().clamp_(0, 255), x)


def _equalize(x: Tensor, _: Tensor) -> Tensor:
    """Pillow's ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step."""
    n, C, H, W = x.shape
    flat = x.reshape(n * C, H * W).long()
    hist = torch.zeros(n * C, 256, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    last_value = 255 - (hist.flip(1) > 0).long().argmax(1, keepdim=True)
    step = (H * W - hist.gather(1, last_value)) // 255  # Pillow ignores the top value's count
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)).clamp_(max=255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.view(n, C, H, W).to(x.dtype)


def _invert(x: Tensor, _: Tensor) -> Tensor:
    return 255 - x


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the `bits` high bits (8 or more: unchanged; 0: black)."""
    q = torch.pow(2.0, 8 - bits.clamp(max=8)).view(-1, 1, 1, 1)
    return (x / q).floor_() * q


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def _solarize_add(x: Tensor, add: Tensor) -> Tensor:  # timm's solarize_add: add below 128
    return torch.where(x < 128, (x + add.view(-1, 1, 1, 1)).clamp_(max=255), x)


_COLOR_OPS = {"autocontrast": _autocontrast, "equalize": _equalize, "invert": _invert, "posterize": _posterize,
              "solarize": _solarize, "solarize_add": _solarize_add, "color": _color, "contrast": _contrast,
              "brightness": _brightness, "sharpness": _sharpness}
_GEOMETRIC_OPS = {"rotate": _rotate, "shear_x": _shear_x, "shear_y": _shear_y, "translate_x": _translate_x,
                  "translate_y": _translate_y}
KERNELS = list(_COLOR_OPS) + list(_GEOMETRIC_OPS)  # geometric last: after sorting they form one block
KERNEL_ID = {k: i for i, k in enumerate(KERNELS)}


def apply_ops(x: Tensor, kernel: Tensor, arg: Tensor, interp: Tensor, fill: Tensor) -> Tensor:
    """Apply kernel[i](x[i], arg[i]) to every sample (kernel -1: none), one batched call per kernel.
    Writes into x, which callers own (their float copy of the batch)."""
    B, C, H, W = x.shape
    K = len(KERNELS)
    key = torch.where(kernel < 0, K, kernel)
    order = key.argsort(stable=True)
    counts = torch.bincount(key, minlength=K + 1).tolist()
    active = B - counts[K]
    if active == 0:
        return x
    idx = order[:active]
    xs, args, start = x[idx], arg[idx], 0
    for name, count in zip(_COLOR_OPS, counts):
        if count:
            xs[start:start + count] = _COLOR_OPS[name](xs[start:start + count], args[start:start + count])
        start += count
    if start < active:  # every geometric op of this round in one warp per interpolation mode
        mats, pos = [], start
        for name, count in zip(_GEOMETRIC_OPS, counts[len(_COLOR_OPS):K]):
            if count:
                mats.append(_GEOMETRIC_OPS[name](args[pos:pos + count], H, W))
            pos += count
        warped = _warp(xs[start:], torch.cat(mats), interp[idx[start:]], fill)
        xs[start:] = warped.floor_().clamp_(0, 255)  # Pillow's transform truncates to 8 bits
    x[idx] = xs
    return x


# ---------------------------------------------------------------------------------------------------
# Flip, translate, resized crop


def hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability p (torchvision's RandomHorizontalFlip)."""
    return flip_where(x, torch.rand(len(x), generator=generator) < p)


def flip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right the images (B, C, H, W) where the bool (B,) `flip` is True."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def alternating_flips(n: int, *, seed: int, epoch: int) -> Tensor:
    """airbench's derandomised flip (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds"): which of a training
    set's `n` images are mirrored in `epoch` (0-based), a bool (n,). A seeded random half in the first
    epoch, then each image the opposite way to the epoch before, so that every two consecutive epochs
    show every image both ways, where independent coin flips repeat a side half of the time."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return first ^ bool(epoch % 2)


def random_translate(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """torchvision's RandomCrop(size, padding) with zero padding: a uniform shift in [-padding, padding]
    per axis and image, the standard CIFAR augmentation (He et al., 2016). Any dtype."""
    if padding == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    # one gather over flattened planes: the crop at (dy, dx) reads flat offsets dy * Wp + dx + window
    Wp = W + 2 * padding
    window = (torch.arange(H).view(H, 1) * Wp + torch.arange(W)).view(1, 1, H * W)
    index = (window + (dy * Wp + dx).view(B, 1, 1)).expand(B, C, H * W)
    return padded.view(B, C, -1).gather(2, index).view(B, C, H, W)


def random_resized_crop(x: Tensor, generator: torch.Generator, size: int | tuple[int, int],
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str = "random") -> Tensor:
    """torchvision's RandomResizedCrop: a box of area ~ U(scale) x image and log-uniform aspect
    ratio (10 tries, then the centre crop at the clamped ratio), resized to `size`. 'random'
    interpolation is timm's: bilinear or bicubic per image. uint8 in, uint8 out; float stays float."""
    B, C, H, W = x.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    area = uniform((B, 10), scale[0], scale[1], generator) * (H * W)
    aspect = uniform((B, 10), math.log(ratio[0]), math.log(ratio[1]), generator).exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = ok.long().argmax(1, keepdim=True)
    w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), ok.any(1)
    if W / H < min(ratio):
        fw, fh = W, round(W / min(ratio))
    elif W / H > max(ratio):
        fw, fh = round(H * max(ratio)), H
    else:
        fw, fh = W, H
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, _randint((H - h + 1).long(), generator).float(), ((H - h) // 2))
    left = torch.where(found, _randint((W - w + 1).long(), generator).float(), ((W - w) // 2))
    zero = torch.zeros(B)
    matrix = _affine_rows(w / out_w, zero, left, zero, h / out_h, top)  # output → the box
    out = _warp(x.float(), matrix, interp_codes(interpolation, B, generator), None, (out_h, out_w))
    return out.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# After normalisation: random erasing, mixup / cutmix


def normalize(x: Tensor, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Tensor:
    """uint8 → float32: x / 255, then (x - mean) / std per channel when mean is given."""
    if mean is None:
        return x.float().div_(255)
    C = x.shape[1]
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {C}-channel images")
    mean_t = torch.tensor(mean).view(1, C, 1, 1)
    std_t = torch.tensor(std).view(1, C, 1, 1)
    return x.float().mul_(1 / (255 * std_t)).sub_(mean_t / std_t)


def random_erasing(x: Tensor, generator: torch.Generator, p: float = 0.25, mode: str = "pixel", *,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_aspect: float | None = None, count: int = 1) -> Tensor:
    """Random Erasing (Zhong et al., 2020, arXiv:1708.04896) as timm's RandomErasing, on normalised
    float images: with probability p, 1..count boxes of area ~ U(min_area, max_area) x image / count
    and log-uniform aspect ratio (10 tries each), filled with N(0, 1) noise per pixel ('pixel'), per
    channel ('rand') or zeros ('const')."""
    assert mode in ("pixel", "rand", "const"), f"unknown erasing mode {mode!r}"
    B, C, H, W = x.shape
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    erase = torch.rand(B, generator=generator) <= p
    boxes = torch.randint(1, count + 1, (B,), generator=generator) if count > 1 else torch.ones(B, dtype=torch.long)
    out = x.clone()
    for box in range(count):
        target = uniform((B, 10), min_area, max_area, generator) * (H * W) / boxes[:, None]
        aspect = uniform((B, 10), *log_aspect, generator).exp()
        h = (target * aspect).sqrt().round().long()
        w = (target / aspect).sqrt().round().long()
        ok = (w < W) & (h < H)
        first = ok.long().argmax(1, keepdim=True)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        top, left = _randint(H - h + 1, generator), _randint(W - w + 1, generator)
        sel = (erase & (boxes > box) & ok.any(1)).nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        rows = torch.arange(H).view(1, H, 1)
        cols = torch.arange(W).view(1, 1, W)
        t, l, hh, ww = (v[sel].view(-1, 1, 1) for v in (top, left, h, w))
        mask = ((rows >= t) & (rows < t + hh) & (cols >= l) & (cols < l + ww)).unsqueeze(1)  # (n, 1, H, W)
        if mode == "pixel":
            noise = torch.randn(len(sel), C, H, W, generator=generator)
        elif mode == "rand":
            noise = torch.randn(len(sel), C, 1, 1, generator=generator)
        else:
            noise = torch.zeros(len(sel), C, 1, 1)
        out[sel] = torch.where(mask, noise.to(x.dtype), out[sel])
    return out


def mixup_target(labels: Tensor, num_classes: int, lam: float | Tensor, smoothing: float = 0.0) -> Tensor:
    """timm's mixup_target: label-smoothed one-hots of labels and of the reversed batch, mixed by lam. A label
    of -1 (none: a text without a fine label, `cct.step.TrainStep`'s second head) gives a row of zeros."""
    off = smoothing / num_classes
    y1 = torch.full((len(labels), num_classes), off).scatter_(1, labels.clamp(min=0).view(-1, 1), 1.0 - smoothing + off)
    y1 = y1 * (labels >= 0).unsqueeze(1)
    return y1 * lam + y1.flip(0) * (1.0 - lam)


def _cutmix_boxes(H: int, W: int, lam: np.ndarray, rng: np.random.Generator):
    """timm's rand_bbox + lambda correction: a box of sides ~sqrt(1 - lam) centred uniformly, clipped."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = (H * ratio).astype(int), (W * ratio).astype(int)
    cy, cx = rng.integers(0, H, size=lam.shape), rng.integers(0, W, size=lam.shape)
    yl, yh = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    xl, xh = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(H * W)


def mixup_cutmix(x: Tensor, labels: Tensor, generator: torch.Generator, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = "batch", label_smoothing: float = 0.1) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) with the reversed batch, as timm's Mixup.

    With probability `prob` a batch ('batch', the official setting) or each image ('elem') is mixed:
    CutMix with probability `switch_prob` when both alphas are > 0, lambda ~ Beta(alpha, alpha); CutMix
    lambda is corrected to the clipped box's area. Odd batches are allowed: the middle image mixes
    with itself.

    Returns:
        (mixed float images, soft targets (B, num_classes) whose rows sum to 1).
    """
    assert mode in ("batch", "elem"), f"unknown mix mode {mode!r}"
    assert mixup_alpha > 0 or cutmix_alpha > 0, "one of mixup_alpha, cutmix_alpha must be > 0"
    B, C, H, W = x.shape
    rng = numpy_rng(generator)
    n = 1 if mode == "batch" else B
    use_cutmix = np.full(n, cutmix_alpha > 0 and mixup_alpha <= 0)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = rng.random(n) < switch_prob
    lam = np.where(use_cutmix, rng.beta(max(cutmix_alpha, 1e-8), max(cutmix_alpha, 1e-8), n),
                   rng.beta(max(mixup_alpha, 1e-8), max(mixup_alpha, 1e-8), n))
    lam = np.where(rng.random(n) < prob, lam, 1.0)
    cut = use_cutmix & (lam < 1.0)
    (yl, yh, xl, xh), cut_lam = _cutmix_boxes(H, W, lam, rng)
    lam = np.where(cut, cut_lam, lam)
    flipped = x.flip(0)
    if mode == "batch":
        if lam[0] == 1.0:
            out = x.clone()
        elif cut[0]:
            out = x.clone()
            out[:, :, yl[0]:yh[0], xl[0]:xh[0]] = flipped[:, :, yl[0]:yh[0], xl[0]:xh[0]]
        else:
            out = x * float(lam[0]) + flipped * (1.0 - float(lam[0]))
        lam_t: float | Tensor = float(lam[0])
    else:
        lam_t = torch.from_numpy(lam).float().view(B, 1)
        blend = torch.where(torch.from_numpy(cut), 1.0, lam_t.squeeze(1)).view(B, 1, 1, 1).to(x.dtype)
        out = x * blend + flipped * (1 - blend)
        rows, cols = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
        yl_t, yh_t, xl_t, xh_t = (torch.from_numpy(v).view(B, 1, 1) for v in (yl, yh, xl, xh))
        box = (rows >= yl_t) & (rows < yh_t) & (cols >= xl_t) & (cols < xh_t) & torch.from_numpy(cut).view(B, 1, 1)
        out = torch.where(box.unsqueeze(1), flipped, out)
    return out, mixup_target(labels, num_classes, lam_t, label_smoothing).to(x.dtype)

