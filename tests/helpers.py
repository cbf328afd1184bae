"""Small generated datasets shared by the test modules (pytest puts this folder on sys.path)."""
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cct import cli
from cct.data import Dataset, ImageSet
from cct.recipes import TrainConfig, make_config

CLASSES = ["ant", "bee", "cat"]
MODEL = "cct_2_3x2_32"  # at the data's 16×16: 16 tokens, a fraction of a second per epoch


def make_tree(root: Path, classes=CLASSES, train_per_class=16, test_per_class=6, size=16) -> Path:
    """root/{train,test}/<class>/*.png: each class a different mean colour, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (size, size, 3)) + 70 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def memory_dataset(n_train=90, n_test=30, size=16) -> Dataset:
    """An in-memory dataset of 3 learnable classes (for `cct.train.train(..., dataset=...)`)."""
    g = torch.Generator().manual_seed(0)

    def images(n):
        y = torch.arange(n) % 3
        x = (torch.rand(n, 3, size, size, generator=g) * 90 + y.view(-1, 1, 1, 1) * 70).to(torch.uint8)
        return ImageSet(x, y.long())
    return Dataset(images(n_train), images(n_test), None, list(CLASSES), "memory", 0)


def seeded_config(out, **kw) -> TrainConfig:
    """A 2-epoch run on `memory_dataset()` (3 batches an epoch) that draws from every random stream: hflip +
    translate + mixup (augmentation generator), dropout and drop path (torch RNG), shuffling."""
    return make_config(MODEL, "memory", str(out), "keras", epochs=2, batch_size=32, translate=2, mixup_alpha=0.4,
                       seed=3, **kw)


def poison_loss(monkeypatch, at_call: int) -> None:
    """Make the `at_call`-th training loss (counted over calls with gradients) NaN.

    Patches torch.nn.functional itself, which `cct.step` calls as `F.cross_entropy`."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets, **kwargs):
        loss = real(logits, targets, **kwargs)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] == at_call:
                return loss * float("nan")
        return loss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`cct ARGV` in this process: (exit code, stdout, stderr); argparse's own errors give their code too."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
