"""cct.policies: RandAugment and AutoAugment against timm's and torchvision's definitions (parsing, tables,
statistics of the drawn ops), and the training-batch pipeline `augment_batch` with its config."""
import math

import pytest
import torch

from cct import augment as A
from cct import policies as P
from cct.policies import AugmentConfig

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen(123))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.randint(0, 10, (64,), generator=gen(7))


def record_ops(monkeypatch) -> list:
    """Capture every (kernel, arg) that RandAugment/AutoAugment hand to the batched op runner."""
    calls, real = [], P.apply_ops

    def spy(x, kernel, arg, interp, fill):
        calls.append((kernel.clone(), arg.clone(), interp.clone()))
        return real(x, kernel, arg, interp, fill)
    monkeypatch.setattr(P, "apply_ops", spy)
    return calls


# ---------------------------------------------------------------------------------------------------
# RandAugment


def test_rand_augment_config_parsing():
    p = P.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (p.magnitude, p.magnitude_std, p.num_layers, p.prob, p.ops) == (9, 0.5, 2, 0.5, P.RAND_INCREASING_TRANSFORMS)
    assert P.parse_rand_augment("rand-n3-m5-mstd101").magnitude_std == math.inf
    assert P.parse_rand_augment("rand-m7").ops == P.RAND_TRANSFORMS
    for bad in ("augmix-m3", "rand-w0", "rand-n20"):
        with pytest.raises(ValueError):
            P.parse_rand_augment(bad)


def test_rand_augment_invariants(images):
    out = P.rand_augment(images, gen())
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, P.rand_augment(images, gen()))  # same seed, same batch
    assert not torch.equal(out, P.rand_augment(images, gen(1)))
    changed = (out != images).flatten(1).any(1).float().mean()
    assert 0.5 < changed < 0.95  # P(no op applied) = 1/4, plus no-op draws
    gray = P.rand_augment(images[:, :1], gen())
    assert gray.shape == (64, 1, 32, 32)


def test_rand_augment_statistics(monkeypatch):
    """rand-m9-mstd0.5-inc1 as timm: 2 distinct ops of 15, each with p=0.5, magnitude N(9, 0.5) in [0, 10]."""
    calls = record_ops(monkeypatch)
    B = 3000
    x = torch.zeros(B, 3, 4, 4, dtype=torch.uint8)
    P.rand_augment(x, gen(), "rand-m9-mstd0.5-inc1")
    assert len(calls) == 2
    (k1, a1, i1), (k2, a2, i2) = calls
    for k in (k1, k2):
        assert abs((k >= 0).float().mean() - 0.5) < 0.04  # each op applied with probability 0.5
    assert set(i1.tolist()) == {1, 2}  # timm's random interpolation: bilinear or bicubic
    kernel = lambda name: A.KERNEL_ID[name]
    both = torch.cat([k1, k2]), torch.cat([a1, a2])
    applied = both[0] >= 0
    counts = torch.bincount(both[0][applied], minlength=len(A.KERNELS)).float()
    # 15 ops on 14 kernels (SolarizeIncreasing and SolarizeAdd are two kernels; all others one each)
    share = counts / counts.sum()
    assert (share[share > 0] - 1 / 15).abs().max() < 0.02
    args = lambda name: both[1][both[0] == kernel(name)]
    rot = args("rotate")
    assert rot.abs().max() <= 30 and abs(rot.abs().mean() - 27) < 1 and abs((rot > 0).float().mean() - 0.5) < 0.1
    assert set(args("posterize").tolist()) <= {0.0, 1.0, 2.0}  # 4 - int(4 * m / 10), m in [7.5, 10]
    factors = torch.cat([args(n) for n in ("color", "contrast", "brightness", "sharpness")])
    assert factors.min() >= 0.1 and factors.max() <= 1.9 and abs((factors - 1).abs().mean() - 0.81) < 0.03
    shear = torch.cat([args("shear_x"), args("shear_y")])
    assert shear.abs().max() <= 0.3 and abs(shear.abs().mean() - 0.27) < 0.01
    translate = torch.cat([args("translate_x"), args("translate_y")])
    assert translate.abs().max() <= 0.45 * 4 + 1e-6  # 45% of the 4-pixel test image
    solarize = args("solarize")
    assert solarize.min() >= 0 and solarize.max() <= 256 * 0.3  # 256 - int(25.6 m), m > 7 (4 sigma)
    assert set(args("solarize_add").tolist()) <= set(range(82, 111))


