"""Image-folder trees too large for memory, decoded on the fly in DataLoader worker processes.

`cct.data` holds a dataset in memory as one uint8 tensor, which is the fast path whenever it fits.
An ImageNet-style tree (1.28 M images: 193 GB as 3×224×224 uint8) does not, so `load` here keeps
only the file list and labels, and a `StreamImageSet` stands in for `cct.data.ImageSet`: its
`images` is a lazy (N, C, H, W) uint8 "tensor" whose batches are read, decoded and resized by a
`torch.utils.data.DataLoader`'s worker processes, while the training loop keeps its airbench shape —
index batches from `cct.data.batch_indices`, `augment_batch` on each uint8 batch (`load_batches`).

Decoding is `cct.data`'s own (same Pillow conversions, JPEG draft mode, bicubic resize, class
order and file order), so a streamed tree yields exactly the images the in-memory path holds.
Differences, all forced by not looking at every image first: with no image size given, the size
and channel count come from a sample of the training images (the in-memory path looks at all);
an unreadable image is found only when its batch is read — an error naming it, or with
`skip_bad_images` a black image in its place and a warning (the in-memory path drops it).

`load` chooses between the two paths: streaming when asked (`stream=True`, `--stream`), or when
the tensors would take more than `threshold` of the available memory (decoding peaks near three
times the final tensor, and every process on a machine holds its own copy).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from . import data as data_mod
from .data import DataError, Dataset, ImageSet

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.25  # fraction of the available memory the in-memory tensors may take
_PROBE_IMAGES = 64  # images whose headers decide the native size and channels


# ---------------------------------------------------------------------- decoding (runs in workers)
def decode_file(path: str, size: tuple[int, int], mode: str, resize_after: bool, skip_bad: bool) -> np.ndarray | str:
    """One image as (C, H, W) uint8, decoded as `cct.data` decodes it; the error message if unreadable.

    `resize_after`: decode at the native size and resize afterwards, as the in-memory path does for a
    tree loaded without an image size (a draft-mode JPEG decode would differ slightly).
    """
    a = data_mod._decode_image(path, None if resize_after else size, mode)
    if isinstance(a, str):
        if not skip_bad:
            return f"cannot read image {path}: {a} (--skip-bad-images to train on a black image in its place)"
        log.warning("unreadable image %s (%s): a black image takes its place", path, a)
        return np.zeros((1 if mode == "L" else 3, *size), dtype=np.uint8)
    if a.shape[:2] != tuple(size):
        a = np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BICUBIC))
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


class _Decoder(torch.utils.data.Dataset):
    """The DataLoader's view of a `StreamImages`: item i is the decoded image (or its error)."""

    def __init__(self, images: StreamImages):
        self.files, self.size, self.mode = images.files, images.size, images.mode
        self.resize_after, self.skip_bad = images.resize_after, images.skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return decode_file(self.files[i], self.size, self.mode, self.resize_after, self.skip_bad)


def _collate(items: list) -> tuple[torch.Tensor, str | None]:
    """(B, C, H, W) uint8 and no error, or an empty tensor and the first error (raised by the main process,
    so the user sees one line rather than a worker's traceback)."""
    error = next((x for x in items if isinstance(x, str)), None)
    if error is not None:
        return torch.zeros(0, dtype=torch.uint8), error
    return torch.from_numpy(np.stack(items)), None


