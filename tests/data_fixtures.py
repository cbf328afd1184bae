"""Tiny generated data sources shared by the data test modules: image-folder trees, their archives,
copies of the official CIFAR releases (pytest puts this folder on sys.path)."""
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from cct.cifar import RELEASES


def make_tree(root: Path, counts: dict, size=(8, 8), mode="RGB", ext="png", seed=0) -> Path:
    """root/<split>/<class>/<i>.<ext> random images; counts = {split: {class: n}}."""
    rs = np.random.RandomState(seed)
    for split_name, classes in counts.items():
        for cls, n in classes.items():
            d = root / split_name / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], len(mode))
                Image.fromarray(rs.randint(0, 256, shape).astype(np.uint8), mode).save(d / f"{i:03d}.{ext}")
    return root


def pack(src: Path, dest: Path, top: str | None) -> Path:
    """A .tar, .tar.gz or .zip of the files under src, inside folder `top` or at the archive's root."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    arc = lambda p: (f"{top}/" if top else "") + p.relative_to(src).as_posix()
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for p in files:
                zf.write(p, arc(p))
    else:
        with tarfile.open(dest, "w:gz" if dest.name.endswith(".gz") else "w") as tf:
            for p in files:
                tf.add(p, arc(p))
    return dest


def fake_cifar(root: Path, kind: str, per_batch: int = 4, archive: bool = True, seed=0) -> Path:
    """A tiny copy of an official CIFAR python release: same files, keys and layout (bytes keys, as the
    Python 2 originals load with encoding='bytes')."""
    rs = np.random.RandomState(seed)
    release = RELEASES[kind]
    folder = root / release.folder
    folder.mkdir(parents=True)
    n_classes = 10 if kind == "cifar10" else 100

    def batch(name, n):
        labels = [int(v) for v in rs.randint(0, n_classes, n)]
        d = {b"data": rs.randint(0, 256, (n, 3072)).astype(np.uint8), release.label_key.encode(): labels,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if kind == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))

    for name in release.train_files:
        batch(name, per_batch)
    batch(release.test_file, per_batch)
    names = [f"class{i:02d}".encode() for i in range(n_classes)]
    (folder / release.meta_file).write_bytes(pickle.dumps({release.names_key.encode(): names}, protocol=2))
    if not archive:
        return folder
    dest = root / release.archive
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, release.folder)
    return dest
