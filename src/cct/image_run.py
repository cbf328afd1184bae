"""The data phase of `cct train` for images: load and split, the normalisation, the input record.

`image_inputs` returns the `cct.kinds.RunInputs` of an image run: the seeded, stratified training and
validation sets (`cct.data.split`), the test split, the `Preprocessing` record saved in every
checkpoint (its normalisation measured on the training split, or the recorded one when resuming),
and the recipe's augmentation (`cct.step.augment_config`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import distributed, holdout
from . import data as data_mod
from .cifar import CIFAR_MEAN, CIFAR_STD
from .data import Dataset, ImageSet
from .errors import CCTError, CheckpointError
from .evaluate import check_tta_shift
from .kinds import RunInputs
from .preprocess import Preprocessing
from .recipes import TrainConfig
from .registry import get_config, model_kind, model_with_weights
from .runfiles import log
from .safeload import read_checkpoint, state_dict_of
from .step import augment_config

# a side beyond which images' own size is refused as the model's (photos: 2000x1500 would be a million-token grid);
# --img-size still asks for any size
MAX_NATIVE_SIDE = 512


def weights_in_chans(path: str | Path) -> int | None:
    """The input channels weights take (the first convolution's, or a cct checkpoint's config); None if unknown.
    Reading the file here, before any image is decoded, also finds a missing or damaged --pretrained early."""
    if Path(path).suffix == ".h5":
        return 3  # the Keras example's RGB
    data = read_checkpoint(path)
    if data.get("config_class") == "TextConfig":
        return None  # a text model's: load_pretrained says so
    if isinstance((data.get("config") or {}).get("in_chans"), int):
        return data["config"]["in_chans"]
    state = state_dict_of(data)
    convs = [v for k, v in state.items() if isinstance(k, str) and "tokenizer." in k and isinstance(v, torch.Tensor)
             and v.dim() == 4]
    return convs[0].shape[1] if convs and convs[0].shape[1] in (1, 3) else None


def pretrained_image_model(name: str, path: str | Path, classes: list[str], *, quiet: bool, **overrides) -> nn.Module:
    """`create_model(name, pretrained=path, **overrides)` for the data's `classes`, saying what was adapted: the
    settings a cct checkpoint was built with, a head for other classes, a resized positional embedding."""
    notes = []
    model = model_with_weights(name, path, class_names=classes, notes=notes, **overrides)
    for note in notes:
        log(quiet, f"--pretrained: {note}")
    return model


def _load_data(cfg: TrainConfig, dataset: Dataset | None, quiet: bool) -> tuple[Dataset, ImageSet, ImageSet | None]:
    if dataset is None:
        try:
            in_chans = cfg.in_chans or (weights_in_chans(cfg.pretrained) if cfg.pretrained else None)
        except CheckpointError as e:
            raise CCTError(f"--pretrained: {e}") from None
        if in_chans == 1 and cfg.in_chans is None:
            log(quiet, "--pretrained: its weights take 1 channel, so the images are read as grayscale (--in-chans)")
        if cfg.pretrained and model_kind(cfg.model) == "image":  # weights that do not fit: said now, not after decoding
            model_with_weights(cfg.model, cfg.pretrained, **({"in_chans": in_chans} if in_chans else {}),
                               **({"img_size": cfg.img_size} if cfg.img_size else {}))
        with distributed.main_process_first():  # rank 0 decodes and caches; the others then read the cache
            dataset = data_mod.load(cfg.data, img_size=cfg.img_size, in_chans=in_chans,
                                    skip_bad_images=cfg.skip_bad_images, progress=not quiet, stream=cfg.stream,
                                    threshold=cfg.stream_threshold, workers=cfg.loader_workers,
                                    processes_per_machine=distributed.env_from_environ().local_world_size,
                                    resize_mode=cfg.resize_mode, test_split=cfg.test_split, seed=cfg.seed)
    train_set, val_set = data_mod.split(dataset, train_limit=cfg.train_limit, val_split=cfg.val_split, seed=cfg.seed)
    if len(train_set.labels) == 0:
        raise CCTError(f"{cfg.data}: no training images")
    return dataset, train_set, val_set


def _mean_std(cfg: TrainConfig, train_images: torch.Tensor, quiet: bool) -> tuple[tuple | None, tuple | None]:
    """The normalisation as fractions of 255 (None: x / 255), recorded in every checkpoint."""
    channels = train_images.shape[1]
    if cfg.normalize == "pretrained":  # what the weights were trained with (`Preprocessing.of_weights`)
        prep = Preprocessing.of_weights(cfg.pretrained, in_chans=channels,
                                        keras=model_kind(cfg.model) == "image" and get_config(cfg.model).block == "keras")
        log(quiet, "--pretrained: inputs normalised as its weights were trained: " + (
            f"mean {', '.join(map(str, prep.mean))}, std {', '.join(map(str, prep.std))}" if prep.mean else "x / 255")
            + " (--normalize dataset: the data's own)")
        return prep.mean, prep.std
    if cfg.normalize == "none":
        return None, None
    if cfg.normalize == "cifar":
        if channels != len(CIFAR_MEAN):
            raise CCTError(f"--normalize cifar needs {len(CIFAR_MEAN)}-channel images, the data has {channels}; "
                           "use --normalize dataset")
        return tuple(CIFAR_MEAN), tuple(CIFAR_STD)
    sums = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in train_images.split(4096):
        x = chunk.double() / 255
        sums += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    n = train_images.shape[0] * train_images.shape[2] * train_images.shape[3]
    mean = sums / n
    std = (squares / n - mean ** 2).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def image_inputs(cfg: TrainConfig, dataset: Dataset | None, *, checkpoint: dict | None, precision: str,
                  quiet: bool) -> RunInputs:
    """The data phase for images: load and split, the normalisation (the recorded one when resuming, even if
    "dataset" statistics would now differ), the input record and the augmentation."""
    dataset, train_set, val_set = _load_data(cfg, dataset, quiet)
    recorded, now = (checkpoint or {}).get("split"), dataset.split_record
    if recorded and now and not holdout.same_split(recorded, now):  # resumed on a changed source
        raise CCTError(f"{cfg.data} changed since the run held its {len(recorded.get('test_files', []))} test images "
                       f"out of it ({recorded.get('num_files', '?')} files then, {now['num_files']} now): a new split "
                       "would put images the run trained on in its test set; resume on the files as they were, or "
                       "start a new run")
    in_chans, height, width = tuple(train_set.images.shape[1:])
    if max(height, width) > MAX_NATIVE_SIDE and not cfg.img_size and checkpoint is None:
        raise CCTError(f"{cfg.data}: its images are {height}x{width}, and without --img-size the model is built for "
                       "that size, too large to train (attention over its tokens); give a size, e.g. --img-size 64 "
                       "(--resize-mode crop keeps the aspect ratio)")
    if cfg.tta:
        check_tta_shift(cfg.tta_translate, (height, width))
    if cfg.restore_best and val_set is None and checkpoint is None:
        log(quiet, "no validation split (--val-split 0): the run tests its last weights (--restore-best needs one)")
    if checkpoint is None:
        mean, std = _mean_std(cfg, train_set.images, quiet)
    else:
        mean, std = (tuple(v) if v else None for v in (checkpoint["eval"]["mean"], checkpoint["eval"]["std"]))
    prep = Preprocessing((height, width), in_chans, mean, std, precision=precision, batch_size=cfg.eval_batch_size,
                         tta=cfg.tta, tta_translate=cfg.tta_translate if cfg.tta else 0, resize_mode=cfg.resize_mode)
    return RunInputs(kind="image", classes=list(dataset.classes), train_set=train_set, val_set=val_set,
                     test_set=dataset.test, prep=prep, aug_cfg=augment_config(cfg, mean, std),
                     model_overrides=dict(in_chans=in_chans, img_size=(height, width)), skipped=dataset.skipped,
                     split_record=dataset.split_record)
