"""cct.augment: invariants of every op, agreement with Pillow (the reference timm's ops call), and
statistics of the random draws against timm's and torchvision's definitions."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from cct import augment as A

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen(123))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.randint(0, 10, (64,), generator=gen(7))


# ---------------------------------------------------------------------------------------------------
# Pillow agreement of the op kernels


def _pil_batch(x: torch.Tensor, fn) -> torch.Tensor:
    arrays = [np.asarray(fn(Image.fromarray(a))) for a in x.permute(0, 2, 3, 1).numpy()]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


@pytest.fixture
def small() -> torch.Tensor:
    x = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=gen(5))
    x[2] = x[2] // 4 + 60  # low contrast, for autocontrast/equalize
    return x


@pytest.mark.parametrize("factor", [0.1, 0.6, 1.4, 1.9])
@pytest.mark.parametrize("name,enhance", [("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
                                          ("brightness", ImageEnhance.Brightness),
                                          ("sharpness", ImageEnhance.Sharpness)])
def test_enhance_ops_match_pillow(small, name, enhance, factor):
    ours = A._COLOR_OPS[name](small.float(), torch.full((4,), factor))
    ref = _pil_batch(small, lambda im: enhance(im).enhance(factor))
    assert (ours - ref).abs().max() <= 1 and (ours != ref).float().mean() < 0.01


def test_imageops_match_pillow(small):
    x = small.float()
    none = torch.zeros(4)
    assert (A._autocontrast(x, none) - _pil_batch(small, ImageOps.autocontrast)).abs().max() <= 1
    assert torch.equal(A._equalize(x, none), _pil_batch(small, ImageOps.equalize))
    assert torch.equal(A._invert(x, none), _pil_batch(small, ImageOps.invert))
    for bits in (1, 2, 4, 8):
        assert torch.equal(A._posterize(x, torch.full((4,), float(bits))),
                           _pil_batch(small, lambda im: ImageOps.posterize(im, bits)))
    assert A._posterize(x, torch.zeros(4)).eq(0).all()  # 0 bits: black, as TF and older Pillow
    for threshold in (0, 100, 256):
        assert torch.equal(A._solarize(x, torch.full((4,), float(threshold))),
                           _pil_batch(small, lambda im: ImageOps.solarize(im, threshold)))
    added = A._solarize_add(x, torch.full((4,), 50.0))
    assert torch.equal(added, torch.where(x < 128, (x + 50).clamp(max=255), x))


FILL = (125, 123, 114)


@pytest.mark.parametrize("interp,resample", [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR)])
def test_geometric_ops_match_pillow(small, interp, resample):
    H = W = small.shape[-1]
    code = torch.full((4,), A._INTERP[interp])
    warp = lambda m: A._warp(small.float(), m, code, torch.tensor(FILL, dtype=torch.float32)).floor()
    cases = [(A._rotate(torch.full((4,), 23.0), H, W), lambda im: im.rotate(23.0, resample=resample, fillcolor=FILL)),
             (A._shear_x(torch.full((4,), 0.27), H, W),
              lambda im: im.transform(im.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0), resample=resample, fillcolor=FILL)),
             (A._shear_y(torch.full((4,), -0.2), H, W),
              lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.2, 1, 0), resample=resample, fillcolor=FILL)),
             (A._translate_x(torch.full((4,), 3.4), H, W),
              lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 3.4, 0, 1, 0), resample=resample, fillcolor=FILL)),
             (A._translate_y(torch.full((4,), -5.0), H, W),
              lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -5.0), resample=resample, fillcolor=FILL))]
    for matrix, pil_op in cases:
        diff = (warp(matrix) - _pil_batch(small, pil_op)).abs()
        if interp == "nearest":
            assert diff.max() == 0
        else:  # float32 vs Pillow's double arithmetic: an exact .0 may truncate one lower
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.15


# ---------------------------------------------------------------------------------------------------
# flip, translate, resized crop


def test_hflip(images):
    assert torch.equal(A.hflip(images, gen(), p=1.0), images.flip(-1))
    assert torch.equal(A.hflip(A.hflip(images, gen(), p=1.0), gen(), p=1.0), images)  # flip∘flip = identity
    assert torch.equal(A.hflip(images, gen(), p=0.0), images)
    out = A.hflip(images, gen(), p=0.5)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert ((out == images).flatten(1).all(1) | flipped).all() and 16 < flipped.sum() < 48
    assert torch.equal(A.hflip(images, gen(1)), A.hflip(images, gen(1)))


def test_alternating_flips_mirror_each_image_every_other_epoch():
    n = 1000
    first = A.alternating_flips(n, seed=5, epoch=0)
    assert first.dtype == torch.bool and first.shape == (n,) and 400 < first.sum() < 600  # a random half
    assert torch.equal(A.alternating_flips(n, seed=5, epoch=1), ~first)  # each image the other way
    assert torch.equal(A.alternating_flips(n, seed=5, epoch=2), first)
    assert torch.equal(A.alternating_flips(n, seed=5, epoch=7), ~first)
    assert not torch.equal(A.alternating_flips(n, seed=6, epoch=0), first)  # the seed picks the half


def test_flip_where(images):
    flip = torch.arange(len(images)) % 3 == 0
    out = A.flip_where(images, flip)
    assert torch.equal(out[flip], images[flip].flip(-1)) and torch.equal(out[~flip], images[~flip])


def test_random_translate(images):
    out = A.random_translate(images, gen(), padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    shifts = []
    for i in range(len(images)):  # every output is one zero-padded crop of its input
        match = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert match
        shifts.append(match[0])
    assert len({s[0] for s in shifts}) > 4 and len({s[1] for s in shifts}) > 4
    assert torch.equal(A.random_translate(images.float(), gen(), 4), out.float())  # any dtype, same draws


def test_random_resized_crop(images):
    for interp in ("nearest", "bilinear", "bicubic", "random"):  # the whole image at scale 1, ratio 1: identity
        out = A.random_resized_crop(images, gen(), 32, scale=(1, 1), ratio=(1, 1), interpolation=interp)
        assert torch.equal(out, images)
    out = A.random_resized_crop(images, gen(), (24, 20), scale=(0.08, 1.0))
    assert out.shape == (64, 3, 24, 20) and out.dtype == torch.uint8
    outf = A.random_resized_crop(images.float(), gen(), 32, scale=(0.5, 0.6))
    assert outf.dtype == torch.float32 and outf.min() >= -80 and outf.max() <= 335  # bicubic overshoots on noise
    # an impossible area (larger than the image) falls back to the centre crop at a clamped ratio
    wide = torch.randint(0, 256, (2, 3, 8, 32), dtype=torch.uint8)
    out = A.random_resized_crop(wide, gen(), 8, scale=(2.0, 2.0), ratio=(1, 1), interpolation="nearest")
    assert out.shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------
# random erasing


def test_random_erasing(images):
    x = A.normalize(images, CIFAR_MEAN, CIFAR_STD)
    assert torch.equal(A.random_erasing(x, gen(), p=0.0), x)
    out = A.random_erasing(x, gen(), p=1.0, mode="const")
    assert out.shape == x.shape and out.dtype == x.dtype
    erased = out != x
    for i in range(len(x)):  # one rectangle of zeros, area within timm's [0.02, 1/3] after rounding
        ys, xs = erased[i].any(0).nonzero(as_tuple=True)
        assert len(ys) > 0
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert (out[i, :, ys.min():ys.max() + 1, xs.min():xs.max() + 1] == 0).all()
        assert 0.01 <= h * w / 1024 <= 0.4 and 0.25 <= h / w <= 4
    hit = (A.random_erasing(x, gen(), p=0.25) != x).flatten(1).any(1).float().mean()
    assert 0.1 < hit < 0.4
    noise = A.random_erasing(x, gen(), p=1.0, mode="pixel")[(out != x)]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # N(0, 1) per pixel
    assert torch.equal(A.random_erasing(x, gen(3), count=3), A.random_erasing(x, gen(3), count=3))


# ---------------------------------------------------------------------------------------------------
# mixup / cutmix


def test_mixup_target_smoothing():
    t = A.mixup_target(torch.tensor([0, 1, 2, 3]), 10, 1.0, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(4)) and t[0, 0] == pytest.approx(0.91) and t[0, 1] == pytest.approx(0.01)


def _lambdas(target: torch.Tensor, labels: torch.Tensor, smoothing: float, K: int = 10) -> torch.Tensor:
    """Each row's lambda, read back from the soft target (rows whose mirror has another label)."""
    return (target[torch.arange(len(labels)), labels] - smoothing / K) / (1 - smoothing)


