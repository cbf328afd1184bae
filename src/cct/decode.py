"""Image files to uint8 (C, H, W) arrays: the one decoder of datasets, streamed batches and `cct predict`.

`decode_image` turns the bytes or the path of a file in any format and mode Pillow reads into the
pixels a model sees: the EXIF orientation is applied (phone photos are stored sideways with a tag
saying so), palette images go through RGBA, then the image is converted to RGB or to ITU-R 601-2
luma (alpha dropped, CMYK and YCbCr converted) and resized with Pillow's bicubic filter, either
plainly ("resize", ignoring the aspect ratio) or keeping the aspect ratio and cropping the centre
("crop", torchvision's Resize(short side) + CenterCrop); JPEGs first shrink while decoding through
libjpeg's draft mode. Because the in-memory dataset, the
streamed one and prediction all call it, the three see the same pixels.

Images larger than Pillow's `MAX_IMAGE_PIXELS` are refused from their header, never decoded.
`decode_images` decodes many in worker processes for the in-memory path.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import multiprocessing
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .sources import DataError

log = logging.getLogger(__name__)

# Pillow modes that hold no colour: with channels=None these decode as 1 channel
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # more than 8 bits a pixel: scaled, not clamped
RESIZE_MODES = ("resize", "crop")
_ORIENTATION = 0x0112  # the EXIF tag; values 5 to 8 turn the image by 90 degrees
_POOL_MIN_IMAGES = 4000  # below this, starting worker processes costs more than it saves


class UnreadableImageError(DataError):
    """An image Pillow (or the file system) cannot read; `cause` is the original exception."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):  # picklable, for errors that cross process boundaries
        return type(self), (str(self), self.cause)


@contextlib.contextmanager
def refusing_decompression_bombs():
    """Pillow's DecompressionBombWarning (more than Image.MAX_IMAGE_PIXELS) raised as an error, as it already
    is past twice the limit: a huge image is refused, never decoded after a warning nobody reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _reason(e: BaseException) -> str:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__
    return re.sub(r" <_io\.\w+ object at 0x[0-9a-f]+>", "", reason)  # Pillow names an archive member by its buffer


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation, 1 (upright) when absent."""
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a broken EXIF block: the pixels are still readable, unturned
        return 1


