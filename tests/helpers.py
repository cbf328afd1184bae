"""Small generated datasets shared by the test modules (pytest puts this folder on sys.path)."""
from pathlib import Path

import numpy as np
from PIL import Image

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