def test_rand_augment_distinct_ops(monkeypatch):
    """timm draws the n ops of an image without replacement: with n = all 15 and p = 1 every image
    gets every op exactly once."""
    calls = record_ops(monkeypatch)
    P.rand_augment(torch.zeros(200, 3, 4, 4, dtype=torch.uint8), gen(), "rand-n15-m9-p1.0")
    kernels = torch.stack([k for k, _, _ in calls], 1)  # (B, 15)
    per_image = torch.stack([(kernels == k).sum(1) for k in range(len(A.KERNELS))], 1)
    per_op_set = torch.bincount(torch.tensor([A.KERNEL_ID[P._RAND_OPS[n][0]] for n in P.RAND_TRANSFORMS]),
                                minlength=len(A.KERNELS))
    assert (per_image == per_op_set).all()


# ---------------------------------------------------------------------------------------------------
# AutoAugment CIFAR-10


def test_auto_augment_tables():
    """Magnitudes as torchvision's AutoAugment._augmentation_space(10, (32, 32))."""
    assert P._aa_magnitude("TranslateY", 9, 32, 32) == ("translate_y", -14.0, True, 0.0)  # int(150/331*32)
    assert P._aa_magnitude("Rotate", 2, 32, 32)[1] == pytest.approx(30 * 2 / 9)
    assert P._aa_magnitude("Posterize", 7, 32, 32)[1] == 5.0  # 8 - round(7 / 2.25)
    assert P._aa_magnitude("Solarize", 2, 32, 32)[1] == pytest.approx(255 * 7 / 9)
    assert P._aa_magnitude("Contrast", 6, 32, 32) == ("contrast", pytest.approx(0.6), True, 1.0)
    assert len(P.CIFAR10_POLICY) == 25 and all(len(sub) == 2 for sub in P.CIFAR10_POLICY)


def test_auto_augment_statistics(images, monkeypatch):
    out = P.auto_augment_cifar10(images, gen())
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, P.auto_augment_cifar10(images, gen()))
    calls = record_ops(monkeypatch)
    B = 5000
    P.auto_augment_cifar10(torch.zeros(B, 3, 4, 4, dtype=torch.uint8), gen())
    (k1, a1, i1), (k2, a2, _) = calls
    assert set(i1.tolist()) == {0}  # torchvision's default: nearest
    # expected probability that stage 1 applies Invert: (0.1 [policy 0]) / 25
    expected = {name: 0.0 for name in A.KERNELS}
    for (op1, p1, _), _ in P.CIFAR10_POLICY:
        expected[P._aa_magnitude(op1, 0, 4, 4)[0]] += p1 / 25
    for name, p in expected.items():
        assert abs((k1 == A.KERNEL_ID[name]).float().mean() - p) < 0.015, name
    sharp = a1[k1 == A.KERNEL_ID["sharpness"]]  # first ops: Sharpness bin 1 (1 ± 0.1) and bin 9 (1 ± 0.9)
    assert set(torch.round(sharp * 100).tolist()) == {10.0, 90.0, 110.0, 190.0}


# ---------------------------------------------------------------------------------------------------
# the whole pipeline


OFFICIAL = dict(hflip=True, rrc_scale=(0.8, 1.0), rand_augment="rand-m9-mstd0.5-inc1", erasing=0.25, mixup_alpha=0.8,
                cutmix_alpha=1.0, label_smoothing=0.1, mean=CIFAR_MEAN, std=CIFAR_STD)


def test_augment_batch(images, labels):
    cfg = AugmentConfig(**OFFICIAL)
    out, target = P.augment_batch(images, labels, gen(), cfg, num_classes=10)
    assert out.shape == images.shape and out.dtype == torch.float32 and target.shape == (64, 10)
    assert torch.allclose(target.sum(1), torch.ones(64))
    again, target_again = P.augment_batch(images, labels, gen(), cfg, num_classes=10)
    assert torch.equal(out, again) and torch.equal(target, target_again)
    out, target = P.augment_batch(images, labels, gen(), cfg, num_classes=10, mix=False, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(target, labels)
    plain, target = P.augment_batch(images, labels, gen(), AugmentConfig(), num_classes=10)
    assert torch.equal(plain, images.float() / 255) and torch.equal(target, labels)
    cifar, _ = P.augment_batch(images, labels, gen(), AugmentConfig(translate=4, hflip=True, auto_augment=True),
                               num_classes=10)
    assert cifar.min() >= 0 and cifar.max() <= 1


def test_config_validation():
    for bad in (dict(rand_augment="rand-x3"), dict(rand_augment="rand-m9", auto_augment=True), dict(mix_mode="pair"),
                dict(rrc_interpolation="lanczos"), dict(mean=CIFAR_MEAN)):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
    assert AugmentConfig(mixup_alpha=0.8).mixing and not AugmentConfig().mixing
