"""Input kinds: what a batch of inputs is, how training augments it, how evaluation prepares it.

The training loop (`cct.train`), the step (`cct.step`), evaluation (`cct.evaluate`) and checkpoints
(`cct.checkpoint`) work on batches of (inputs, labels) and a model config; what depends on what the
inputs *are* sits behind one kind:

| what                          | image                                     | text                                       |
|-------------------------------|-------------------------------------------|--------------------------------------------|
| a `--data` of this kind       | `detect_kind`: CIFAR, archives, images    | `detect_kind`: TREC, text tables, JSON     |
| a split                       | `cct.data.ImageSet`: uint8 (N, C, H, W)   | `TextSet`: a `TokenBatch` (ids + mask)     |
| training augmentation         | `augment_images` (`cct.policies`)         | `augment_tokens` (token dropout)           |
| its configuration             | `cct.policies.AugmentConfig`              | `TextAugmentConfig`                        |
| evaluation's input record     | `cct.preprocess.Preprocessing`            | `TextPreprocessing`                        |
| model and config              | `cct.model.CCT`, `CCTConfig`              | `cct.text_model.TextCCT`, `TextConfig`     |
| data phase of `train()`       | `cct.image_run.image_inputs`              | `cct.text_run.text_inputs`                 |

How a new kind plugs in:
1. A split class with `inputs` (rows taken by `inputs[index_tensor]`, batches by
   `inputs.split(n)`), int64 `labels`, `len()` and `subset(indices)`; `cct.data.split` then draws
   the seeded, stratified `--train-limit` and `--val-split` subsets, and `cct.data.load_batches`
   batches it.
2. An augmentation function `augment(inputs, labels, generator, aug_cfg, *, num_classes, mix) ->
   (model_args, targets)` for its config dataclass, entered in `AUGMENTERS`: `TrainStep` moves
   `model_args` (a tuple of tensors) to the device and calls `model(*model_args)`.
3. An input record (frozen dataclass) with `model_args(batch)`, `precision`, `batch_size`, `tta`,
   and `to_dict()` with a "kind" entry, read back by `preprocessing_from_checkpoint`: training
   stores it in every checkpoint under "eval", and `cct eval` evaluates through it.
4. A model class with the timm interface and a config dataclass (`to_dict`/`from_dict`), named in
   `cct.registry` and in `cct.checkpoint.MODEL_CLASSES`.
5. A data phase returning `RunInputs`, chosen in `cct.train` by `data_kind`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .augment import mixup_target, numpy_rng
from .errors import CCTError
from .policies import AugmentConfig, augment_batch
from .preprocess import Preprocessing
from .registry import model_kind
from .sources import image_table_delimiter, is_image_name, split_name
from .text_data import JSON_SUFFIXES, TABLE_SUFFIXES, TREC_FILES, is_text_file, json_split
from .tokenizer import PAD_ID, UNK_ID

KINDS = ("image", "text")
DATA_KINDS = ("auto",) + KINDS
FGM_NORMS = ("table", "text")  # what an FGM move's length is measured over (TextAugmentConfig.fgm_norm)


# ---------------------------------------------------------------------- text inputs
@dataclass
class TokenBatch:
    """Token ids (N, L) padded with [PAD] and their mask (N, L), True for real tokens (left-aligned).
    `aux`: training only, the texts' labels for a model's second head (`--fine-aux`), int64 (N,), -1 for none."""
    ids: torch.Tensor
    mask: torch.Tensor
    aux: torch.Tensor | None = None

    def __post_init__(self):
        assert self.ids.dtype == torch.int64 and self.mask.dtype == torch.bool and self.ids.shape == self.mask.shape
        assert self.aux is None or (self.aux.dtype == torch.int64 and self.aux.shape == self.ids.shape[:1])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> "TokenBatch":
        return TokenBatch(self.ids[rows], self.mask[rows], None if self.aux is None else self.aux[rows])

    def split(self, size: int) -> list["TokenBatch"]:
        auxes = self.aux.split(size) if self.aux is not None else itertools.repeat(None)
        return [TokenBatch(i, m, a) for i, m, a in zip(self.ids.split(size), self.mask.split(size), auxes)]

    def trimmed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) cut to the batch's longest text: the models ignore padding, so only the cost changes."""
        length = max(1, int(self.mask.sum(1).max())) if len(self) else 1
        return self.ids[:, :length], self.mask[:, :length]


@dataclass
class TextSet:
    """One split of a text data set, tokenized: `inputs` a `TokenBatch`, `labels` int64 (N,)."""
    inputs: TokenBatch
    labels: torch.Tensor

    def __post_init__(self):
        assert self.labels.dtype == torch.int64 and self.labels.shape == (len(self.inputs),)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "TextSet":
        return TextSet(self.inputs[indices], self.labels[indices].contiguous())


