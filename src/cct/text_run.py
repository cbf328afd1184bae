"""The data phase of `cct train` for text: read, split, train the tokenizer, tokenize, report truncation.

The order matters for honesty: a source without a test set first has one held out (`--test-split`,
`cct.text_data.hold_out_test`, recorded in the checkpoints for `cct eval`); the seeded, stratified
`--train-limit` and `--val-split` subsets are then drawn from the raw training texts (`cct.data.split_set`,
as for images), and the tokenizer is trained on what remains for training only, so neither validation
nor test words shape the vocabulary. A resumed run takes the tokenizer from its last.pt instead of
training it again. Texts longer than the model's `seq_len` keep their first `seq_len` tokens; how many
were cut is logged and written to results.json ("truncated_texts").

`--precision auto` is settled here for a text model on a CPU with native bf16: its GEMMs are narrow
(128 wide, 300-wide word vectors), and bf16 is faster than fp32 on some such CPUs and slower on others,
so a few steps on the run's first batch, in each precision, decide (`trial_precision`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import data as data_mod
from . import distributed
from .errors import CCTError
from .kernels import use_kernels
from .kinds import RunInputs, TextPreprocessing, TextSet, TokenBatch
from .recipes import TrainConfig
from .registry import create_model, get_config
from .runfiles import log
from .runtime import autocast, faster_precision
from .step import text_augment_config
from .text_data import TextDataset, hold_out_test, load_text, recorded_test
from .tokenizer import TextTokenizer, load_word_vectors

logger = logging.getLogger(__name__)

SHOWN_LINES = 5  # odd input lines listed one by one; the rest are counted


@dataclass
class RawTexts:
    """A split before tokenization (what `split_set` subsets): texts and int64 labels, and the fine labels of
    `--fine-aux` (`aux`, -1 for none) where they are used."""
    texts: list[str]
    labels: torch.Tensor
    aux: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "RawTexts":
        return RawTexts([self.texts[i] for i in indices.tolist()], self.labels[indices].contiguous(),
                        None if self.aux is None else self.aux[indices].contiguous())


def _report(lines: list[str], quiet: bool) -> None:
    for line in lines[:SHOWN_LINES]:
        log(quiet, f"note: {line}")
    if len(lines) > SHOWN_LINES:
        log(quiet, f"note: ... and {len(lines) - SHOWN_LINES} more such lines")


def _tokenize(tokenizer: TextTokenizer, part: RawTexts | None, seq_len: int) -> tuple[TextSet | None, int]:
    """A tokenized split padded to `seq_len` columns (so rows can be sliced together), and how many were cut."""
    if part is None:
        return None, 0
    ids, mask, truncated = tokenizer.encode_counted(part.texts, seq_len=seq_len)
    width = ids.shape[1]
    ids = torch.nn.functional.pad(ids, (0, seq_len - width), value=tokenizer.pad_id)
    mask = torch.nn.functional.pad(mask, (0, seq_len - width), value=False)
    return TextSet(TokenBatch(ids.contiguous(), mask.contiguous(), part.aux), part.labels), truncated


def train_tokenizer(cfg: TrainConfig, texts: list[str], seq_len: int) -> TextTokenizer:
    """The recipe's tokenizer (`--tokenizer`, `--lowercase`, `--vocab-size`, `--min-frequency`, `--unk-shapes`)."""
    tokenizer = TextTokenizer.train(texts, kind=cfg.tokenizer, lowercase=cfg.lowercase, vocab_size=cfg.vocab_size,
                                    min_frequency=cfg.min_frequency, unk_shapes=cfg.unk_shapes)
    tokenizer.seq_len = seq_len
    return tokenizer


def recipe_model_overrides(cfg: TrainConfig) -> dict:
    """The text model settings a run's config sets (`--kernel-size`, `--embedding-std`; unset: the model's)."""
    return {name: getattr(cfg, name) for name in ("kernel_size", "embedding_std") if getattr(cfg, name) is not None}


def settled_by_trial(requested: str, resolved: str, device: torch.device | str) -> bool:
    """Whether a text model's precision is `trial_precision`'s to choose: "auto" asked for, and resolved to bf16
    on a CPU (one with native bf16; elsewhere "auto" is fp32, and CUDA keeps bf16)."""
    return requested == "auto" and resolved == "bf16" and torch.device(device).type == "cpu"