def test_mixup_batch_mode(labels):
    x = torch.arange(64.0).view(64, 1, 1, 1).expand(64, 1, 8, 8).contiguous()  # image i holds value i
    differs = labels != labels.flip(0)
    kinds = set()
    for seed in range(20):
        out, target = A.mixup_cutmix(x, labels, gen(seed), num_classes=10, label_smoothing=0.1)
        assert out.shape == x.shape and target.shape == (64, 10) and torch.allclose(target.sum(1), torch.ones(64))
        lam = _lambdas(target, labels, 0.1)[differs]
        assert torch.allclose(lam, lam[0], atol=1e-5)  # one lambda for the batch
        lam = float(lam[0])
        if ((out == x) | (out == x.flip(0))).all():  # cutmix: lambda is the share of pixels kept
            kinds.add("cutmix")
            assert (out == x).float().mean(dim=(1, 2, 3))[differs].allclose(torch.tensor(lam), atol=1e-5)
        else:
            kinds.add("mixup")
            assert torch.allclose(out, x * lam + x.flip(0) * (1 - lam), atol=1e-4)
    assert kinds == {"cutmix", "mixup"}


def test_mixup_lambda_distribution(labels):
    x = torch.arange(64.0).view(64, 1, 1, 1).expand(64, 1, 8, 8).contiguous()
    i = int((labels != labels.flip(0)).nonzero()[0])
    lams = np.array([float(_lambdas(A.mixup_cutmix(x, labels, gen(s), num_classes=10, mixup_alpha=0.8, cutmix_alpha=0.0,
                                                   label_smoothing=0.0)[1], labels, 0.0)[i]) for s in range(600)])
    a = 0.8  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(lams.mean() - 0.5) < 0.04 and abs(lams.var() - 1 / (4 * (2 * a + 1))) < 0.015
    cut = []
    for seed in range(300):
        out, _ = A.mixup_cutmix(x, labels, gen(seed), num_classes=10, switch_prob=0.5)
        cut.append(bool(((out == x) | (out == x.flip(0))).all()))
    assert 0.4 < np.mean(cut) < 0.62  # switch_prob 0.5 (plus rare mixup with lambda exactly 1)
    for seed in range(5):  # prob 0: never mixed, targets still smoothed one-hots
        out, target = A.mixup_cutmix(x, labels, gen(seed), num_classes=10, prob=0.0, label_smoothing=0.1)
        assert torch.equal(out, x) and torch.allclose(target.max(1).values, torch.tensor(0.91))


