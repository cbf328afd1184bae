"""Image datasets held in memory as uint8 tensors: CIFAR, image-folder trees and their archives.

Following airbench (Jordan, 2024), each split is decoded once into one contiguous (N, C, H, W) uint8
tensor, cached on disk, and batched by slicing a `randperm` — no worker processes while training.

Sources accepted by `load` (and `--data SOURCE` on the command line):
- ``"cifar10"``, ``"cifar100"``: the official python archives of Krizhevsky (2009), looked up in the
  cache directory (``$CCT_DATA``, else ``~/.cache/cct``) and downloaded there when missing;
- a path to one of those archives or to its extracted folder;
- an image-folder tree ``root/train/<class>/*``, ``root/test/<class>/*``, optionally ``root/val/<class>/*``
  (torchvision's ImageFolder layout, one per split), in any format Pillow reads;
- a ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` of such a tree, with or without one top-level folder.

Class order is the official one for CIFAR and the sorted folder names for trees.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import posixpath
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CCTError

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_CACHE_VERSION = 2  # bump whenever decoding changes, so stale caches are never read
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_SPLITS = ("train", "test", "val")
# Pillow modes that hold no colour: with in_chans=None a dataset of only these loads as 1 channel
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_POOL_MIN_IMAGES = 4000  # below this, starting worker processes costs more than it saves


class DataError(CCTError, ValueError):
    """A data source that cannot be found, read or trusted; the message is one line naming it."""


@dataclass(frozen=True)
class _CifarRelease:
    title: str
    archive: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarRelease("CIFAR-10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                             "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                             "batches.meta", "labels", "label_names"),
    "cifar100": _CifarRelease("CIFAR-100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                              "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}


@dataclass
class ImageSet:
    """One split in memory."""
    images: torch.Tensor  # (N, C, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, "images must be (N, C, H, W) uint8"
        assert self.labels.dtype == torch.int64 and self.labels.shape == (len(self.images),)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices].contiguous(), self.labels[indices].contiguous())


@dataclass
class Dataset:
    train: ImageSet
    test: ImageSet | None
    val: ImageSet | None  # from root/val when present, else None (see `split`)
    classes: list[str]
    source: str  # human-readable description of what was loaded
    skipped: int  # bad images skipped (skip_bad_images=True)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])


def default_cache_dir() -> Path:
    return Path(os.environ.get("CCT_DATA") or Path.home() / ".cache" / "cct").expanduser()


# ---------------------------------------------------------------------------------------------------
# Files of a source: a folder, a tar or a zip, seen as relative posix names and their bytes


class _Files:
    """The regular files of a folder or an archive. Archives are read into memory, never written to
    disk, after every member passed the checks a safe extraction makes (no absolute or `..` paths,
    no links or devices) — one bad member refuses the whole archive."""

    def __init__(self, path: Path):
        self.path = path
        self._blobs: dict[str, bytes] | None = None
        if path.is_dir():
            self.kind = "folder"
            self.names = sorted(str(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file())
        elif tarfile.is_tarfile(path):
            self.kind = "tar"
            self._blobs = _read_tar(path)
            self.names = sorted(self._blobs)
        elif zipfile.is_zipfile(path):
            self.kind = "zip"
            self._blobs = _read_zip(path)
            self.names = sorted(self._blobs)
        else:
            raise DataError(f"{path}: not a folder, .tar, .tar.gz or .zip")

    def read(self, name: str) -> bytes:
        return self._blobs[name] if self._blobs is not None else (self.path / name).read_bytes()

    def handle(self, name: str) -> bytes | str:
        """What a decoding worker needs: the bytes, or for a folder the path (workers read it)."""
        return self._blobs[name] if self._blobs is not None else str(self.path / name)


def _unsafe_name(name: str) -> bool:
    name = name.replace("\\", "/")
    parts = posixpath.normpath(name).split("/")
    return name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts


def _read_tar(path: Path) -> dict[str, bytes]:
    try:
        blobs = {}
        with tarfile.open(path) as tf:
            for m in tf:  # one streaming pass; nothing is written, so refusing midway leaves no trace
                if _unsafe_name(m.name):
                    raise DataError(f"{path}: refused, member {m.name!r} would land outside the extraction folder")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{path}: refused, member {m.name!r} is a link or special file")
                if m.isfile():
                    blobs[posixpath.normpath(m.name)] = tf.extractfile(m).read()
            tf.fileobj.seek(tf.offset)  # tarfile ends quietly at a cut header: only zero blocks may follow
            if tf.fileobj.read(1 << 16).strip(b"\0"):
                raise DataError(f"{path}: cannot read archive (truncated or corrupt after {len(blobs)} files)")
        return blobs
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read archive ({e})") from None


def _read_zip(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                if _unsafe_name(info.filename):
                    raise DataError(f"{path}: refused, member {info.filename!r} would land outside the "
                                    "extraction folder")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"{path}: refused, member {info.filename!r} is a link")
            return {posixpath.normpath(i.filename): zf.read(i) for i in infos if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: cannot read archive ({e})") from None


def _fingerprint(path: Path) -> str:
    """The content key of a source: the bytes of a file, or names, sizes and mtimes of a folder's files."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# CIFAR: the official python pickles


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