# ---------------------------------------------------------------------- the lazy image set
class StreamImages:
    """A lazy (N, C, H, W) uint8 tensor of image files: slicing is free, indexing decodes.

    Supports what training and evaluation ask of an images tensor: `shape`, `len`, `[slice]`,
    `[index tensor]` (decoded in this process), `split(batch_size)` and `batches(index_batches)`
    (decoded in `workers` DataLoader processes, in order).
    """
    dtype = torch.uint8

    def __init__(self, files: list[str], size: tuple[int, int], channels: int, *, resize_after: bool = False,
                 skip_bad: bool = False, workers: int = 4):
        assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
        self.files, self.size, self.channels = list(files), (int(size[0]), int(size[1])), channels
        self.mode = "L" if channels == 1 else "RGB"
        self.resize_after, self.skip_bad, self.workers = resize_after, skip_bad, workers

    def _like(self, files: list[str]) -> StreamImages:
        return StreamImages(files, self.size, self.channels, resize_after=self.resize_after, skip_bad=self.skip_bad,
                            workers=self.workers)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), self.channels, *self.size))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._like(self.files[key])
        if isinstance(key, int):
            return self._decode([key])[0]
        return self._decode(torch.as_tensor(key).reshape(-1).tolist())

    def take(self, indices: torch.Tensor) -> StreamImages:
        """The images at `indices`, still lazy (`ImageSet.subset`'s counterpart)."""
        return self._like([self.files[i] for i in torch.as_tensor(indices).reshape(-1).tolist()])

    def _decode(self, indices: list[int]) -> torch.Tensor:
        images, error = _collate([_Decoder(self)[i] for i in indices])
        if error is not None:
            raise DataError(error)
        return images

    def batches(self, index_batches: Iterable, *, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """The uint8 batches of `index_batches` (index tensors or lists), decoded ahead in worker processes."""
        sampler = [torch.as_tensor(b).reshape(-1).tolist() for b in index_batches]
        if not sampler:
            return
        # an own generator: the loader seeds its workers from it, never from (and so never shifting) the
        # global RNG that dropout draws from — a streamed run stays the in-memory run
        loader = torch.utils.data.DataLoader(_Decoder(self), batch_sampler=sampler, num_workers=self.workers,
                                             collate_fn=_collate, pin_memory=pin_memory,
                                             generator=torch.Generator().manual_seed(0))
        for images, error in loader:
            if error is not None:
                raise DataError(error)
            yield images

    def split(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches, as `torch.Tensor.split` (what evaluation and statistics iterate over)."""
        n = len(self.files)
        return self.batches([list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


class StreamImageSet:
    """One split of a streamed tree: lazy images, labels in memory (`cct.data.ImageSet`'s interface)."""

    def __init__(self, images: StreamImages, labels: torch.Tensor):
        assert labels.dtype == torch.int64 and labels.shape == (len(images),)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> StreamImageSet:
        return StreamImageSet(self.images.take(indices), self.labels[indices].contiguous())


def load_batches(image_set: ImageSet | StreamImageSet, index_batches: Iterable[torch.Tensor], *,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, uint8 images, labels) of each index batch: slices of memory, or decoded by workers."""
    if not isinstance(image_set.images, StreamImages):
        return ((idx, image_set.images[idx], image_set.labels[idx]) for idx in index_batches)
    index_batches = list(index_batches)
    return ((idx, images, image_set.labels[idx])
            for idx, images in zip(index_batches, image_set.images.batches(index_batches, pin_memory=pin_memory)))


# ---------------------------------------------------------------------- choosing the path
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


def _probe(root: Path, names: list[str], img_size, in_chans) -> tuple[tuple[int, int], int]:
    """(size, channels) of a tree: the given ones, else the most common size and the colour of a sample."""
    step = max(1, len(names) // _PROBE_IMAGES)
    sizes, modes = Counter(), set()
    if img_size is None or in_chans is None:
        for name in names[::step][:_PROBE_IMAGES]:
            try:
                with data_mod.refusing_decompression_bombs(), Image.open(root / name) as im:  # the header only
                    sizes[(im.size[1], im.size[0])] += 1
                    modes.add(im.mode)
            except Exception:  # an unreadable file is reported when its batch is read
                continue
    if img_size is None:
        if not sizes:
            raise DataError(f"{root}: none of {_PROBE_IMAGES} sampled training images is readable")
        size = sizes.most_common(1)[0][0]
        if len(sizes) > 1:
            log.warning("%s: images of several sizes; resizing all to the most common of a sample, %dx%d "
                        "(pass img_size to choose)", root, *size)
    else:
        size = data_mod._pair(img_size)
    channels = in_chans or (1 if modes and modes <= data_mod._GRAY_MODES else 3)
    return size, channels


def load(source: str | Path, *, img_size: int | tuple[int, int] | None = None, in_chans: int | None = None,
         skip_bad_images: bool = False, stream: bool | None = None, threshold: float = DEFAULT_THRESHOLD,
         workers: int = 4, processes_per_machine: int = 1, progress: bool = True) -> Dataset:
    """A dataset in memory (`cct.data.load`) or streamed from its image-folder tree.

    Args:
        source, img_size, in_chans, skip_bad_images, progress: as `cct.data.load`.
        stream: True streams (the source must be an image-folder tree), False loads into memory,
            None chooses: streaming when the uint8 tensors of every process on this machine would
            exceed `threshold` of the available memory.
        threshold: that fraction, in (0, 1].
        workers: DataLoader worker processes of a streamed dataset.
        processes_per_machine: training processes on this machine (each holds its own copy).
    """
    if not 0 < threshold <= 1:
        raise DataError(f"--stream-threshold must be in (0, 1], got {threshold}")
    path = Path(source).expanduser()
    in_memory = dict(img_size=img_size, in_chans=in_chans, skip_bad_images=skip_bad_images, progress=progress)
    if stream is False or not str(source).strip() or (stream is None and not path.is_dir()):
        return data_mod.load(source, **in_memory)
    if not path.is_dir():
        raise DataError(f"--stream reads an image-folder tree (root/train/<class>/*); {source} is not a folder")
    files = data_mod._Files(path.resolve())
    if data_mod._cifar_kind(files.names) is not None:
        if stream:
            raise DataError(f"{source} is a CIFAR release, which fits in memory: drop --stream")
        return data_mod.load(source, **in_memory)
    entries = data_mod._tree_entries(files)
    size, channels = _probe(files.path, [n for _, n in sorted(entries.get("train", []))], img_size, in_chans)
    n_images = sum(len(v) for v in entries.values())
    if stream is None:
        need, have = n_images * channels * size[0] * size[1] * processes_per_machine, available_memory()
        if have is None or need <= threshold * have:
            return data_mod.load(source, **in_memory)
        log.warning("%s: %d images would take %.1f GB in memory (%d process(es)), more than %g of the %.1f GB "
                    "available: streaming them from disk (--no-stream to load anyway)", source, n_images,
                    need / 1e9, processes_per_machine, threshold, have / 1e9)
    return _stream_tree(files, entries, size, channels, resize_after=img_size is None, skip_bad=skip_bad_images,
                        workers=workers)


def _stream_tree(files, entries: dict, size, channels: int, *, resize_after: bool, skip_bad: bool,
                 workers: int) -> Dataset:
    """Files and labels in `cct.data._decode_tree`'s order: classes sorted, then (class, name) within a split."""
    classes = sorted({c for c, _ in entries.get("train", [])})
    if not classes:
        raise DataError(f"{files.path}: no images in train/")
    index = {c: i for i, c in enumerate(classes)}
    sets = {}
    for split in data_mod._SPLITS:
        items = sorted(entries.get(split, []))
        unknown = sorted({c for c, _ in items} - set(index))
        if unknown:
            raise DataError(f"{files.path}: {split}/{unknown[0]} is not a class of train/ ({len(classes)} classes)")
        if items:
            images = StreamImages([str(files.path / n) for _, n in items], size, channels, resize_after=resize_after,
                                  skip_bad=skip_bad, workers=workers)
            sets[split] = StreamImageSet(images, torch.tensor([index[c] for c, _ in items], dtype=torch.int64))
    return Dataset(sets["train"], sets.get("test"), sets.get("val"), classes,
                   f"image folders in {files.path} (streamed)", 0)