def test_mixup_elem_mode(labels):
    x = torch.arange(64.0).view(64, 1, 1, 1).expand(64, 1, 8, 8).contiguous()
    out, target = A.mixup_cutmix(x, labels, gen(), num_classes=10, mode="elem", label_smoothing=0.0)
    assert torch.allclose(target.sum(1), torch.ones(64))
    lam = _lambdas(target, labels, 0.0)
    differs = labels != labels.flip(0)
    assert len(set(lam[differs].round(decimals=3).tolist())) > 10  # one lambda per sample
    for i in torch.nonzero(differs).flatten().tolist():
        kept = (out[i] == x[i]).float().mean()
        if ((out[i] == x[i]) | (out[i] == x[63 - i])).all():  # cutmix (or untouched): lambda = kept share
            assert kept == pytest.approx(float(lam[i]), abs=1e-4)
        else:  # mixup: a uniform blend with the mirror sample
            assert torch.allclose(out[i], x[i] * lam[i] + x[63 - i] * (1 - lam[i]), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# normalisation


def test_normalize(images):
    x = A.normalize(images, CIFAR_MEAN, CIFAR_STD)
    ref = (images.float() / 255 - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    with pytest.raises(ValueError):
        A.normalize(images[:, :1], CIFAR_MEAN, CIFAR_STD)