def _cifar_kind(names: list[str]) -> str | None:
    base = {posixpath.basename(n) for n in names}
    if {"data_batch_1", "batches.meta", "test_batch"} <= base:
        return "cifar10"
    parents = {posixpath.dirname(n) for n in names if posixpath.basename(n) in ("train", "test", "meta")}
    if {"train", "test", "meta"} <= base and len(parents) == 1:
        return "cifar100"
    return None


def _decode_cifar(files: _Files, kind: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    release = _CIFAR[kind]
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


def _find_or_download_cifar(kind: str, cache_dir: Path, download: bool, progress: bool) -> Path:
    release = _CIFAR[kind]
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
                      disable=not progress) as bar:
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


# ---------------------------------------------------------------------------------------------------
# Image-folder trees


def _tree_entries(files: _Files) -> dict[str, list[tuple[str, str]]]:
    """{split: [(class, name), ...]} of `<prefix>/<split>/<class>/...` files; the prefix is the one
    closest to the root, so an archive may or may not wrap the tree in a top-level folder."""
    names = [n for n in files.names if not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/"))]
    prefixes = {"/".join(parts[:i]) for parts in (n.split("/") for n in names)
                for i in range(len(parts) - 2) if parts[i] == "train"}
    if not prefixes:
        raise DataError(f"{files.path}: no train/<class>/<image> files (expected root/train/<class>/*, "
                        f"root/test/<class>/*, optional root/val/<class>/*)")
    prefix = min(prefixes, key=lambda p: (p.count("/") + bool(p), p))
    entries: dict[str, list[tuple[str, str]]] = {}
    for n in names:
        rel = n[len(prefix) + 1:] if prefix else n
        if prefix and not n.startswith(prefix + "/"):
            continue
        parts = rel.split("/")
        if len(parts) >= 3 and parts[0] in _SPLITS:
            entries.setdefault(parts[0], []).append((parts[1], n))
    return entries


@contextlib.contextmanager
def refusing_decompression_bombs():
    """Pillow's DecompressionBombWarning (more than Image.MAX_IMAGE_PIXELS) raised as an error, as it already
    is past twice the limit: a huge image is refused, never decoded after a warning nobody reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decode_image(data: bytes | str, size: tuple[int, int] | None, mode: str | None) -> np.ndarray | str:
    """One image as (H, W) or (H, W, 3) uint8, or the error message. Runs in worker processes."""
    try:
        with refusing_decompression_bombs(), Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if size is not None and im.format == "JPEG":
                im.draft(mode or im.mode, (size[1], size[0]))  # let libjpeg shrink large photos while decoding
            if im.mode == "P" or im.mode == "PA":
                im = im.convert("RGBA")
            target = mode or ("L" if im.mode in _GRAY_MODES else "RGB")
            im = im.convert(target)  # RGBA → RGB drops alpha, CMYK/YCbCr convert, RGB → L is ITU-R 601-2
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:  # Pillow raises many types for unreadable files
        return f"{type(e).__name__}: {e}"


def _decode_chunk(items: list, size: tuple[int, int] | None, mode: str | None) -> list:
    return [_decode_image(x, size, mode) for x in items]


def _decode_all(items: list, size, mode, progress: bool) -> list:
    from tqdm import tqdm
    chunk = 500
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    work = functools.partial(_decode_chunk, size=size, mode=mode)
    workers = min(2, os.cpu_count() or 1)
    # fork (not spawn) so workers start in milliseconds without importing torch again; they only run Pillow
    use_pool = workers > 1 and len(items) >= _POOL_MIN_IMAGES and "fork" in multiprocessing.get_all_start_methods()
    out: list = []
    with tqdm(total=len(items), desc="decoding images", unit="img", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        if use_pool:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for result in pool.imap(work, chunks):
                    out.extend(result)
                    bar.update(len(result))
        else:
            for c in chunks:
                out.extend(work(c))
                bar.update(len(c))
    return out


def _decode_tree(files: _Files, size, in_chans, skip_bad: bool, progress: bool):
    entries = _tree_entries(files)
    classes = sorted({c for c, _ in entries.get("train", [])})
    index = {c: i for i, c in enumerate(classes)}
    for split, items in entries.items():
        unknown = sorted({c for c, _ in items} - set(index))
        if unknown:
            raise DataError(f"{files.path}: {split}/{unknown[0]} is not a class of train/ ({len(classes)} classes)")
    order = [(s, index[c], n) for s in _SPLITS for c, n in sorted(entries.get(s, []))]
    mode = {None: None, 1: "L", 3: "RGB"}[in_chans]
    arrays = _decode_all([files.handle(n) for _, _, n in order], size, mode, progress)

    good, skipped = [], []
    for (s, label, name), a in zip(order, arrays):
        if isinstance(a, str):
            if not skip_bad:
                raise DataError(f"cannot read image {files.path}/{name}: {a} (--skip-bad-images to skip it)")
            skipped.append(name)
        else:
            good.append((s, label, a))
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, first: %s", len(skipped), files.path, skipped[0])
    if not any(s == "train" for s, _, _ in good):
        raise DataError(f"{files.path}: no readable image in train/")

    if size is None:  # native size: all must share one; resize the others to the most common
        shapes = Counter(a.shape[:2] for _, _, a in good)
        size = shapes.most_common(1)[0][0]
        if len(shapes) > 1:
            log.warning("%s: images of %d sizes; resizing all to the most common, %dx%d (pass img_size to choose)",
                        files.path, len(shapes), size[0], size[1])
            good = [(s, l, a if a.shape[:2] == size else np.asarray(
                Image.fromarray(a).resize((size[1], size[0]), Image.BICUBIC))) for s, l, a in good]
    if in_chans is None:  # 3 channels unless every image is grayscale
        if any(a.ndim == 3 for _, _, a in good):
            good = [(s, l, a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2)) for s, l, a in good]
    splits = {}
    for split in _SPLITS:
        part = [(l, a) for s, l, a in good if s == split]
        if part:
            images = np.stack([a if a.ndim == 3 else a[:, :, None] for _, a in part])  # (N, H, W, C)
            splits[split] = (np.ascontiguousarray(images.transpose(0, 3, 1, 2)), np.array([l for l, _ in part]))
    return splits, classes, len(skipped)


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


# ---------------------------------------------------------------------------------------------------
# The decoded-dataset cache: one uncompressed .npz per (source content, size, channels)


def _cache_path(cache_dir: Path, path: Path, key_parts: dict) -> Path:
    """`<name>-<key>.npz`; the name only helps people, so a moved source finds its cache by the key."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    existing = next((cache_dir / "decoded").glob(f"*-{key}.npz"), None)
    return existing or cache_dir / "decoded" / f"{path.name.split('.')[0] or 'data'}-{key}.npz"


def _read_cache(file: Path, path: Path) -> Dataset | None:
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:  # no pickles: a cache file cannot run code
            meta = json.loads(str(z["meta"]))
            sets = {s: ImageSet(torch.from_numpy(z[f"{s}_images"]), torch.from_numpy(z[f"{s}_labels"]))
                    for s in _SPLITS if f"{s}_images" in z.files}
            source = meta["source"].replace(meta["path"], str(path))  # the same content may have moved
    except Exception as e:  # a truncated or foreign file: decode again
        log.warning("ignoring unreadable cache %s (%s)", file, e)
        return None
    if meta["skipped"]:
        log.warning("%s: %d unreadable image(s) were skipped", source, meta["skipped"])
    return Dataset(sets["train"], sets.get("test"), sets.get("val"), meta["classes"], source, meta["skipped"])


def _write_cache(file: Path, ds: Dataset, path: Path) -> None:
    meta = json.dumps(dict(classes=ds.classes, source=ds.source, skipped=ds.skipped, path=str(path)))
    arrays = {"meta": np.array(meta)}
    for split in _SPLITS:
        s = getattr(ds, split)
        if s is not None:
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = s.images.numpy(), s.labels.numpy()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(tmp, file)  # atomic: a concurrent or interrupted run never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("could not write the dataset cache %s (%s); the next run decodes again", file, e)


# ---------------------------------------------------------------------------------------------------
# Public API


def _pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise DataError(f"image size must be positive, got {size}")
    return int(h), int(w)


def load(source: str | Path, *, img_size: int | tuple[int, int] | None = None, in_chans: int | None = None,
         cache_dir: Path | None = None, skip_bad_images: bool = False, download: bool = True,
         progress: bool = True) -> Dataset:
    """Load a dataset into memory, decoding it once and caching the result.

    Args:
        source: "cifar10", "cifar100", or a path to an official CIFAR archive or folder, an image-folder
            tree (root/train/<class>/*, root/test/<class>/*, optional root/val/<class>/*), or a
            .tar/.tar.gz/.zip of such a tree.
        img_size: (H, W) or side every image is resized to (bicubic). None keeps the native size;
            if images differ in size, all are resized to the most common one, with a warning.
        in_chans: 1 (luma) or 3 (RGB). None: 3, or 1 when every image of a tree is grayscale.
        cache_dir: where CIFAR archives and decoded caches live; default `$CCT_DATA` or ~/.cache/cct.
        skip_bad_images: skip unreadable images with a warning (counted in `Dataset.skipped`)
            instead of raising `DataError`.
        download: fetch a missing CIFAR archive (md5-checked) when online.
        progress: progress bars on stderr.
    """
    size = _pair(img_size)
    if in_chans not in (None, 1, 3):
        raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = str(source)
    if not name.strip():
        raise DataError("no data source given (an empty path)")
    if name.lower() in _CIFAR and not Path(name).exists():
        path = _find_or_download_cifar(name.lower(), cache_dir, download, progress)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data source {name} not found: expected cifar10, cifar100, a folder, "
                            f"or a .tar/.tar.gz/.zip of root/train/<class>/* and root/test/<class>/*")
    path = path.resolve()

    key = dict(version=_CACHE_VERSION, content=_fingerprint(path), img_size=size, in_chans=in_chans,
               skip_bad_images=skip_bad_images)
    cache_file = _cache_path(cache_dir, path, key)
    cached = _read_cache(cache_file, path)
    if cached is not None:
        log.info("loaded %s from cache %s", cached.source, cache_file)
        return cached

    files = _Files(path)
    kind = _cifar_kind(files.names)
    if kind is not None:
        splits, classes = _decode_cifar(files, kind)
        splits = {s: (_resize_chans(x, size, in_chans), y) for s, (x, y) in splits.items()}
        skipped, what = 0, f"{_CIFAR[kind].title} ({path})"
    else:
        splits, classes, skipped = _decode_tree(files, size, in_chans, skip_bad_images, progress)
        what = f"image folders in {path}"
    sets = {s: ImageSet(torch.from_numpy(x), torch.from_numpy(y).long()) for s, (x, y) in splits.items()}
    ds = Dataset(sets["train"], sets.get("test"), sets.get("val"), classes, what, skipped)
    _write_cache(cache_file, ds, path)
    return ds