@dataclass(frozen=True)
class TextPreprocessing:
    """A text model's input record (a checkpoint's "eval" entry): texts become `model.tokenizer.encode(texts,
    seq_len=seq_len)` (longer texts keep their first `seq_len` tokens), evaluated at `precision` in batches
    of `batch_size`. The tokenizer itself is the checkpoint's "tokenizer" entry."""
    seq_len: int
    precision: str = "fp32"
    batch_size: int = 256
    tta: bool = False  # test-time augmentation is an image notion: always off

    def __post_init__(self):
        assert self.seq_len >= 1, f"seq_len must be positive, got {self.seq_len}"
        assert not self.tta, "test-time augmentation (--tta) is for image models"

    def model_args(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.trimmed()

    def to_dict(self) -> dict:
        return {"kind": "text", "inputs": ["token_ids", "mask"], "token_ids": "int64 (batch, length), [PAD] = "
                f"{PAD_ID}, [UNK] = {UNK_ID}", "mask": "bool (batch, length), True for real tokens",
                "seq_len": self.seq_len, "tokenizer": "the checkpoint's 'tokenizer' entry (cct.tokenizer JSON)",
                "truncation": "texts longer than seq_len tokens keep their first seq_len",
                "output": "logits (no softmax)", "precision": self.precision, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, d: dict) -> "TextPreprocessing":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def preprocessing_from_checkpoint(data: dict) -> Preprocessing | TextPreprocessing:
    """The input record of a checkpoint (`cct.checkpoint.read_checkpoint`'s dict), of its model's kind."""
    recorded = data.get("eval") or {}
    if recorded.get("kind") == "text" or data.get("config_class") == "TextConfig":
        seq_len = recorded.get("seq_len") or (data.get("config") or {}).get("seq_len", 64)
        return TextPreprocessing.from_dict({**recorded, "seq_len": int(seq_len)})
    return Preprocessing.from_checkpoint(data)


def model_args(prep: Preprocessing | TextPreprocessing, batch) -> tuple[torch.Tensor, ...]:
    """The model's positional arguments for one batch of a split's `inputs`."""
    return prep.model_args(batch) if isinstance(prep, TextPreprocessing) else (prep(batch),)


# ---------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class TextAugmentConfig:
    """Text augmentation: each real token becomes [UNK] with probability `token_dropout` (0: off); word
    mixup with the reversed batch, λ ~ Beta(mixup_alpha, mixup_alpha) per batch (0: off), its soft targets
    label-smoothed by `label_smoothing` as timm's Mixup does for images. `fgm` > 0: adversarial word vectors
    (FGM, Miyato et al. 2017), applied by `cct.step.TrainStep`, since they need the batch's gradient; the
    move is `fgm` long over the word-vector table (`fgm_norm` "table") or over each text's own word vectors
    ("text"). `vat` > 0: virtual adversarial training (Miyato et al. 2017), also applied by the step: each
    text's word vectors move `vat` in the direction that changes the predictions most, and the step also trains
    on the KL divergence between the clean and the moved predictions.
    `fine_aux` > 0: batches carrying fine labels (`TokenBatch.aux`) also train the model's second head, the
    step's loss plus `fine_aux` × that head's."""
    token_dropout: float = 0.0
    mixup_alpha: float = 0.0
    label_smoothing: float = 0.0
    fgm: float = 0.0
    fgm_norm: str = "table"
    vat: float = 0.0
    fine_aux: float = 0.0

    def __post_init__(self):
        assert 0.0 <= self.token_dropout < 1.0, f"token_dropout must be in [0, 1), got {self.token_dropout}"
        assert self.mixup_alpha >= 0.0, f"mixup_alpha must be non-negative, got {self.mixup_alpha}"
        assert 0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"
        assert self.fgm >= 0.0, f"fgm must be non-negative, got {self.fgm}"
        assert self.fgm_norm in FGM_NORMS, f"fgm_norm must be one of {FGM_NORMS}, got {self.fgm_norm!r}"
        assert self.vat >= 0.0, f"vat must be non-negative, got {self.vat}"
        assert self.fine_aux >= 0.0, f"fine_aux must be non-negative, got {self.fine_aux}"


def augment_images(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, aug_cfg: AugmentConfig,
                   *, num_classes: int, mix: bool = True) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """uint8 images → ((the normalised, augmented batch,), targets): `cct.policies.augment_batch`."""
    x, targets = augment_batch(images, labels, generator, aug_cfg, num_classes=num_classes, mix=mix)
    return (x,), targets


def augment_tokens(batch: TokenBatch, labels: torch.Tensor, generator: torch.Generator, aug_cfg: TextAugmentConfig,
                   *, num_classes: int, mix: bool = True) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A `TokenBatch` → ((ids, mask) cut to the longest text, token dropout applied), labels), or with word
    mixup on (and `mix`) → ((ids, mask, λ), soft targets): the model mixes the word vectors (`TextCCT`)."""
    ids, mask = batch.trimmed()
    if aug_cfg.token_dropout > 0:
        drop = torch.rand(ids.shape, generator=generator) < aug_cfg.token_dropout
        ids = ids.masked_fill(drop & mask, UNK_ID)
    if aug_cfg.mixup_alpha > 0 and mix:
        lam = float(numpy_rng(generator).beta(aug_cfg.mixup_alpha, aug_cfg.mixup_alpha))
        targets = mixup_target(labels, num_classes, lam, aug_cfg.label_smoothing)
        return (ids, mask, torch.tensor(lam)), targets
    return (ids, mask), labels


# the augmentation function of each kind, by its configuration's type
AUGMENTERS: dict[type, Callable] = {AugmentConfig: augment_images, TextAugmentConfig: augment_tokens}


def augmenter(aug_cfg) -> Callable:
    assert type(aug_cfg) in AUGMENTERS, f"no augmentation for {type(aug_cfg).__name__}"
    return AUGMENTERS[type(aug_cfg)]


# ---------------------------------------------------------------------- the data phase's result
@dataclass
class RunInputs:
    """What the data phase of `cct.train.train` hands to the rest of the run, whatever the kind."""
    kind: str
    classes: list[str]
    train_set: Any  # ImageSet, StreamImageSet or TextSet
    val_set: Any | None
    test_set: Any | None
    prep: Preprocessing | TextPreprocessing  # saved in every checkpoint as "eval"
    aug_cfg: AugmentConfig | TextAugmentConfig
    model_overrides: dict  # `create_model` overrides the data decides (image size, vocabulary, ...)
    skipped: int = 0  # bad examples skipped while loading
    split_record: dict | None = None  # class folders and CSVs: the recorded test split (`cct.holdout`)
    results: dict = field(default_factory=dict)  # extra results.json entries
    setup_model: Callable[[nn.Module], None] | None = None  # once built (text: attach the tokenizer)
    precision: str | None = None  # where the data phase settles --precision auto (text: `trial_precision`)


# ---------------------------------------------------------------------- telling text from images
def _table_names_images(path: Path) -> bool:
    """Whether a CSV is the own-data `path,label` (or `label,path`) layout (`image_table_delimiter`)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:  # unreadable: the OSError names it
        text = f.read(1 << 16)  # enough for the first rows
    return image_table_delimiter(path, text) is not None