def trial_precision(model: str, overrides: dict, batch: TokenBatch, labels: torch.Tensor, *,
                    kernels: str) -> tuple[str, dict[str, float]]:
    """"bf16" or "fp32", whichever trains `model` faster on this CPU (`cct.runtime.faster_precision`: forward,
    loss and backward of `batch`, on a throwaway copy with its own random state), and each one's milliseconds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = use_kernels(create_model(model, **overrides), kernels).train()

        def step(precision: str) -> None:
            with autocast(precision):
                logits = net(batch.ids, batch.mask)
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            net.zero_grad(set_to_none=True)

        return faster_precision(step)


def text_inputs(cfg: TrainConfig, *, checkpoint: dict | None, precision: str, quiet: bool,
                dataset: TextDataset | None = None, device: torch.device | str = "cpu") -> RunInputs:
    """Everything the run needs from a text source (see the module docstring)."""
    if dataset is None:
        dataset = load_text(cfg.data, label_level=cfg.label_level)
    if checkpoint is not None and checkpoint.get("split"):  # resumed: the texts the run held out, or an error
        # (a source with a test set of its own is scored on it, and then the record does not apply)
        split_record = checkpoint["split"] if dataset.test_texts is None else None
        dataset = recorded_test(dataset, checkpoint["split"], cfg.data)
    else:  # a source without a test set: one held out
        dataset, split_record = hold_out_test(dataset, fraction=cfg.test_split, seed=cfg.seed)
    log(quiet, f"data: {dataset.source}: {len(dataset.train_texts)} training texts, "
               f"{len(dataset.test_texts or [])} test texts" + (
                   f" (held out: --test-split {cfg.test_split:g}, seed {cfg.seed})" if split_record else "") +
               f", {dataset.num_classes} classes")
    _report(dataset.reported + dataset.skipped, quiet)
    fine = dataset.train_fine if cfg.fine_aux > 0 else None
    if cfg.fine_aux > 0:
        log(quiet, f"fine labels: a second head trained on the source's {len(dataset.fine_classes)}, loss weight "
                   f"{cfg.fine_aux:g} (--fine-aux)" + (
                       f"; predictions weigh it {cfg.fine_vote:g} × the first head (--fine-vote)" if cfg.fine_vote
                       else "; predictions use the first head alone (--fine-vote 0)") if fine is not None else
                   "fine labels: none in this source (TREC's, with --label-level coarse), so --fine-aux trains no "
                   "second head")
    train_raw, val_raw = data_mod.split_set(RawTexts(dataset.train_texts, dataset.train_labels, fine),
                                            num_classes=dataset.num_classes, train_limit=cfg.train_limit,
                                            val_split=cfg.val_split, seed=cfg.seed)
    if len(train_raw) == 0:
        raise CCTError(f"{cfg.data}: no training texts")
    test_raw = RawTexts(dataset.test_texts, dataset.test_labels) if dataset.test_texts is not None else None
    seq_len = cfg.seq_len or get_config(cfg.model).seq_len
    if checkpoint is not None:  # the run's own vocabulary, whatever training it again would give
        tokenizer = TextTokenizer.from_json(checkpoint["tokenizer"])
    else:
        tokenizer = train_tokenizer(cfg, train_raw.texts, seq_len)
    log(quiet, f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} ids (limit {tokenizer.vocab_limit}), "
               f"{'lower-cased' if tokenizer.lowercase else 'cased'}, trained on {len(train_raw)} training texts")
    sets, truncated = {}, {}
    val_raw = replace(val_raw, aux=None) if val_raw is not None else None  # the second head trains only
    for name, part in (("train", train_raw), ("val", val_raw), ("test", test_raw)):
        sets[name], truncated[name] = _tokenize(tokenizer, part, seq_len)
    if any(truncated.values()):
        log(quiet, "truncated to " + f"{seq_len} tokens: " + ", ".join(
            f"{n} of {len(sets[k])} {k} texts" for k, n in truncated.items() if sets[k] is not None))
    batch = sets["train"].inputs
    unknown = float(torch.isin(batch.ids[batch.mask], torch.tensor(tokenizer.unknown_ids)).float().mean())
    if unknown > 0.4:  # what a word vocabulary makes of text without spaces between its words
        logger.warning("%.0f%% of the training tokens are [UNK], words seen fewer than --min-frequency %d times; for "
                       "text without spaces between words (Chinese, Japanese, Thai) try --tokenizer bpe",
                       100 * unknown, cfg.min_frequency)

    def setup(model: nn.Module) -> None:
        model.tokenizer = tokenizer
        if cfg.word_vectors and checkpoint is None:  # a resumed run's embedding comes from last.pt
            found = load_word_vectors(cfg.word_vectors, tokenizer, model.embedding)
            log(quiet, f"word vectors: {found} of {tokenizer.vocab_size} vocabulary rows from {cfg.word_vectors}")

    overrides = dict(vocab_size=tokenizer.vocab_size, seq_len=seq_len, **recipe_model_overrides(cfg))
    if fine is not None:
        overrides["aux_classes"] = len(dataset.fine_classes)
        if cfg.fine_vote:
            overrides.update(aux_vote=cfg.fine_vote, aux_parent=dataset.fine_parent)
    results = {"seq_len": seq_len, "vocab_size": tokenizer.vocab_size, "truncated_texts": truncated,
               "skipped_lines": len(dataset.skipped)}
    if settled_by_trial(cfg.precision, precision, device):
        if checkpoint:  # a resumed run keeps its trial's choice, to continue exactly
            precision = checkpoint["eval"]["precision"]
        else:
            precision, ms = trial_precision(
                cfg.model, dict(overrides, num_classes=cfg.num_classes or dataset.num_classes),
                TokenBatch(*sets["train"].inputs[:cfg.batch_size].trimmed()), sets["train"].labels[:cfg.batch_size],
                kernels=cfg.kernels)
            precision = "bf16" if distributed.from_main(precision == "bf16") else "fp32"  # one choice for all ranks
            log(quiet, f"precision auto: {precision} (a training step of the first batch took {ms['fp32']:.0f} ms "
                       f"in fp32, {ms['bf16']:.0f} ms in bf16)")
            results["precision_trial_ms"] = {k: round(v, 1) for k, v in ms.items()}
    return RunInputs(
        kind="text", classes=list(dataset.classes), train_set=sets["train"], val_set=sets["val"], test_set=sets["test"],
        prep=TextPreprocessing(seq_len, precision=precision, batch_size=cfg.eval_batch_size),
        aug_cfg=replace(text_augment_config(cfg), fine_aux=cfg.fine_aux if fine is not None else 0.0),
        model_overrides=overrides,
        skipped=len(dataset.skipped), results=results, setup_model=setup, precision=precision,
        split_record=split_record)