def _stratified_pick(labels: torch.Tensor, quota: list[int], generator: torch.Generator) -> torch.Tensor:
    """Indices of `quota[c]` random images of each class c, in their original order."""
    perm = torch.randperm(len(labels), generator=generator)
    by_class = perm[labels[perm].argsort(stable=True)]  # grouped by class, random within each class
    counts = torch.bincount(labels, minlength=len(quota)).tolist()
    starts = np.cumsum([0] + counts[:-1])
    picked = [by_class[s:s + q] for s, q in zip(starts, quota)]
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


def _proportional_quota(counts: list[int], total: int) -> list[int]:
    """`total` split over classes in proportion to `counts`, largest remainders first (Hamilton's method)."""
    n = sum(counts)
    exact = [c * total / n for c in counts]
    quota = [int(e) for e in exact]
    for c in sorted(range(len(counts)), key=lambda c: quota[c] - exact[c])[:total - sum(quota)]:
        quota[c] += 1
    return quota


def split(ds: Dataset, *, train_limit: int | None, val_split: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """The training and validation sets of a run.

    First a seeded, stratified subset of `train_limit` training images (all when None); then a
    seeded, stratified `val_split` fraction of what remains becomes the validation set, at least one
    image per class (classes of a single image stay in training). A root/val folder, when the
    source has one, is the validation set and `val_split` is ignored with a warning.
    """
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"--val-split must be in [0, 1), got {val_split}")
    if train_limit is not None and train_limit <= 0:
        raise DataError(f"--train-limit must be positive, got {train_limit}")
    g = torch.Generator().manual_seed(seed)
    train = ds.train
    num_classes = max(len(ds.classes), int(train.labels.max()) + 1)
    if train_limit is not None and train_limit < len(train):
        counts = torch.bincount(train.labels, minlength=num_classes).tolist()
        train = train.subset(_stratified_pick(train.labels, _proportional_quota(counts, train_limit), g))
    if ds.val is not None:
        if val_split > 0:
            log.warning("the source has a val/ folder: using it as the validation set, --val-split ignored")
        return train, ds.val
    if val_split == 0:
        return train, None
    counts = torch.bincount(train.labels, minlength=num_classes).tolist()
    quota = [min(max(1, round(n * val_split)), n - 1) if n > 1 else 0 for n in counts]
    if not sum(quota):  # else the run would train an epoch, then fail on an empty validation set
        raise DataError(f"--val-split {val_split} leaves no validation image: every class has a single training "
                        "image (use --val-split 0, or more images)")
    val_idx = _stratified_pick(train.labels, quota, g)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    return train.subset(keep.nonzero().squeeze(1)), train.subset(val_idx)


def batch_indices(n: int, batch_size: int, generator: torch.Generator, *, shuffle: bool = True,
                  drop_last: bool = False, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """Index batches of one epoch: slices of a `randperm` (airbench), or of `arange` without shuffle.

    With `world_size` > 1 every rank must pass a generator in the same state: each global batch of
    `batch_size` is cut into `world_size` contiguous shards and this yields shard `rank`. A final
    partial batch (without drop_last) is padded with indices from the epoch's start, as torch's
    DistributedSampler pads, so every rank gets the same number of non-empty shards.
    """
    assert batch_size > 0 and batch_size % world_size == 0, "batch_size must be a multiple of world_size"
    assert 0 <= rank < world_size
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < batch_size:
            if drop_last:
                return
            padded = -(-len(batch) // world_size) * world_size
            batch = torch.cat([batch, order[torch.arange(padded - len(batch)) % n]])
        per_rank = len(batch) // world_size
        yield batch[rank * per_rank:(rank + 1) * per_rank]
