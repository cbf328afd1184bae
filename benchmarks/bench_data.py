"""How long data costs: cold and warm load of the shared CIFAR-10 copy, and augmentation per batch.

    python benchmarks/bench_data.py [--source PATH] [--batch 128] [--runs 50]

Targets (the data issue): cold load <= 15 s, warm <= 1 s, and the heaviest augmentation stack
(RandAugment + MixUp/CutMix + erasing) <= 10% of one training step of the small model at batch 128.
The cold load uses a fresh temporary cache directory, so it decodes every image.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cct import augment as A  # noqa: E402
from cct import policies as P  # noqa: E402
from cct.data import CIFAR_MEAN, CIFAR_STD, load  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench_load(source: Path) -> torch.Tensor | None:
    if not source.exists():
        print(f"load: {source} not found, skipped")
        return None
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ds = load(source, cache_dir=Path(cache), progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        load(source, cache_dir=Path(cache), progress=False)
        warm = time.perf_counter() - t0
    print(f"load {source.name}: train {tuple(ds.train.images.shape)}, test {tuple(ds.test.images.shape)}")
    print(f"  cold {cold:6.2f} s   (target <= 15 s)")
    print(f"  warm {warm:6.2f} s   (target <= 1 s)")
    return ds.train.images


def bench_augment(images: torch.Tensor, batch: int, runs: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = images[:batch].contiguous()  # a source smaller than --batch gives a smaller batch
    y = torch.randint(0, 10, (len(x),), generator=g)
    xf = A.normalize(x, CIFAR_MEAN, CIFAR_STD)
    official = P.AugmentConfig(rrc_scale=(0.8, 1.0), hflip=True, rand_augment="rand-m9-mstd0.5-inc1", erasing=0.25,
                               mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, mean=CIFAR_MEAN, std=CIFAR_STD)
    cases = {
        "hflip": lambda: A.hflip(x, g),
        "random_translate(4)": lambda: A.random_translate(x, g, 4),
        "random_resized_crop(0.8-1)": lambda: A.random_resized_crop(x, g, 32, (0.8, 1.0)),
        "rand_augment(m9-mstd0.5-inc1)": lambda: P.rand_augment(x, g),
        "auto_augment_cifar10": lambda: P.auto_augment_cifar10(x, g),
        "normalize": lambda: A.normalize(x, CIFAR_MEAN, CIFAR_STD),
        "random_erasing(0.25)": lambda: A.random_erasing(xf, g, 0.25),
        "mixup_cutmix(batch)": lambda: A.mixup_cutmix(xf, y, g, num_classes=10),
        "mixup_cutmix(elem)": lambda: A.mixup_cutmix(xf, y, g, num_classes=10, mode="elem"),
        "airbench stack (translate+flip)": lambda: P.augment_batch(x, y, g, P.AugmentConfig(translate=4, hflip=True),
                                                                   num_classes=10),
        "FULL official stack": lambda: P.augment_batch(x, y, g, official, num_classes=10),
    }
    print(f"augmentation, batch {batch} of {tuple(x.shape[1:])} uint8, median of {runs} runs, "
          f"{torch.get_num_threads()} threads:")
    full = 0.0
    for name, fn in cases.items():
        ms = median_ms(fn, runs)
        full = ms if name.startswith("FULL") else full
        print(f"  {name:34s} {ms:7.2f} ms")
    return full


def bench_step(batch: int, runs: int) -> float | None:
    try:
        import cct
        model = cct.create_model("cct_2_3x2_32_keras")
    except Exception as e:  # the model is optional here
        print(f"model step: skipped ({type(e).__name__}: {e})")
        return None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ms = median_ms(step, max(5, runs // 5))
    print(f"model step cct_2_3x2_32_keras, batch {batch} (forward+backward+AdamW): {ms:.1f} ms")
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SHARED)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-load", action="store_true", help="skip the load timing (augment random images)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    images = None if args.no_load else bench_load(args.source)
    if images is None:
        images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    full = bench_augment(images, args.batch, args.runs)
    step = bench_step(args.batch, args.runs)
    if step:
        print(f"full augmentation stack / training step = {full / step:.1%}  (target <= 10%)")


if __name__ == "__main__":
    main()
