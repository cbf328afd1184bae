"""Training configuration: `TrainConfig`, the named recipes, and their validation.

Recipes are data: a name → `TrainConfig` overrides.
* `keras`: the keras.io CCT example (https://keras.io/examples/vision/cct/): AdamW(1e-3, weight
  decay 1e-4 on every variable, epsilon 1e-7), label smoothing 0.1, batch 128, 30 epochs, a 10%
  validation split, horizontal flips, images scaled to [0, 1], and the best-validation weights
  restored before the test evaluation. Its RandomCrop(32, 32) on 32×32 images is the identity, so
  there is nothing to reproduce. One deliberate difference: Keras's `validation_split` takes the
  last 10% of the arrays unshuffled; we take a seeded, stratified 10%. On a CPU it runs one process
  per core (`procs=0`): the same global batch and gradient, faster for this model (`cct.distributed`).
* `paper`: SHI-Labs' `configs/pretrained/cct_7-3x1_cifar10_300epochs.yml` run by timm's trainer:
  AdamW 5.5e-4, weight decay 6e-2 on weights only, 10 warm-up epochs from 1e-5, cosine to 1e-5 over
  300 epochs then 10 cooldown epochs, RandomResizedCrop(0.8, 1) with a random interpolation, flips,
  RandAugment rand-m9-mstd0.5-inc1, MixUp 0.8 / CutMix 1.0 (batch mode, switch 0.5) until epoch 175,
  label smoothing 0.1, CIFAR mean/std. timm updates this schedule once per epoch; `lr_at` is the same
  curve evaluated per step. The official run selects the best epoch on the test set; we train on the
  whole training set and report the last epoch (add `--val-split 0.1` for validation curves).
* `fast`: warm-up + cosine, Muon for the hidden matrices (`cct.optim`), flips and 2-px translations,
  progressive resizing (half, then three quarters of the input size before the full size), bf16 where
  the CPU runs it fast, no validation split; `--time-budget MINUTES` sizes the run to the budget.
* `text` (the default for `text_*` models): AdamW with warm-up + cosine, label smoothing, word mixup,
  adversarial word vectors (FGM); batch size, epochs and the rest chosen on validation splits of TREC's
  training file, never its test file (benchmarks/README.md); the run then trains on the whole training
  file and tests its last epoch (`--val-split 0.1` for validation curves).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .decode import RESIZE_MODES
from .errors import CCTError
from .kernels import KERNELS
from .kinds import DATA_KINDS, FGM_NORMS
from .registry import get_config, model_kind
from .text_data import LABEL_LEVELS
from .tokenizer import KINDS as TOKENIZERS
from .runtime import DEVICES, PRECISIONS


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


NORMALIZATIONS = ("none", "cifar", "dataset", "pretrained")


@dataclass
class TrainConfig:
    """Everything that defines a run; every field but the first four is a `cct train` flag."""
    model: str = "cct_2_3x2_32_keras"
    data: str = ""
    out: str = ""
    recipe: str = "keras"
    # schedule and optimiser
    epochs: int = _f(30, "epochs in all, cooldown included (with --time-budget, which sets the length: the length "
                                "that the warm-up, cooldown and --mix-off-epoch are shares of)")
    batch_size: int = _f(128, "global batch size (split across processes when distributed)")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule")
    warmup_lr: float = _f(0.0, "learning rate at the first warm-up step")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (at most half the run's steps; config.json's "
                                   "warmup_steps is what ran)")
    cooldown_epochs: float = _f(0.0, "epochs at min_lr after the cosine (included in --epochs; at most a quarter of "
                                     "the run's steps, config.json's cooldown_steps)")
    schedule: str = _f("constant", "learning-rate schedule after the warm-up", choices=("constant", "cosine"))
    optimizer: str = _f("adamw", "adamw; or muon: Muon for the transformer's and the tokenizer's hidden matrices, "
                                 "AdamW for the rest, one learning rate (cct.optim)", choices=("adamw", "muon"))
    weight_decay: float = _f(1e-4, "decoupled weight decay (AdamW)")
    weight_decay_all: bool = _f(True, "decay every parameter (Keras) instead of weights only (timm)")
    eps: float = _f(1e-7, "AdamW epsilon")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy")
    lookahead: bool = _f(False, "airbench's lookahead (cct.optim.Lookahead): every 5 steps the weights move to a slow "
                                "copy that follows them ever more slowly as the run's planned steps pass, and end as "
                                "that copy")
    # data
    val_split: float = _f(0.1, "fraction of the training set held out (seeded, stratified), in [0, 1)")
    train_limit: int | None = _f(None, "use at most this many training images")
    test_split: float = _f(0.2, "sources without a test set (flat class folders, CSVs, a text file): the fraction "
                                "of each class held out as the test set (seeded, stratified, recorded in the run for "
                                "`cct eval`)")
    img_size: int | None = _f(None, "resize images to this size (default: the data's own)")
    resize_mode: str = _f("resize", "resize: to --img-size, aspect ignored; crop: the short side to --img-size, "
                                    "then the centre", choices=RESIZE_MODES)
    in_chans: int | None = _f(None, "1 (grayscale) or 3 (RGB) input channels (default: the data's)")
    num_classes: int | None = _f(None, "classifier outputs (default: the data's number of classes)")
    drop_rate: float | None = _f(None, "dropout rate (default: the model's)")
    attn_drop_rate: float | None = _f(None, "attention dropout rate (default: the model's)")
    drop_path_rate: float | None = _f(None, "stochastic depth rate (default: the model's)")
    skip_bad_images: bool = _f(False, "skip undecodable images instead of failing")
    stream: bool | None = _f(None, "decode an image-folder tree from disk in loader processes (default: only when "
                                   "it would take more than --stream-threshold of the available memory)")
    stream_threshold: float = _f(0.25, "fraction of the available memory above which a tree is streamed")
    loader_workers: int = _f(4, "DataLoader processes decoding a streamed dataset, per training process")
    normalize: str = _f("none", "input normalisation: none (x/255), cifar mean/std, the training set's, or "
                                "the --pretrained weights' own", choices=NORMALIZATIONS)
    pretrained: str | None = _f(None, "start from these weights: a cct checkpoint or state dict, an official "
                                      "SHI-Labs .pth or the Keras example's .weights.h5 (a new head for another class "
                                      "count, the positional embedding resized to the input size); implies --recipe "
                                      "finetune for image models (text models: the official text .pth)")
    # augmentation (cct.augment)
    hflip: bool = _f(True, "random horizontal flips")
    alternate_flip: bool = _f(False, "with --hflip: airbench's derandomised flip instead of coin flips, a random half "
                                     "of the training images mirrored in the first epoch, then each image the other "
                                     "way to the epoch before (the fast recipe's; --no-hflip turns it off too)")
    translate: int = _f(0, "random translation by up to this many pixels (zero padded)")
    res_schedule: str | None = _f(None, "progressive resizing: train at reduced resolutions first, e.g. "
                                        "'0.5@0,0.75@0.4,1@0.7' (input scale@the fraction of the run's steps where "
                                        "it starts; the last at scale 1, the size evaluated; 1@0: full size "
                                        "throughout)")
    res_schedule_max_cost: float | None = _f(None, "with --time-budget: train at full size throughout instead of "
                                                   "--res-schedule when the budget's trial prices the schedule's "
                                                   "mean step above this fraction of a full-size step (where small "
                                                   "inputs save little, the extra steps do not repay the lost "
                                                   "resolution). The fast recipe's: 0.6, for its own schedule; "
                                                   "a --res-schedule given is kept unless this is given too")
    rrc_scale: tuple[float, float] | None = _f(None, "random-resized-crop area scale range, e.g. 0.8 1")
    rrc_interpolation: str = _f("random", "random-resized-crop interpolation", choices=("random", "bilinear", "bicubic"))
    rand_augment: str | None = _f(None, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (none: off)")
    auto_augment: bool = _f(False, "AutoAugment's CIFAR-10 policy")
    erasing: float = _f(0.0, "random-erasing probability")
    mixup_alpha: float = _f(0.0, "MixUp alpha (0: off); text models: word mixup, the word vectors of two texts mixed")
    cutmix_alpha: float = _f(0.0, "CutMix alpha (0: off)")
    mix_prob: float = _f(1.0, "probability of mixing a batch")
    switch_prob: float = _f(0.5, "probability of CutMix rather than MixUp when both are on")
    mix_mode: str = _f("batch", "MixUp/CutMix granularity", choices=("batch", "elem"))
    mix_off_epoch: int | None = _f(None, "stop MixUp/CutMix from this epoch on")
    mix_min_epochs: float | None = _f(None, "MixUp/CutMix only in runs planned for at least this many epochs "
                                            "(--epochs, or what fits --time-budget); a shorter run trains unmixed "
                                            "(mixing pays only once the run is long enough to fit the training set). "
                                            "The fast recipe's: 15; a --mixup-alpha, --cutmix-alpha or --mix-prob "
                                            "given is kept unless this is given too")
    # evaluation
    restore_best: bool = _f(True, "test the best-validation weights rather than the last ones")
    eval_batch_size: int = _f(256, "batch size of validation, test and `cct eval`")
    tta: bool = _f(False, "test-time augmentation (average with the flipped image, and the shifted views of "
                          "--tta-translate)")
    tta_translate: int = _f(0, "with --tta: also average the image shifted this many pixels up-left and down-right, "
                               "each with its mirror (0: off)")
    # runtime
    seed: int = _f(0, "seed of initialisation, split, shuffling and augmentation")
    precision: str = _f("auto", "compute precision (auto: bf16 where the CPU runs it natively, else fp32; for a "
                                "text model, the faster of the two in a trial of a few steps)", choices=PRECISIONS)
    device: str = _f("auto", "where to train", choices=DEVICES)
    kernels: str = _f("fast", "fast: the CPU kernels of cct.kernels (the same math, measured faster); native: those "
                              "and the float32 training attention core in C++, compiled on first use (cct.native; "
                              "a C++ compiler and ninja); reference: the plain layers of cct.layers", choices=KERNELS)
    workers: int = _f(0, "CPU threads for compute per process (0: torch's default; cores / processes under torchrun)")
    procs: int = _f(1, "data-parallel processes on this CPU, one thread each, each on its share of every batch "
                       "(0: one per core; the keras recipe's default)")
    time_budget: float | None = _f(None, "minutes of training, first step to last (validation included; data loading "
                                         "and the final test excluded): the run is sized to end within them, its "
                                         "warm-up, cooldown and --mix-off-epoch scaled with it")
    skip_nonfinite: bool = _f(False, "skip (and count) steps whose loss is not finite instead of stopping")
    log_interval: int = _f(20, "steps between progress-bar updates (each costs a device sync)")
    # text (cct.kinds, cct.text_run): what --data holds, its labels, the tokenizer and the text model's input
    data_kind: str = _f("auto", "what --data holds (auto: judged by its files)", choices=DATA_KINDS)
    label_level: str = _f("coarse", "TREC labels: coarse (6 classes) or fine (50)", choices=LABEL_LEVELS)
    tokenizer: str = _f("word", "text tokenizer, trained on the training split", choices=TOKENIZERS)
    vocab_size: int = _f(30_000, "most token ids of the tokenizer ([UNK] and [PAD] included); wordpiece and bpe "
                                 "keep every character of the training texts on top of it")
    min_frequency: int = _f(1, "training-split words seen fewer times become [UNK]")
    lowercase: bool = _f(True, "lower-case texts before tokenizing")
    unk_shapes: bool = _f(False, "an unknown word becomes one of three [UNK]s by its shape: with a digit, capitalised "
                                 "(not first), other (default: the text recipe's, on)")
    seq_len: int | None = _f(None, "tokens per text; longer texts are truncated (default: the model's, 64)")
    kernel_size: int | None = _f(None, "text models: the conv tokenizer's kernel (default: the text recipe's, 4)")
    word_vectors: str | None = _f(None, "GloVe/word2vec text file initialising the embedding rows of known words")
    token_dropout: float = _f(0.0, "text augmentation: probability of replacing each token by [UNK]")
    fgm: float = _f(0.0, "text models: adversarial word vectors (FGM, Miyato et al. 2017): each step also trains on "
                         "the batch with its word vectors moved this far (L2 norm) along the loss's gradient; two "
                         "forward and backward passes a step (0: off)")
    fgm_norm: str = _f("table", "text models, with --fgm: what the move's length is measured over: the word-vector "
                                "table (the batch's words move together, more where the loss is larger) or each "
                                "text's own word vectors (every text moves by --fgm, as Miyato et al.)",
                       choices=FGM_NORMS)
    vat: float = _f(0.0, "text models: virtual adversarial training (Miyato et al. 2017): each step also trains on "
                         "the KL divergence between the clean predictions and those with each text's word vectors "
                         "moved this far (L2 norm) in the direction one power iteration finds; no labels used; two "
                         "more passes a step (0: off)")
    embedding_std: float | None = _f(None, "text models: word vectors start N(0, std²) (default: the text recipe's, "
                                           "0.1; the official models' is 1)")
    fine_aux: float = _f(0.0, "text models on TREC (coarse labels): also train a second head on the fine labels, "
                              "its loss weighted by this; its vote in predictions is --fine-vote's (0: off; the "
                              "text recipe's 0.5 is used where the source has fine labels)")
    fine_vote: float = _f(0.0, "text models with --fine-aux's second head: predictions weigh that head's "
                               "probabilities, summed into the coarse classes, this many times the first head's "
                               "(0: the first head alone; the text recipe's 2.0 where the second head trains)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rrc_scale"] = list(self.rrc_scale) if self.rrc_scale else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("rrc_scale") is not None:
            d["rrc_scale"] = tuple(d["rrc_scale"])
        return cls(**d)


# name → TrainConfig overrides (on top of the dataclass defaults)
RECIPES: dict[str, dict] = {
    "keras": dict(epochs=30, batch_size=128, lr=1e-3, schedule="constant", weight_decay=1e-4, weight_decay_all=True,
                  eps=1e-7, label_smoothing=0.1, val_split=0.1, hflip=True, normalize="none", restore_best=True,
                  precision="auto",
                  # one process per core: this model's many short operations (dropout everywhere, two
                  # heads of 64 tokens) gain more from it than from threads (benchmarks/README.md)
                  procs=0),
    "paper": dict(epochs=310, cooldown_epochs=10, batch_size=128, lr=5.5e-4, min_lr=1e-5, warmup_lr=1e-5,
                  warmup_epochs=10, schedule="cosine", weight_decay=6e-2, weight_decay_all=False, eps=1e-8,
                  label_smoothing=0.1, val_split=0.0, hflip=True, rrc_scale=(0.8, 1.0), rrc_interpolation="random",
                  rand_augment="rand-m9-mstd0.5-inc1", erasing=0.0, mixup_alpha=0.8, cutmix_alpha=1.0,
                  mix_prob=1.0, switch_prob=0.5, mix_mode="batch", mix_off_epoch=175, normalize="cifar",
                  restore_best=False, precision="auto"),
    "text": dict(epochs=30, batch_size=64, lr=2e-3, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=3,
                 schedule="cosine", weight_decay=0.1, weight_decay_all=False, eps=1e-8,
                 procs=1,
                 # no token dropout: with FGM it no longer pays (validation top-1 over 10 splits: 0.8783 at 0.1,
                 # 0.8844 at 0.05, 0.8859 at 0; benchmarks/README.md); it gained 4 points before mixup and FGM
                 token_dropout=0.0,
                 # everything chosen, the run trains on every training text and tests its last epoch: on the
                 # validation splits an epoch picked on one half of a split scored no better on the other half
                 # than the last epoch (benchmarks/README.md), so a held-out tenth only costs data
                 val_split=0.0, restore_best=False,
                 # word mixup: validation top-1 0.865 → 0.878, mean of 5 splits (benchmarks/README.md)
                 mixup_alpha=0.4,
                 # adversarial word vectors: validation top-1 0.8760 → 0.8855, mean of 5 splits, higher on each
                 # (eps 1: 0.8818, 4: 0.8840), at twice the step's cost (benchmarks/README.md); since the
                 # seventeenth round each text's word vectors move 1.0 (Miyato et al.'s form) instead of the
                 # table 2.0: validation top-1 0.8894 → 0.8949, mean of 20 splits, 17 higher and 3 lower; per
                 # text 0.5 was level with 1.0 (+0.16, s.e. 0.22, 20 splits), 0.25 and 2.0 no better (10 splits)
                 fgm=1.0, fgm_norm="text",
                 # small, decayed word vectors and [UNK] for words seen once: rare words start near zero
                 # instead of as large random noise (validation top-1 about 0.80 → 0.84)
                 embedding_std=0.1, min_frequency=2,
                 # the official kernel 4, no attention dropout, label smoothing 0.2 and shaped [UNK]s: validation
                 # top-1 0.8846 → 0.8899, mean of 20 splits, 15 higher and 5 lower (benchmarks/README.md);
                 # kernel 2 had measured better on one split before mixup and FGM
                 kernel_size=4, attn_drop_rate=0.0, label_smoothing=0.2, unk_shapes=True,
                 # a second head on TREC's fine labels, loss weight 0.5 (where the source has them): validation
                 # top-1 0.8872 → 0.8898, mean of 20 splits, 12 higher and 6 lower (+0.50 in a first form with
                 # other initial draws; benchmarks/README.md); weight 1.0 lost 0.8 points on 3 splits
                 fine_aux=0.5,
                 # and predictions weigh that head's probabilities (summed into the coarse classes) twice the first
                 # head's: validation top-1 +0.28 points on the same weights over 30 splits, 21 higher and 6
                 # lower, s.e. 0.08 (weight 1.0: +0.18; benchmarks/README.md)
                 fine_vote=2.0,
                 # a trial of the first batch picks the faster of bf16 and fp32 on CPUs with native bf16
                 # (`cct.text_run.trial_precision`): slower on the AMX Xeon, ×1.8 on the Zen 4 EPYC, where
                 # validation top-1 was level (0.8864 against 0.8859, 10 splits; benchmarks/README.md)
                 precision="auto",
                 # one thread: this model's small GEMMs gain little from a second one, and on a shared machine
                 # two threads waiting on each other made epochs up to 30x slower (2.8 s → 82 s)
                 workers=1),
    # batch 64: validation top-1 after 5 epochs 0.697 → 0.716 at batch 128's images/s (benchmarks/README.md)
    "fast": dict(epochs=10, batch_size=64, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=1, schedule="cosine",
                 # Muon for the hidden matrices: validation top-1 after 20 epochs 0.8210 → 0.8584 (AMX Xeon), and
                 # lr 3e-3 rather than 2e-3 with it: +0.76 and +0.34 points on two splits (benchmarks/README.md)
                 optimizer="muon", lr=3e-3, weight_decay=5e-2, weight_decay_all=False, eps=1e-8, label_smoothing=0.1,
                 # translation by 2 px, not 4: validation top-1 +1.9 points with progressive resizing, +1.0
                 # without, in 20-26 epochs on an AMX Xeon (benchmarks/README.md); short runs need little augmentation
                 val_split=0.0, hflip=True, translate=2, normalize="dataset", restore_best=False,
                 # airbench's alternating flip: validation top-1 +0.40 points in 18 epochs (Zen 4, benchmarks/README.md)
                 alternate_flip=True,
                 precision="auto", tta=True,
                 # flip + 1-px shifts at test time: validation top-1 +0.5 points over flips alone
                 # (benchmarks/README.md); evaluation time, not training time, triples
                 tta_translate=1,
                 # a run of a few epochs needs little regularisation; without attention dropout the
                 # fused attention kernel runs in training too
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.05,
                 # CutMix on half the batches, in runs planned for 15 epochs or more: validation top-1 +0.64 points
                 # in 39 epochs (AMX Xeon) and +0.48 in 21 (Zen 4), test -0.46 in 10; a 10-minute run plans 6-14
                 # epochs on 2 cores, a 30-minute one 17-39 (benchmarks/README.md)
                 cutmix_alpha=1.0, mix_prob=0.5, mix_min_epochs=15,
                 # progressive resizing: half size for the first 43% of the steps, 3/4 until 71%, then full size;
                 # in the time of 4 full-size epochs, validation top-1 0.6990 → 0.7182 (benchmarks/README.md)
                 res_schedule="0.5@0,0.75@0.43,1@0.71",
                 # ... where it pays: it gained at a mean step cost of ×0.56 of a full-size one (fp32, AVX2 EPYC)
                 # and lost at ×0.68 (bf16 on an AMX Xeon, where a 16-px step costs ×0.45); benchmarks/README.md
                 res_schedule_max_cost=0.6),
    # fine-tuning --pretrained weights on a small dataset (benchmarks/README.md: the experiment that chose it)
    "finetune": dict(epochs=20, batch_size=64, lr=1e-3, min_lr=1e-6, warmup_lr=1e-6, warmup_epochs=2,
                     schedule="cosine", weight_decay=5e-2, weight_decay_all=False, eps=1e-8, label_smoothing=0.1,
                     val_split=0.1, hflip=True, translate=4, normalize="pretrained", restore_best=True,
                     precision="auto", tta=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1),
}

# flags that `--resume` accepts (everything else comes from the run's checkpoint)
RESUME_OVERRIDES = ("data", "device", "workers", "procs", "quiet", "stream", "stream_threshold", "loader_workers",
                    "kernels", "data_kind")


# the model `cct train --recipe R` trains when --model is not given: the one each recipe was made for;
# for `fast`, the fastest to a given accuracy in our time-budget trials: a deeper tokenizer, cct_2_3x4_32, reached
# validation top-1 0.8884 against cct_2_3x2_32's 0.8728 in the same 30 minutes, and cct_2_3x5_32, one more conv on
# the 8x8 grid, 0.8950 against 0.8846-0.8884 for cct_2_3x4_32 (benchmarks/README.md)
RECIPE_MODELS = {"keras": "cct_2_3x2_32_keras", "paper": "cct_7_3x1_32", "fast": "cct_2_3x5_32",
                 "text": "text_cct_2"}


def default_recipe(model_name: str) -> str:
    if model_name.startswith("text_"):
        return "text"
    return "keras" if model_name.endswith("_keras") else "paper"


# options only one kind of model reads: asked for with a model of the other kind, they would do nothing
IMAGE_ONLY = ("img_size", "resize_mode", "in_chans", "skip_bad_images", "stream", "stream_threshold", "loader_workers",
              "normalize", "hflip", "alternate_flip", "translate", "res_schedule", "res_schedule_max_cost", "rrc_scale",
              "rrc_interpolation", "rand_augment", "auto_augment", "erasing", "cutmix_alpha", "mix_prob",
              "switch_prob", "mix_mode", "tta", "tta_translate")
TEXT_ONLY = ("label_level", "tokenizer", "vocab_size", "min_frequency", "lowercase", "unk_shapes", "seq_len",
             "kernel_size", "word_vectors", "token_dropout", "fgm", "fgm_norm", "vat", "embedding_std",
             "fine_aux", "fine_vote")


DROP_RATES = ("drop_rate", "attn_drop_rate", "drop_path_rate")


def drop_rates(cfg: TrainConfig) -> dict:
    """The dropout rates a config sets, as model overrides (unset: the model's own)."""
    return {name: getattr(cfg, name) for name in DROP_RATES if getattr(cfg, name) is not None}


def make_config(model: str, data: str, out: str, recipe: str | None = None, **overrides) -> TrainConfig:
    """A `TrainConfig`: the dataclass defaults, then the recipe's values, then `overrides`."""
    recipe = recipe or default_recipe(model)
    if recipe not in RECIPES:
        raise CCTError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CCTError(f"unknown training option(s): {', '.join(unknown)}")
    text = model_kind(model) == "text"
    if (recipe == "text") != text:  # every other recipe is made of image settings
        raise CCTError(f"--recipe {recipe} is for {'image' if text else 'text'} models, and {model} is "
                       f"{'a text model (--recipe text)' if text else 'an image model'}")
    wrong = [name for name in (IMAGE_ONLY if text else TEXT_ONLY) if name in overrides]
    if wrong:
        raise CCTError(f"--{wrong[0].replace('_', '-')} is for {'image' if text else 'text'} models, and {model} is "
                       f"{'a text' if text else 'an image'} model")
    values = {**RECIPES[recipe], **overrides}
    if "fgm_norm" in overrides and not values.get("fgm"):  # the recipe's own is unused when --fgm 0 turns FGM off
        raise CCTError(f"--fgm-norm {overrides['fgm_norm']} measures FGM's move: it needs --fgm > 0")
    if isinstance(values.get("rand_augment"), str) and values["rand_augment"].strip().lower() in ("none", ""):
        values["rand_augment"] = None  # `--rand-augment none` turns a recipe's policy off
    if text:
        values.update(hflip=False, alternate_flip=False)  # the dataclass's image defaults, recorded as not applying
    if "res_schedule" in overrides and "res_schedule_max_cost" not in overrides:
        values["res_schedule_max_cost"] = None  # the limit is the recipe's, for its own schedule; one asked for is kept
    if {"mixup_alpha", "cutmix_alpha", "mix_prob"} & set(overrides) and "mix_min_epochs" not in overrides:
        values["mix_min_epochs"] = None  # likewise the recipe's, for its own mixing
    if overrides.get("hflip") is False and "alternate_flip" not in overrides:
        values["alternate_flip"] = False  # no flips asked for: the recipe's way of flipping goes with them
    return TrainConfig(model=model, data=data, out=out, recipe=recipe, **values)


def mixing_off(cfg: TrainConfig, *, planned_epochs: float) -> str | None:
    """Why a run planned for `planned_epochs` trains unmixed (--mix-min-epochs); None where it mixes as configured."""
    if (cfg.mixup_alpha or cfg.cutmix_alpha) and cfg.mix_min_epochs is not None and planned_epochs < cfg.mix_min_epochs:
        return (f"MixUp/CutMix off: this run is planned for {planned_epochs:.1f} epochs, fewer than the "
                f"{cfg.mix_min_epochs:g} from which mixing pays (--mix-min-epochs)")
    return None


def parse_res_schedule(spec: str) -> list[tuple[float, float]]:
    """'0.5@0,0.75@0.4,1@0.7' → [(0.0, 0.5), (0.4, 0.75), (0.7, 1.0)]: (start as a fraction of the run's steps,
    input scale as a fraction of the model's input size)."""
    phases = []
    for part in spec.split(","):
        scale, _, start = part.strip().partition("@")
        try:
            phases.append((float(start), float(scale)))
        except ValueError:
            raise CCTError(f"--res-schedule: {part.strip()!r} is not SCALE@START (e.g. 0.5@0)") from None
    starts = [start for start, _ in phases]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1:
        raise CCTError(f"--res-schedule {spec!r}: the phases must start at 0 and at increasing fractions below 1")
    if any(not 0 < scale <= 1 for _, scale in phases) or phases[-1][1] != 1:
        raise CCTError(f"--res-schedule {spec!r}: scales must be in (0, 1], the last 1 (the size evaluated)")
    return phases


def validate(cfg: TrainConfig) -> None:
    """Raise a one-line `CCTError` for values out of range (before any data is read)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise CCTError(message)
    get_config(cfg.model)  # unknown model → UnknownModelError
    need(0 <= cfg.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {cfg.seed}")
    need(cfg.recipe in RECIPES, f"unknown recipe {cfg.recipe!r}; choose from {', '.join(RECIPES)}")
    need(cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {cfg.eval_batch_size}")
    need(0.0 <= cfg.val_split < 1.0, f"--val-split must be in [0, 1), got {cfg.val_split}")
    need(0.0 <= cfg.test_split < 1.0, f"--test-split must be in [0, 1), got {cfg.test_split}")
    need(cfg.normalize != "pretrained" or cfg.pretrained is not None, "--normalize pretrained (the finetune recipe's "
         "default) needs --pretrained; to train from scratch, give --normalize dataset")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be positive, got {cfg.lr}")
    need(cfg.min_lr >= 0 and cfg.warmup_lr >= 0, "--min-lr and --warmup-lr must be non-negative")
    need(cfg.weight_decay >= 0, f"--weight-decay must be non-negative, got {cfg.weight_decay}")
    need(cfg.eps > 0, f"--eps must be positive, got {cfg.eps}")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
    need(0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.warmup_epochs >= 0 and cfg.cooldown_epochs >= 0, "--warmup-epochs and --cooldown-epochs must be >= 0")
    need(cfg.train_limit is None or cfg.train_limit >= 1, f"--train-limit must be at least 1, got {cfg.train_limit}")
    need(cfg.img_size is None or cfg.img_size >= 8, f"--img-size must be at least 8 pixels, got {cfg.img_size}")
    need(cfg.in_chans in (None, 1, 3), f"--in-chans must be 1 or 3, got {cfg.in_chans}")
    need(cfg.num_classes is None or cfg.num_classes >= 1, f"--num-classes must be positive, got {cfg.num_classes}")
    need(not (cfg.rand_augment and cfg.auto_augment), "choose --rand-augment or --auto-augment, not both"
         + (f" (the {cfg.recipe} recipe sets --rand-augment {cfg.rand_augment}: add --rand-augment none)"
            if cfg.rand_augment == RECIPES[cfg.recipe].get("rand_augment") else ""))
    need(cfg.translate >= 0, f"--translate must be non-negative, got {cfg.translate}")
    need(0.0 <= cfg.erasing <= 1.0, f"--erasing must be in [0, 1], got {cfg.erasing}")
    need(cfg.mixup_alpha >= 0 and cfg.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must be >= 0")
    need(0.0 <= cfg.mix_prob <= 1.0 and 0.0 <= cfg.switch_prob <= 1.0, "--mix-prob and --switch-prob must be in [0, 1]")
    need(cfg.rrc_scale is None or 0 < cfg.rrc_scale[0] <= cfg.rrc_scale[1] <= 1,
         f"--rrc-scale must satisfy 0 < min <= max <= 1, got {cfg.rrc_scale}")
    need(cfg.time_budget is None or 0 < cfg.time_budget < math.inf, f"--time-budget must be a positive number of minutes, "
                                                                    f"got {cfg.time_budget}")
    need(cfg.workers >= 0, f"--workers must be non-negative, got {cfg.workers}")
    need(cfg.procs >= 0, f"--procs must be 0 (one per core) or positive, got {cfg.procs}")
    need(cfg.loader_workers >= 0, f"--loader-workers must be non-negative, got {cfg.loader_workers}")
    need(0 < cfg.stream_threshold <= 1, f"--stream-threshold must be in (0, 1], got {cfg.stream_threshold}")
    for name in DROP_RATES:
        need(getattr(cfg, name) is None or 0 <= getattr(cfg, name) < 1,
             f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    need(cfg.log_interval >= 1, f"--log-interval must be at least 1, got {cfg.log_interval}")
    text = model_kind(cfg.model) == "text"
    need(text or cfg.kernel_size is None, "--kernel-size is for text models (image models name it: cct_7_3x1_32)")
    need(text or cfg.word_vectors is None, "--word-vectors is for text models")
    need(cfg.kernel_size is None or cfg.kernel_size >= 1, f"--kernel-size must be positive, got {cfg.kernel_size}")
    need(cfg.seq_len is None or cfg.seq_len >= 1, f"--seq-len must be positive, got {cfg.seq_len}")
    need(cfg.vocab_size > 2, f"--vocab-size must exceed 2 ([UNK] and [PAD]), got {cfg.vocab_size}")
    need(cfg.embedding_std is None or cfg.embedding_std > 0, f"--embedding-std must be positive, got {cfg.embedding_std}")
    need(text or cfg.embedding_std is None, "--embedding-std is for text models")
    need(cfg.min_frequency >= 1, f"--min-frequency must be at least 1, got {cfg.min_frequency}")
    need(0.0 <= cfg.token_dropout < 1.0, f"--token-dropout must be in [0, 1), got {cfg.token_dropout}")
    need(cfg.fgm >= 0.0, f"--fgm must be non-negative, got {cfg.fgm}")
    need(text or not cfg.fgm, "--fgm (adversarial word vectors) is for text models")
    need(cfg.vat >= 0.0, f"--vat must be non-negative, got {cfg.vat}")
    need(text or not cfg.vat, "--vat (virtual adversarial word vectors) is for text models")
    need(cfg.fine_aux >= 0.0, f"--fine-aux must be non-negative, got {cfg.fine_aux}")
    need(text or not cfg.fine_aux, "--fine-aux (a head on TREC's fine labels) is for text models")
    need(cfg.fine_vote >= 0.0, f"--fine-vote must be non-negative, got {cfg.fine_vote}")
    need(text or not cfg.fine_vote, "--fine-vote (the fine labels' head in predictions) is for text models")
    need(not (text and cfg.tta), "--tta (flip averaging) is for image models")
    need(not (text and cfg.res_schedule), "--res-schedule (progressive resizing) is for image models")
    need(cfg.hflip or not cfg.alternate_flip, "--alternate-flip decides how --hflip flips; it needs --hflip")
    if cfg.res_schedule:
        parse_res_schedule(cfg.res_schedule)
    need(cfg.mix_off_epoch is None or cfg.mix_off_epoch >= 0, f"--mix-off-epoch must be non-negative, got "
                                                                f"{cfg.mix_off_epoch}")
    need(cfg.kernel_size is None or not cfg.model.startswith("text_transformer"),
         f"--kernel-size: {cfg.model} has no convolution (its tokens are the words themselves)")
    need(cfg.mix_min_epochs is None or cfg.mix_min_epochs >= 0,
         f"--mix-min-epochs must be non-negative, got {cfg.mix_min_epochs}")
    need(cfg.res_schedule_max_cost is None or cfg.res_schedule_max_cost > 0,
         f"--res-schedule-max-cost must be positive, got {cfg.res_schedule_max_cost}")
    need(cfg.tta_translate >= 0, f"--tta-translate must be non-negative, got {cfg.tta_translate}")
    if text:  # image augmentation would otherwise be silently ignored by a text run
        for flag, on in (("translate", cfg.translate), ("rrc-scale", cfg.rrc_scale), ("rand-augment", cfg.rand_augment),
                         ("auto-augment", cfg.auto_augment), ("erasing", cfg.erasing), ("cutmix-alpha", cfg.cutmix_alpha),
                         ("tta-translate", cfg.tta_translate), ("alternate-flip", cfg.alternate_flip),
                         ("mix-prob", cfg.mix_prob != 1.0), ("mix-mode", cfg.mix_mode != "batch")):
            need(not on, f"--{flag} is image augmentation; text models take --token-dropout, --mixup-alpha and --fgm")
    for f in fields(cfg):  # inf and nan pass the range checks above ("inf >= 0")
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f"--{f.name.replace('_', '-')} must be a finite "
                                                                    f"number, got {value}")
    for name, choices in (("precision", PRECISIONS), ("device", DEVICES),
                          ("normalize", NORMALIZATIONS), ("schedule", ("constant", "cosine")),
                          ("resize_mode", RESIZE_MODES), ("data_kind", DATA_KINDS), ("label_level", LABEL_LEVELS),
                          ("tokenizer", TOKENIZERS)):
        need(getattr(cfg, name) in choices, f"--{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
