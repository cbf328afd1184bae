"""Small generated datasets shared by the test modules (pytest puts this folder on sys.path)."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cct import train as train_mod

CLASSES = ["ant", "bee", "cat"]


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


def poison_loss(monkeypatch, at_call: int) -> None:
    """Make the `at_call`-th training loss (counted over calls with gradients) NaN."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets, **kwargs):
        loss = real(logits, targets, **kwargs)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] == at_call:
                return loss * float("nan")
        return loss
    monkeypatch.setattr(train_mod.F, "cross_entropy", poisoned)