def _split_kind(split: Path) -> str | None:
    """"text" or "image" by which files the class folders hold more of (a photo folder may carry a credits.txt,
    and a text folder a picture; up to 200 files a folder, enough to tell), None when neither."""
    texts = images = 0
    for class_dir in (p for p in split.iterdir() if p.is_dir()):
        for file in itertools.islice(class_dir.iterdir(), 200):
            texts += is_text_file(file.name) and file.is_file()
            images += is_image_name(file.name)
    return None if texts == images == 0 else "text" if texts > images else "image"


def detect_kind(source: str | Path) -> str | None:
    """"text", "image", or None when nothing known is found, judged by what `source` holds.

    Text: TREC `.label` files, JSON Lines (`.jsonl`, `.ndjson`, `.json`), CSV/TSV tables whose cells name no image
    files, folders of `.txt` files per class. Image: the CIFAR names and archives, tables naming image files, folders
    of images. A table that cannot be read raises its OSError, naming it.
    """
    if str(source) in ("cifar10", "cifar100"):
        return "image"
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".label" or suffix in JSON_SUFFIXES:
            return "text"
        if suffix in TABLE_SUFFIXES:
            return "image" if _table_names_images(path) else "text"
        if path.name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
            return "image"
        return None
    if not path.is_dir():
        return None
    if any((path / name).is_file() for name in TREC_FILES) or json_split(path, "train"):
        return "text"
    for suffix in TABLE_SUFFIXES:
        if (path / f"train{suffix}").is_file():
            return "image" if _table_names_images(path / f"train{suffix}") else "text"
    train = [p for p in path.iterdir() if p.is_dir() and split_name(p.name) == "train"]  # train/, Train/, ...
    if train:
        return _split_kind(train[0])
    if _split_kind(path) == "image":  # flat class folders of images (text ones need train/ and test/)
        return "image"
    if (path / "data_batch_1").is_file() or (path / "train").is_file():  # CIFAR's python folders
        return "image"
    return None


def data_kind(data: str, requested: str, model: str) -> str:
    """The kind of `--data`: `requested` ("image"/"text"), else judged by what it holds (`detect_kind`),
    else the model's. A model of the other kind is a one-line `CCTError`."""
    assert requested in DATA_KINDS, f"data kind must be one of {DATA_KINDS}, got {requested!r}"
    wanted = model_kind(model)
    kind = requested if requested != "auto" else (detect_kind(data) or wanted)
    if kind != wanted:
        how = "--data-kind" if requested != "auto" else "what it holds"
        raise CCTError(f"--model {model} is {'a text' if wanted == 'text' else 'an image'} model, but --data "
                       f"{Path(data).name or data} is {kind} data (by {how}): choose {'a text' if kind == 'text' else 'an image'} "
                       "model")
    return kind
