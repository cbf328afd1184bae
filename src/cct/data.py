"""Image datasets as uint8 tensors: `load` (in memory, or streamed when too large), the cache, splits, batches.

Following airbench (Jordan, 2024), each split is decoded once into one contiguous (N, C, H, W) uint8
tensor, cached on disk, and batched by slicing a `randperm` — no worker processes while training.
An image-folder tree too large for memory is streamed instead (`cct.stream`): `load` is the one
place that chooses, for training and evaluation alike.

Sources accepted by `load` (and `--data SOURCE` on the command line):
- ``"cifar10"``, ``"cifar100"``: the official python archives of Krizhevsky (2009), looked up in the
  cache directory (``$CCT_DATA``, else ``~/.cache/cct``) and downloaded there when missing (`cct.cifar`);
- a path to one of those archives or to its extracted folder;
- an image-folder tree ``root/train/<class>/*``, ``root/test/<class>/*``, optionally ``root/val/<class>/*``
  (torchvision's ImageFolder layout, one per split), in any format Pillow reads (`cct.decode`);
- flat class folders ``root/<class>/*`` (taken when there is no train/ folder), or a CSV of
  ``path,label`` rows naming images relative to the CSV: a seeded, stratified test split is held out
  and recorded (`cct.holdout`, `Dataset.split_record`), and ``load(root, test_files=record)`` later
  decodes only those test files;
- a ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` of a tree or of class folders, with or without one
  top-level folder, read without extraction after safety checks (`cct.sources`).

Class order is the official one for CIFAR and the sorted folder or label names otherwise. The cache
(`cct.cache`) holds the decoded images of a source before any test split, so one entry serves every
seed and fraction.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from . import stream as stream_mod
from .cifar import CIFAR_MEAN, CIFAR_STD, RELEASES, cifar_kind, find_or_download, read_cifar
from . import cache, holdout
from .decode import RESIZE_MODES, decode_images, uniform_images
from .sources import (SPLITS, DataError, Files, content_key, default_cache_dir, is_csv, layout,
                      warn_empty_classes)

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "DEFAULT_THRESHOLD", "DataError", "Dataset", "ImageSet", "available_memory",
           "batch_indices", "default_cache_dir", "load", "split"]

log = logging.getLogger(__name__)

_CACHE_VERSION = 4  # bump whenever decoding changes (4: wide grayscale scaled), so stale caches are never read
DEFAULT_THRESHOLD = 0.25  # fraction of the available memory the in-memory tensors may take


@dataclass
class ImageSet:
    """One split in memory (`cct.stream.StreamImageSet` is its streamed counterpart)."""
    images: torch.Tensor  # (N, C, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, "images must be (N, C, H, W) uint8"
        assert self.labels.dtype == torch.int64 and self.labels.shape == (len(self.images),)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def inputs(self) -> torch.Tensor:  # what the model's batches are cut from (`cct.kinds`)
        return self.images

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
    split_record: dict | None = None  # flat folders and CSVs: the drawn test split (`cct.holdout.make_record`)
    source_changed: bool = False  # loaded with test_files=record: the source's file list changed since

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])


# ---------------------------------------------------------------------------------------------------
# Image folders and CSVs in memory


def _decode_tree(files: Files, items: dict[str, list[tuple[int, str]]], size, in_chans, skip_bad: bool,
                 progress: bool, resize_mode: str):
    """({split: (uint8 images (N, C, H, W), int64 labels)}, names decoded, names skipped) of {split: [(label, name)]}."""
    order = [(s, label, n) for s in SPLITS for label, n in items.get(s, [])]
    arrays = decode_images([files.handle(n) for _, _, n in order], size=size, channels=in_chans, progress=progress,
                           resize_mode=resize_mode)
    good, skipped = [], []
    for (s, label, name), a in zip(order, arrays):
        if isinstance(a, str):
            if not skip_bad:
                raise DataError(f"cannot read image {files.path}/{name}: {a} (--skip-bad-images to skip it)")
            skipped.append(name)
        else:
            good.append(((s, label, name), a))
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, first: %s", len(skipped), files.path, skipped[0])
    if not any(s == "train" for (s, _, _), _ in good):
        raise DataError(f"{files.path}: no readable training image")
    good = uniform_images(good, size, in_chans, files.path, resize_mode)
    splits = {}
    for split in SPLITS:
        part = [(l, a) for (s, l, _), a in good if s == split]
        if part:
            splits[split] = (np.stack([a for _, a in part]), np.array([l for l, _ in part], dtype=np.int64))
    return splits, [n for (_, _, n), _ in good], skipped


def _hold_out(ds: Dataset, meta: dict, *, test_split: float, seed: int) -> Dataset:
    """Flat folders and CSVs: the seeded, stratified test split of `cct.holdout`, drawn from the file
    list (so the same across loads, decoded or cached) and recorded in `Dataset.split_record`."""
    items = [(int(label), name) for label, name in meta["items"]]
    _, test = holdout.choose_test(items, len(ds.classes), fraction=test_split, seed=seed)
    test_names = {n for _, n in test}
    is_test = torch.tensor([n in test_names for n in meta["names"]], dtype=torch.bool)
    skipped = {n for _, n in items} - set(meta["names"])
    record = holdout.make_record(seed=seed, fraction=test_split, classes=ds.classes, items=items, test=test,
                                 skipped=skipped)
    test_set = ds.train.subset(is_test.nonzero().squeeze(1)) if bool(is_test.any()) else None
    drawn = {ds.classes[label] for label, _ in test}
    lost = sorted(drawn - {ds.classes[label] for label in (test_set.labels.tolist() if test_set else [])})
    if lost:  # the draw is from the file list, so that it is the same for every load; these files did not decode
        log.warning("%s: the test images drawn for %d class(es) were unreadable and skipped, so they have none in "
                    "the test set: %s", meta.get("path", "the source"), len(lost), ", ".join(lost[:5]))
    return replace(ds, train=ds.train.subset((~is_test).nonzero().squeeze(1)), test=test_set, split_record=record)


def _load_recorded(path: Path, record: dict, *, size, in_chans, skip_bad: bool, progress: bool,
                   resize_mode: str) -> Dataset:
    """Only the recorded test files (`cct.holdout.decode_recorded`), as the test set; train is empty."""
    images, labels, skipped, changed, where = holdout.decode_recorded(
        path, record, size=size, in_chans=in_chans, skip_bad=skip_bad, progress=progress, resize_mode=resize_mode)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    return Dataset(ImageSet(images[:0].contiguous(), labels[:0]), ImageSet(images, labels), None,
                   list(record["classes"]), f"the recorded test split of {where}", skipped,
                   split_record=record, source_changed=changed)


# ---------------------------------------------------------------------------------------------------
# The decoded-dataset cache (`cct.cache`): one uncompressed .npz per (source content, size, channels, mode)


def _read_cache(file: Path, path: Path) -> tuple[Dataset, dict] | None:
    entry = cache.read_entry(file)
    if entry is None:
        return None
    arrays, meta = entry
    try:
        sets = {s: ImageSet(torch.from_numpy(arrays[f"{s}_images"]), torch.from_numpy(arrays[f"{s}_labels"]))
                for s in SPLITS if f"{s}_images" in arrays}
        source = meta["source"].replace(meta["path"], str(path))  # the same content may have moved
        ds = Dataset(sets["train"], sets.get("test"), sets.get("val"), meta["classes"], source, meta["skipped"])
    except Exception as e:  # a foreign or older file: decode again
        log.warning("ignoring unreadable cache %s (%s)", file, e)
        return None
    if meta["skipped"]:
        log.warning("%s: %d unreadable image(s) were skipped", source, meta["skipped"])
    return ds, meta


def _write_cache(file: Path, ds: Dataset, meta: dict) -> None:
    arrays = {}
    for split in SPLITS:
        s = getattr(ds, split)
        if s is not None:
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = s.images.numpy(), s.labels.numpy()
    cache.write_entry(file, arrays, meta)


# ---------------------------------------------------------------------------------------------------
# Loading: the one entry point, in memory or streamed


def _pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise DataError(f"image size must be positive, got {size}")
    return int(h), int(w)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load(source: str | Path, *, img_size: int | tuple[int, int] | None = None, in_chans: int | None = None,
         skip_bad_images: bool = False, progress: bool = True, stream: bool | None = None,
         threshold: float = DEFAULT_THRESHOLD, workers: int = 4, processes_per_machine: int = 1,
         cache_dir: Path | None = None, download: bool = True, resize_mode: str = "resize",
         test_split: float = 0.2, seed: int = 0, test_files: dict | None = None) -> Dataset:
    """A dataset in memory, decoded once and cached, or streamed from its image folders.

    Args:
        source: "cifar10", "cifar100", or a path to an official CIFAR archive or folder, an image-folder
            tree (root/train/<class>/*, root/test/<class>/*, optional root/val/<class>/*), flat class
            folders (root/<class>/*, when there is no train/), a .tar/.tar.gz/.zip of either, or a
            CSV of path,label rows naming image files relative to the CSV.
        img_size: (H, W) or side every image is resized to (bicubic). None keeps the native size;
            if images differ in size, all are resized to the most common one, with a warning.
        in_chans: 1 (luma) or 3 (RGB). None: 3, or 1 when every image of a tree is grayscale.
        skip_bad_images: skip unreadable images with a warning (counted in `Dataset.skipped`) instead
            of raising `DataError`; a streamed tree shows a black image in their place.
        progress: progress bars on stderr.
        stream: True streams (the source must be a folder), False loads into memory, None chooses:
            streaming when the uint8 tensors of every process on this machine would exceed
            `threshold` of the available memory (decoding peaks near three times the final tensor,
            and every process holds its own copy).
        threshold: that fraction, in (0, 1].
        workers: DataLoader worker processes of a streamed dataset.
        processes_per_machine: training processes on this machine.
        cache_dir: where CIFAR archives and decoded caches live; default `$CCT_DATA` or ~/.cache/cct.
        download: fetch a missing CIFAR archive (md5-checked) when online.
        resize_mode: "resize" (to img_size, ignoring the aspect ratio) or "crop" (the short side to
            img_size, then a center crop), see `cct.decode.decode_image`.
        test_split: flat folders and CSVs: the fraction of each class held out for testing (seeded,
            stratified, `cct.holdout`), recorded in `Dataset.split_record`; 0 for none.
        seed: the seed of that split.
        test_files: a `Dataset.split_record` of an earlier load: decode only its test files (the
            Dataset's train set is then empty), reporting a changed source with a warning and
            `Dataset.source_changed`.
    """
    if not 0 < threshold <= 1:
        raise DataError(f"--stream-threshold must be in (0, 1], got {threshold}")
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    if not 0.0 <= test_split < 1.0:
        raise DataError(f"--test-split must be in [0, 1), got {test_split}")
    size = _pair(img_size)
    if in_chans not in (None, 1, 3):
        raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
    path = Path(source).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):  # reading /dev/zero to fingerprint it never ends
        raise DataError(f"--data {source} is neither a file nor a folder")
    if test_files is not None:
        return _load_recorded(path, test_files, size=size, in_chans=in_chans, skip_bad=skip_bad_images,
                              progress=progress, resize_mode=resize_mode)
    in_memory = dict(size=size, in_chans=in_chans, cache_dir=cache_dir, skip_bad_images=skip_bad_images,
                     download=download, progress=progress, resize_mode=resize_mode, test_split=test_split, seed=seed)
    if stream is False or not str(source).strip() or (stream is None and not path.is_dir()):
        return _load_in_memory(source, **in_memory)
    if not path.is_dir():
        raise DataError(f"--stream reads an image-folder tree (root/train/<class>/*) or class folders "
                        f"(root/<class>/*); {source} is not a folder")
    files = Files(path.resolve())
    if cifar_kind(files.names) is not None:
        if stream:
            raise DataError(f"{source} is a CIFAR release, which fits in memory: drop --stream")
        return _load_in_memory(source, **in_memory)
    files, classes, items, flat = layout(files.path, files, min_per_class=2 if test_split > 0 else 1)
    size, channels, mixed = stream_mod.probe_tree(files.path, [n for _, n in items["train"]], size=size,
                                                  in_chans=in_chans)
    if stream is None:
        n_images = sum(len(v) for v in items.values())
        need, have = n_images * channels * size[0] * size[1] * processes_per_machine, available_memory()
        if have is None or need <= threshold * have:
            return _load_in_memory(source, **in_memory)
        log.warning("%s: %d images would take %.1f GB in memory (%d process(es)), more than %g of the %.1f GB "
                    "available: streaming them from disk (--no-stream to load anyway)", source, n_images,
                    need / 1e9, processes_per_machine, threshold, have / 1e9)
    if mixed:
        log.warning("%s: images of several sizes; resizing all to the most common of a sample, %dx%d (--img-size "
                    "chooses)", files.path, *size)
    record = None
    if flat:  # streaming finds unreadable images only while reading them: none is left out of the record
        warn_empty_classes(files.path, classes, items["train"])
        every = items["train"]
        train, test = holdout.choose_test(every, len(classes), fraction=test_split, seed=seed)
        record = holdout.make_record(seed=seed, fraction=test_split, classes=classes, items=every, test=test,
                                     skipped=set())
        items = {"train": train, "test": test}
    sets = stream_mod.stream_tree(files, items, size, channels, resize_after=img_size is None,
                                  skip_bad=skip_bad_images, workers=workers, resize_mode=resize_mode)
    return Dataset(sets["train"], sets.get("test"), sets.get("val"), classes,
                   f"image folders in {files.path} (streamed)", 0, split_record=record)


def _load_in_memory(source: str | Path, *, size: tuple[int, int] | None, in_chans: int | None,
                    cache_dir: Path | None, skip_bad_images: bool, download: bool, progress: bool,
                    resize_mode: str, test_split: float, seed: int) -> Dataset:
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = str(source)
    if not name.strip():
        raise DataError("no data source given (an empty path)")
    release = name.lower() if name.lower() in RELEASES and not Path(name).exists() else None
    if release is not None:
        path = find_or_download(release, cache_dir, download=download, progress=progress)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data source {name} not found: expected cifar10, cifar100, a folder of "
                            f"root/<class>/* or root/train/<class>/* and root/test/<class>/*, an archive of one, "
                            f"or a CSV of path,label rows")
    path = path.resolve()

    # the test split is drawn after the cache: one entry serves every seed and fraction
    key = dict(version=_CACHE_VERSION, content=content_key(path), img_size=size, in_chans=in_chans,
               skip_bad_images=skip_bad_images, resize_mode=resize_mode)
    cache_file = cache.entry_path(cache_dir, path, key)
    cached = _read_cache(cache_file, path)
    if cached is not None:
        ds, meta = cached
        log.info("loaded %s from cache %s", ds.source, cache_file)
    else:
        ds, meta = _decode_source(path, size=size, in_chans=in_chans, skip_bad_images=skip_bad_images,
                                  progress=progress, resize_mode=resize_mode,
                                  min_per_class=2 if test_split > 0 else 1, release=release)
        _write_cache(cache_file, ds, meta)
    if meta.get("layout") == "flat":
        warn_empty_classes(path, meta["classes"], meta["items"])
        ds = _hold_out(ds, meta, test_split=test_split, seed=seed)
    return ds


def _decode_source(path: Path, *, size, in_chans, skip_bad_images: bool, progress: bool,
                   resize_mode: str, min_per_class: int = 2, release: str | None = None) -> tuple[Dataset, dict]:
    """The Dataset of a CIFAR release, tree, flat folder or CSV, all decoded, and its cache metadata; `release`:
    the CIFAR release `--data` named, whose copy in the data folder must be that release."""
    try:
        files = None if is_csv(path) else Files(path)
    except DataError as e:
        if release is None:
            raise
        raise DataError(f"{e}: the {RELEASES[release].title} copy in the data folder is damaged; delete it to "
                        f"download it again, or put a good copy there (md5 {RELEASES[release].md5})") from None
    kind = cifar_kind(files.names) if files is not None else None
    if release is not None and kind != release:
        found = RELEASES[kind].title if kind else "no CIFAR release"
        raise DataError(f"{path}: --data {release} found this copy in the data folder, but it holds {found}; delete "
                        f"it or put {RELEASES[release].archive} (md5 {RELEASES[release].md5}) there")
    extra = {}
    if kind is not None:
        if resize_mode == "crop" and size is not None and size[0] != size[1]:
            raise DataError(f"--resize-mode crop on {RELEASES[kind].title} needs a square image size, got {size}")
        splits, classes = read_cifar(files, kind, size=size, in_chans=in_chans)
        skipped, what, arrangement = 0, f"{RELEASES[kind].title} ({path})", "cifar"
    else:
        files, classes, items, flat = layout(path, files, min_per_class=min_per_class)
        splits, names, bad = _decode_tree(files, items, size, in_chans, skip_bad_images, progress, resize_mode)
        skipped, arrangement = len(bad), "flat" if flat else "tree"
        what = f"{'images listed in' if is_csv(path) else 'image folders in'} {path}"
        if flat:
            extra = dict(items=items["train"], names=names)
    sets = {s: ImageSet(torch.from_numpy(x), torch.from_numpy(y).long()) for s, (x, y) in splits.items()}
    ds = Dataset(sets["train"], sets.get("test"), sets.get("val"), classes, what, skipped)
    meta = dict(classes=classes, source=what, skipped=skipped, path=str(path), layout=arrangement, **extra)
    return ds, meta



# ---------------------------------------------------------------------------------------------------
# Splits and batches


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
    # every class keeps an example while there are enough to go round (a rare class got none: never trained on,
    # still tested); each comes from the class with the most
    for c in [c for c in range(len(counts)) if counts[c] and not quota[c]][:max(0, total - sum(map(bool, quota)))]:
        quota[max(range(len(counts)), key=lambda k: quota[k])] -= 1
        quota[c] = 1
    return quota


def split(ds: Dataset, *, train_limit: int | None, val_split: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """The training and validation sets of a run: `split_set` on `ds.train` (a root/val folder is the validation set)."""
    return split_set(ds.train, num_classes=len(ds.classes), val=ds.val, train_limit=train_limit,
                     val_split=val_split, seed=seed)


def split_set(train, *, num_classes: int, val=None, train_limit: int | None, val_split: float, seed: int):
    """(training set, validation set or None) of a run, from any split (`ImageSet`, `cct.kinds.TextSet`, ...).

    First a seeded, stratified subset of `train_limit` training examples (all when None); then a
    seeded, stratified `val_split` fraction of what remains becomes the validation set, at least one
    example per class (classes of a single example stay in training). A given `val` set is used as it
    is, and `val_split` is ignored with a warning.
    """
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"--val-split must be in [0, 1), got {val_split}")
    if train_limit is not None and train_limit <= 0:
        raise DataError(f"--train-limit must be positive, got {train_limit}")
    g = torch.Generator().manual_seed(seed)
    num_classes = max(num_classes, int(train.labels.max()) + 1)
    if train_limit is not None and train_limit < len(train):
        counts = torch.bincount(train.labels, minlength=num_classes).tolist()
        if train_limit < sum(map(bool, counts)):
            log.warning("--train-limit %d is below the %d classes: some classes get no training example",
                        train_limit, sum(map(bool, counts)))
        train = train.subset(_stratified_pick(train.labels, _proportional_quota(counts, train_limit), g))
    if val is not None:
        if val_split > 0:
            log.warning("the source has a val/ folder: using it as the validation set, --val-split ignored")
        return train, val
    if val_split == 0:
        return train, None
    counts = torch.bincount(train.labels, minlength=num_classes).tolist()
    quota = [min(max(1, round(n * val_split)), n - 1) if n > 1 else 0 for n in counts]
    if not sum(quota):  # else the run would train an epoch, then fail on an empty validation set
        raise DataError(f"--val-split {val_split} leaves no validation example: every class has a single training "
                        "example (use --val-split 0, or more data)")
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


def load_batches(image_set, index_batches: Iterable[torch.Tensor], *,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, object, torch.Tensor]]:
    """(indices, inputs, labels) of each index batch of a split: slices of memory (an `ImageSet`'s uint8
    images, a `cct.kinds.TextSet`'s token batch), or images decoded by workers (a streamed set)."""
    inputs = image_set.inputs
    if not isinstance(inputs, stream_mod.StreamImages):
        return ((idx, inputs[idx], image_set.labels[idx]) for idx in index_batches)
    index_batches = list(index_batches)
    return ((idx, images, image_set.labels[idx])
            for idx, images in zip(index_batches, image_set.images.batches(index_batches, pin_memory=pin_memory)))