def _turned(im: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height."""
    return _orientation(im) in (5, 6, 7, 8)


def _resized(im: Image.Image, size: tuple[int, int], resize_mode: str) -> Image.Image:
    if im.size == (size[1], size[0]):
        return im
    if resize_mode == "crop":  # scale the short side to fit, then cut the centre
        return ImageOps.fit(im, (size[1], size[0]), Image.BICUBIC)
    return im.resize((size[1], size[0]), Image.BICUBIC)


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image as 8-bit "L", scaled: Pillow's own conversion clamps at 255, so a
    16-bit photo would turn white. 16-bit ranges (and 32-bit ints within them) divide by 257; floats in [0, 1]
    are scaled by 255, other floats and ints already in 0-255 are kept (clipped)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
        a = a / 257.0
    elif im.mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def decode_image(source: bytes | str | Path, *, size: tuple[int, int] | None, channels: int | None,
                 resize_mode: str = "resize") -> np.ndarray:
    """One image as a uint8 (C, H, W) array, turned upright by its EXIF orientation.

    Args:
        source: the file's bytes, or its path.
        size: (H, W) to resize to (Pillow's bicubic), None for the native size.
        channels: 1 (luma) or 3 (RGB); None: 1 for images of a grayscale mode, else 3.
        resize_mode: "resize" to `size` whatever the aspect ratio, or "crop": the aspect-preserving
            resize that covers `size`, then a center crop.

    Raises:
        UnreadableImageError (a `DataError`) naming the file and Pillow's or the system's reason.
    """
    assert channels in (None, 1, 3), f"channels must be 1, 3 or None, got {channels}"
    assert resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}"
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    try:
        with refusing_decompression_bombs(), Image.open(io.BytesIO(source) if isinstance(source, bytes)
                                                        else source) as im:
            if size is not None and im.format == "JPEG":  # let libjpeg shrink large photos while decoding
                im.draft(mode or im.mode, (size[0], size[1]) if _turned(im) else (size[1], size[0]))
            if _orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
            if im.mode == "P" or im.mode == "PA":
                im = im.convert("RGBA")
            if im.mode in WIDE_GRAY_MODES:
                im = _to_8bit(im)
            target = mode or ("L" if im.mode in GRAY_MODES else "RGB")
            im = im.convert(target)  # RGBA → RGB drops alpha, CMYK/YCbCr convert, RGB → L is ITU-R 601-2
            if size is not None:
                im = _resized(im, size, resize_mode)
            a = np.asarray(im, dtype=np.uint8)
            return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()  # (C, H, W), own memory
    except Exception as e:  # Pillow raises many types for unreadable or missing files
        name = f"({len(source)} bytes)" if isinstance(source, bytes) else str(source)
        raise UnreadableImageError(f"cannot read image {name}: {_reason(e)}", e) from None


def resize_image(image: np.ndarray, size: tuple[int, int], *, resize_mode: str = "resize") -> np.ndarray:
    """A uint8 (C, H, W) array resized to (H, W) with Pillow's bicubic filter, as `decode_image` resizes."""
    assert resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}"
    hwc = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    a = np.asarray(_resized(Image.fromarray(hwc), size, resize_mode))
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()


def image_header(path: str | Path) -> tuple[tuple[int, int], str]:
    """(H, W) after the EXIF orientation and Pillow mode of an image file, from its header only."""
    try:
        with refusing_decompression_bombs(), Image.open(path) as im:
            return ((im.size[0], im.size[1]) if _turned(im) else (im.size[1], im.size[0])), im.mode
    except Exception as e:
        raise UnreadableImageError(f"cannot read image {path}: {_reason(e)}", e) from None


def uniform_images(images: list[tuple[object, np.ndarray]], size: tuple[int, int] | None, in_chans: int | None,
                   where, resize_mode: str) -> list[tuple[object, np.ndarray]]:
    """(key, (C, H, W) array) pairs brought to one size and channel count: without a size, the most
    common one (the others resized, with a warning); without channels, 3 unless all are grayscale."""
    if size is None:
        shapes = Counter(a.shape[1:] for _, a in images)
        size = shapes.most_common(1)[0][0]
        if len(shapes) > 1:
            log.warning("%s: images of %d sizes; resizing all to the most common, %dx%d (--img-size chooses)",
                        where, len(shapes), size[0], size[1])
            images = [(k, a if a.shape[1:] == size else resize_image(a, size, resize_mode=resize_mode))
                      for k, a in images]
    if in_chans is None and any(a.shape[0] == 3 for _, a in images):
        images = [(k, a if a.shape[0] == 3 else np.repeat(a, 3, axis=0)) for k, a in images]
    return images


def _decode_or_reason(source, size, channels, resize_mode) -> np.ndarray | str:
    try:
        return decode_image(source, size=size, channels=channels, resize_mode=resize_mode)
    except UnreadableImageError as e:
        return f"{type(e.cause).__name__}: {e.cause}"


def _decode_chunk(items: list, size: tuple[int, int] | None, channels: int | None, resize_mode: str) -> list:
    return [_decode_or_reason(x, size, channels, resize_mode) for x in items]


def decode_images(items: list[bytes | str], *, size: tuple[int, int] | None, channels: int | None,
                  progress: bool, resize_mode: str = "resize") -> list[np.ndarray | str]:
    """`decode_image` of every item, in order, in worker processes when there are many; an unreadable
    image gives its reason ("ExceptionType: message") in place of the array."""
    from tqdm import tqdm
    chunk = 500
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    work = functools.partial(_decode_chunk, size=size, channels=channels, resize_mode=resize_mode)
    workers = min(2, os.cpu_count() or 1)
    # fork (not spawn) so workers start in milliseconds without importing torch again; they only run Pillow
    use_pool = workers > 1 and len(items) >= _POOL_MIN_IMAGES and "fork" in multiprocessing.get_all_start_methods()
    out: list = []
    # disable=None: only on a terminal, so that logs and one-line errors stay free of carriage returns
    with tqdm(total=len(items), desc="decoding images", unit="img", file=sys.stderr,
              disable=None if progress else True, leave=False) as bar:
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
