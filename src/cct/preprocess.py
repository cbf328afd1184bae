"""How an image model's inputs are prepared and how it is evaluated: one record, stored with the model.

`cct train` writes a `Preprocessing` under a checkpoint's "eval" key and `cct export` into an ONNX
model's metadata; `cct eval`, `cct predict`, `cct export` and `cct explain` read it back, so a
prediction sees exactly what training and evaluation saw. Images (uint8, any size) become the
model's float input as in training: x / 255, then (x - mean) / std per channel when a normalisation
is recorded. Files are resized as training resized them: plainly, or keeping the aspect ratio and
cropping the centre (`resize_mode`, `cct.decode.decode_image`); records written before the choice
existed resized plainly. Checkpoints without a record get the recipe's usual input: x / 255 for
the Keras example's model (its `Rescaling(1 / 255)`), the CIFAR-10 statistics of the official
SHI-Labs recipe for the others.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .augment import normalize
from .safeload import read_checkpoint, state_dict_of, unwrap_keys
from .cifar import CIFAR_MEAN, CIFAR_STD
from .decode import RESIZE_MODES

RESIZE = "bicubic"  # as cct.decode resizes images
# the official recipes' statistics (SHI-Labs configs/datasets/*.yml), by the class count that names the dataset
OFFICIAL_STATS = {1000: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  102: ((0.4353, 0.3773, 0.2872), (0.2966, 0.2455, 0.2698)),
                  100: ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}


def _floats(values) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


def _head_rows(data: dict) -> int | None:
    """The class count of weights' head (cct's key or the official one, wrapped or not), None without one."""
    state = unwrap_keys(state_dict_of(data))
    for key in ("head.weight", "classifier.fc.weight"):
        if isinstance(w := state.get(key), torch.Tensor) and w.dim() == 2:
            return w.shape[0]
    return None


@dataclass(frozen=True)
class Preprocessing:
    """Input size, channels, how files are resized ("resize" or "crop") and normalisation (fractions
    of 255; None: x / 255), and the evaluation settings training recorded (precision, batch size,
    test-time augmentation: flip averaging, and with `tta_translate` shifted copies too)."""
    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    precision: str = "fp32"
    batch_size: int = 256
    tta: bool = False
    resize_mode: str = "resize"
    tta_translate: int = 0  # with tta: also the image shifted this many pixels (cct.evaluate.tta_logits)

    def __post_init__(self):
        assert self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}"
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        object.__setattr__(self, "mean", _floats(self.mean))
        object.__setattr__(self, "std", _floats(self.std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → float32 model input, computed as training computes it."""
        return normalize(images, self.mean, self.std)

    def to_dict(self) -> dict:
        """A self-explaining plain-data description: a checkpoint's "eval" entry, ONNX metadata."""
        return {"layout": "NCHW", "dtype": "float32", "img_size": list(self.img_size), "in_chans": self.in_chans,
                "channels": "L" if self.in_chans == 1 else "RGB", "resize": RESIZE, "resize_mode": self.resize_mode,
                "scale": 1 / 255,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "formula": "x = pixel / 255, then (x - mean) / std per channel when mean is not null",
                "output": "logits (no softmax)", "precision": self.precision, "batch_size": self.batch_size,
                "tta": self.tta, "tta_translate": self.tta_translate}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From `to_dict()`'s output, or from the shorter "eval" entry of checkpoints before it."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def of_weights(cls, path: str | Path, *, in_chans: int, keras: bool = False) -> "Preprocessing":
        """What a weights file was trained with: a cct checkpoint's record; x / 255 for the Keras example's
        model (its `.weights.h5`, or `keras=True` for a state dict of it); for other weights, the statistics of
        the official recipe of the dataset their head's size names (`OFFICIAL_STATS`: 1,000 classes ImageNet's,
        102 Flowers-102's, 100 CIFAR-100's), else CIFAR-10's."""
        data = {"config": {"block": "keras"}} if keras or Path(path).suffix == ".h5" else read_checkpoint(path)
        if not data.get("eval") and "block" not in (data.get("config") or {}):  # not trained by `cct train`
            stats = OFFICIAL_STATS.get(_head_rows(data))
            if stats and len(stats[0]) == in_chans:
                return cls.from_dict({"img_size": (32, 32), "in_chans": in_chans, "mean": stats[0], "std": stats[1]})
        return cls.from_checkpoint({**data, "config": {"in_chans": in_chans, **(data.get("config") or {})}})

    @classmethod
    def from_checkpoint(cls, data: dict) -> "Preprocessing":
        """The record of a checkpoint (`cct.checkpoint.read_checkpoint`'s dict), else the recipe's default."""
        recorded = dict(data.get("eval") or {})
        config = data.get("config") or {}
        in_chans = int(recorded.get("in_chans") or config.get("in_chans", 3))
        if "mean" not in recorded:  # not trained by `cct train`
            mean, std = (None, None) if config.get("block") == "keras" else (CIFAR_MEAN, CIFAR_STD)
            if len(mean or ()) != in_chans:
                mean, std = None, None
            recorded.update(mean=mean, std=std)
        recorded["img_size"] = recorded.get("img_size") or config.get("img_size") or (32, 32)
        recorded["in_chans"] = in_chans
        return cls.from_dict(recorded)
