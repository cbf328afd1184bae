"""Image files to uint8 (C, H, W) arrays: the one decoder of datasets, streamed batches and `cct predict`.

`decode_image` turns the bytes or the path of a file in any format and mode Pillow reads into the
pixels a model sees: palette images go through RGBA, then the image is converted to RGB or to
ITU-R 601-2 luma (alpha dropped, CMYK and YCbCr converted) and resized with Pillow's bicubic filter;
JPEGs first shrink while decoding through libjpeg's draft mode. Because the in-memory dataset, the
streamed one and prediction all call it, the three see the same pixels.

Images larger than Pillow's `MAX_IMAGE_PIXELS` are refused from their header, never decoded.
`decode_images` decodes many in worker processes for the in-memory path.
"""
from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .sources import DataError

# Pillow modes that hold no colour: with channels=None these decode as 1 channel
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
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
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__


def decode_image(source: bytes | str | Path, *, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """One image as a uint8 (C, H, W) array.

    Args:
        source: the file's bytes, or its path.
        size: (H, W) to resize to (Pillow's bicubic), None for the native size.
        channels: 1 (luma) or 3 (RGB); None: 1 for images of a grayscale mode, else 3.

    Raises:
        UnreadableImageError (a `DataError`) naming the file and Pillow's or the system's reason.
    """
    assert channels in (None, 1, 3), f"channels must be 1, 3 or None, got {channels}"
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    try:
        with refusing_decompression_bombs(), Image.open(io.BytesIO(source) if isinstance(source, bytes)
                                                        else source) as im:
            if size is not None and im.format == "JPEG":
                im.draft(mode or im.mode, (size[1], size[0]))  # let libjpeg shrink large photos while decoding
            if im.mode == "P" or im.mode == "PA":
                im = im.convert("RGBA")
            target = mode or ("L" if im.mode in GRAY_MODES else "RGB")
            im = im.convert(target)  # RGBA → RGB drops alpha, CMYK/YCbCr convert, RGB → L is ITU-R 601-2
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
            return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()  # (C, H, W), own memory
    except Exception as e:  # Pillow raises many types for unreadable or missing files
        name = f"({len(source)} bytes)" if isinstance(source, bytes) else str(source)
        raise UnreadableImageError(f"cannot read image {name}: {_reason(e)}", e) from None


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 (C, H, W) array resized to (H, W) with Pillow's bicubic filter, as `decode_image` resizes."""
    hwc = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    a = np.asarray(Image.fromarray(hwc).resize((size[1], size[0]), Image.BICUBIC))
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()


def image_header(path: str | Path) -> tuple[tuple[int, int], str]:
    """(H, W) and Pillow mode of an image file, from its header only."""
    try:
        with refusing_decompression_bombs(), Image.open(path) as im:
            return (im.size[1], im.size[0]), im.mode
    except Exception as e:
        raise UnreadableImageError(f"cannot read image {path}: {_reason(e)}", e) from None


def _decode_or_reason(source, size, channels) -> np.ndarray | str:
    try:
        return decode_image(source, size=size, channels=channels)
    except UnreadableImageError as e:
        return f"{type(e.cause).__name__}: {e.cause}"


def _decode_chunk(items: list, size: tuple[int, int] | None, channels: int | None) -> list:
    return [_decode_or_reason(x, size, channels) for x in items]


def decode_images(items: list[bytes | str], *, size: tuple[int, int] | None, channels: int | None,
                  progress: bool) -> list[np.ndarray | str]:
    """`decode_image` of every item, in order, in worker processes when there are many; an unreadable
    image gives its reason ("ExceptionType: message") in place of the array."""
    from tqdm import tqdm
    chunk = 500
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    work = functools.partial(_decode_chunk, size=size, channels=channels)
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
