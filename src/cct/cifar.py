"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009): the official python releases, found, fetched and read safely.

`find_or_download` looks a release up in the cache directory (``$CCT_DATA``, else ``~/.cache/cct``)
as its archive or extracted folder, and downloads the archive there when missing (md5-checked, when
online). `read_cifar` reads the batches — pickles, unpickled with only the globals they contain, so
a crafted file given as a source cannot run code — into uint8 (N, 3, 32, 32) arrays, in the official
class order, at the requested channels and size.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sources import DataError, Files

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarRelease:
    title: str
    archive: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


RELEASES = {
    "cifar10": CifarRelease("CIFAR-10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                            "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                            "batches.meta", "labels", "label_names"),
    "cifar100": CifarRelease("CIFAR-100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                             "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """The official batches are pickles; allow only what they contain (numpy arrays, lists, dicts)
    so that a crafted file given as a source cannot run code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _unpickle(data: bytes, name: str) -> dict:
    try:
        d = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle raises almost any type
        raise DataError(f"{name}: not a CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{name}: not a CIFAR batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def cifar_kind(names: list[str]) -> str | None:
    """"cifar10" or "cifar100" when the file names are those of an official release, else None."""
    base = {posixpath.basename(n) for n in names}
    if {"batches.meta", "test_batch", *RELEASES["cifar10"].train_files} & base:  # one is enough: say what is missing
        return "cifar10"
    parents = {posixpath.dirname(n) for n in names if posixpath.basename(n) in ("train", "test", "meta")}
    if {"train", "test", "meta"} <= base and len(parents) == 1:
        return "cifar100"
    return None


def _decode_cifar(files: Files, kind: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    release = RELEASES[kind]
    by_base = {posixpath.basename(n): n for n in files.names}

    def batch(fname: str) -> tuple[np.ndarray, np.ndarray]:
        if fname not in by_base:
            raise DataError(f"{files.path}: {fname} missing, not an official {release.title} copy")
        d = _unpickle(files.read(by_base[fname]), f"{files.path}/{fname}")
        try:
            images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
            labels = np.asarray(d[release.label_key], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{files.path}/{fname}: not a {release.title} batch ({e})") from None
        if labels.shape != (len(images),):
            raise DataError(f"{files.path}/{fname}: not a {release.title} batch ({len(images)} images, "
                            f"{labels.size} labels)")
        return images, labels

    train = [batch(f) for f in release.train_files]
    splits = {"train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
              "test": batch(release.test_file)}
    meta = _unpickle(files.read(by_base[release.meta_file]), release.meta_file) if release.meta_file in by_base else {}
    if release.names_key not in meta:
        raise DataError(f"{files.path}: {release.meta_file} has no {release.names_key}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[release.names_key]]
    for split, (_, labels) in splits.items():
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            raise DataError(f"{files.path}: {split} labels outside 0..{len(classes) - 1}, not an official "
                            f"{release.title} copy")
    return splits, classes


def _resize_chans(images: np.ndarray, size: tuple[int, int] | None, in_chans: int | None) -> np.ndarray:
    """CIFAR's (N, 3, 32, 32) to the requested channels (ITU-R 601-2 luma, as Pillow) and size (bicubic)."""
    x = torch.from_numpy(images)
    if in_chans == 1:
        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
        x = ((x.int() * w).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)
    if size is not None and tuple(x.shape[2:]) != size:
        y = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous().numpy()


def read_cifar(files: Files, kind: str, *, size: tuple[int, int] | None,
               in_chans: int | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """({split: (uint8 images (N, C, H, W), int64 labels)}, class names) of an official release.

    Args:
        files: the release's files (`cifar_kind(files.names) == kind`).
        kind: "cifar10" or "cifar100".
        size: (H, W) to resize to (bicubic, antialiased), None for 32x32.
        in_chans: 1 for luma, 3 or None for RGB.
    """
    splits, classes = _decode_cifar(files, kind)
    return {s: (_resize_chans(x, size, in_chans), y) for s, (x, y) in splits.items()}, classes


def find_or_download(kind: str, cache_dir: Path, *, download: bool, progress: bool) -> Path:
    """The archive or folder of release `kind` in `cache_dir`, downloaded there when missing and allowed."""
    release = RELEASES[kind]
    for candidate in (cache_dir / release.archive, cache_dir / release.folder):
        if candidate.exists():
            return candidate
    where = f"put {release.archive} (md5 {release.md5}, from {_CIFAR_URL}) in {cache_dir} or pass its path"
    if not download:
        raise DataError(f"{release.title} not found in {cache_dir}: {where}")
    _download(_CIFAR_URL + release.archive, cache_dir / release.archive, release.md5, progress, where)
    return cache_dir / release.archive


def _download(url: str, dest: Path, md5: str, progress: bool, where: str) -> None:
    from tqdm import tqdm
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            h = hashlib.md5()
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr,
                      disable=None if progress else True) as bar:  # None: off a terminal too
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
        if h.hexdigest() != md5:
            raise DataError(f"download of {url} is corrupt (md5 {h.hexdigest()}, expected {md5}); {where}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}); {where}") from None
    finally:
        tmp.unlink(missing_ok=True)
