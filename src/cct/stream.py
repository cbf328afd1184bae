"""Image-folder trees too large for memory, decoded on the fly in DataLoader worker processes.

`cct.data` holds a dataset in memory as one uint8 tensor, which is the fast path whenever it fits.
An ImageNet-style tree (1.28 M images: 193 GB as 3×224×224 uint8) does not, so a streamed dataset
keeps only the file list and labels, and a `StreamImageSet` stands in for `cct.data.ImageSet`: its
`images` is a lazy (N, C, H, W) uint8 "tensor" whose batches are read, decoded and resized by a
`torch.utils.data.DataLoader`'s worker processes, while the training loop keeps its airbench shape —
index batches from `cct.data.batch_indices`, `augment_batch` on each uint8 batch (`cct.data.load_batches`).

Decoding is `cct.decode.decode_image`, as for the in-memory path, with the same class and file
order (`cct.sources.tree_items`), so a streamed tree yields exactly the images the in-memory path
holds. Differences, all forced by not looking at every image first: with no image size given, the
size and channel count come from a sample of the training images (`probe_tree`; the in-memory path
looks at all); an unreadable image is found only when its batch is read — an error naming it, or
with `skip_bad_images` a black image in its place and a warning (the in-memory path drops it).

`cct.data.load` chooses between the two paths.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .decode import GRAY_MODES, UnreadableImageError, decode_image, image_header, resize_image
from .sources import SPLITS, DataError, Files

log = logging.getLogger(__name__)

_PROBE_IMAGES = 64  # images whose headers decide the native size and channels


# ---------------------------------------------------------------------- decoding (runs in workers)
def decode_file(path: str, size: tuple[int, int], channels: int, resize_after: bool,
                skip_bad: bool, resize_mode: str = "resize") -> np.ndarray | str:
    """One image as (C, H, W) uint8, as the in-memory path decodes it; the error message if unreadable.

    `resize_after`: decode at the native size and resize afterwards, as the in-memory path does for a
    tree loaded without an image size (a draft-mode JPEG decode would differ slightly).
    """
    try:
        a = decode_image(path, size=None if resize_after else size, channels=channels, resize_mode=resize_mode)
    except UnreadableImageError as e:
        reason = f"{type(e.cause).__name__}: {e.cause}"
        if not skip_bad:
            return f"cannot read image {path}: {reason} (--skip-bad-images to train on a black image in its place)"
        log.warning("unreadable image %s (%s): a black image takes its place", path, reason)
        return np.zeros((channels, *size), dtype=np.uint8)
    return a if a.shape[1:] == tuple(size) else resize_image(a, size, resize_mode=resize_mode)


class _Decoder(torch.utils.data.Dataset):
    """The DataLoader's view of a `StreamImages`: item i is the decoded image (or its error)."""

    def __init__(self, images: StreamImages):
        self.files, self.size, self.channels = images.files, images.size, images.channels
        self.resize_after, self.skip_bad = images.resize_after, images.skip_bad
        self.resize_mode = images.resize_mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return decode_file(self.files[i], self.size, self.channels, self.resize_after, self.skip_bad, self.resize_mode)


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
                 skip_bad: bool = False, workers: int = 4, resize_mode: str = "resize"):
        assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
        self.files, self.size, self.channels = list(files), (int(size[0]), int(size[1])), channels
        self.resize_after, self.skip_bad, self.workers = resize_after, skip_bad, workers
        self.resize_mode = resize_mode

    def _like(self, files: list[str]) -> StreamImages:
        return StreamImages(files, self.size, self.channels, resize_after=self.resize_after, skip_bad=self.skip_bad,
                            workers=self.workers, resize_mode=self.resize_mode)

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

    @property
    def inputs(self) -> StreamImages:
        return self.images

    def subset(self, indices: torch.Tensor) -> StreamImageSet:
        return StreamImageSet(self.images.take(indices), self.labels[indices].contiguous())


# ---------------------------------------------------------------------- a tree as streamed splits
def probe_tree(root: Path, names: list[str], *, size: tuple[int, int] | None,
               in_chans: int | None) -> tuple[tuple[int, int], int, bool]:
    """(size, channels, mixed) of a tree: the given ones, else the most common size and the colour of a sample
    of the training images `names` (paths relative to `root`); `mixed`: the sample had several sizes (for the
    caller to say, once it streams: the in-memory path says so itself)."""
    step = max(1, len(names) // _PROBE_IMAGES)
    sizes, modes = Counter(), set()
    if size is None or in_chans is None:
        for name in names[::step][:_PROBE_IMAGES]:
            try:
                shape, mode = image_header(root / name)
            except UnreadableImageError:  # reported when its batch is read
                continue
            sizes[shape] += 1
            modes.add(mode)
    if size is None:
        if not sizes:
            raise DataError(f"{root}: none of {_PROBE_IMAGES} sampled training images is readable")
        size = sizes.most_common(1)[0][0]
    channels = in_chans or (1 if modes and modes <= GRAY_MODES else 3)
    return size, channels, len(sizes) > 1


def stream_tree(files: Files, items: dict[str, list[tuple[int, str]]], size: tuple[int, int], channels: int, *,
                resize_after: bool, skip_bad: bool, workers: int, resize_mode: str = "resize") -> dict[str, StreamImageSet]:
    """{split: lazy images and labels} of a folder tree's `items` (`cct.sources.tree_items`), in their order."""
    sets = {}
    for split in SPLITS:
        if items.get(split):
            images = StreamImages([str(files.path / n) for _, n in items[split]], size, channels,
                                  resize_after=resize_after, skip_bad=skip_bad, workers=workers,
                                  resize_mode=resize_mode)
            sets[split] = StreamImageSet(images, torch.tensor([label for label, _ in items[split]], dtype=torch.int64))
    return sets
