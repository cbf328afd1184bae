"""Training: recipes, the loop, resume — `cct train`.

The loop follows nanoGPT's train.py: one `train(config) -> results` function whose body is an
ordered list of obvious steps (set lr → augment → forward → loss → backward → step → zero_grad →
log), with the learning-rate schedule a small pure function of the step (`lr_at`).

Recipes (`keras`, `paper`, `fast`) and `TrainConfig` live in `cct.recipes`.

Interruption (SIGINT/SIGTERM): the current step finishes, `last.pt` records the position inside the
epoch (the epoch's shuffling seed, the batch index and the running sums), and `--resume` continues
from that very batch, so an interrupted run ends exactly as an uninterrupted one would.

Several processes (`cct train --procs N` on one CPU, or `torchrun --nproc_per_node N -m cct train ...`,
see `cct.distributed`): data-parallel training, gradients averaged by DistributedDataParallel on GPUs
and by one exchange per step on CPUs. `--batch-size` stays the global batch; every rank draws the
same epoch permutation and trains on its shard of each batch; augmentation and dropout are seeded per
rank; metric sums are all-reduced; validation and test are sharded and gathered; only rank 0 writes.
`last.pt` keeps every rank's random streams, so a resumed run with the same number of processes
continues exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import itertools
import json
import math
import signal
import sys
import threading
import time
import types
import typing
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import atomic_write, read_checkpoint, remove_stale_temporaries, save_checkpoint
from .errors import CCTError, CheckpointError
from .model import num_params
from .recipes import RECIPE_MODELS, RECIPES, RESUME_OVERRIDES, TrainConfig, make_config, validate
from .registry import create_model
from .runtime import autocast, configure_threads, resolve_device, resolve_precision


# ---------------------------------------------------------------------- schedule and optimiser
def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
          min_lr: float = 0.0, cooldown_steps: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of optimisation step `step` (0-based).

    Linear warm-up from `warmup_lr`, then constant or a cosine from `lr` to `min_lr` over the steps
    before the cooldown, then `min_lr`. As timm's CosineLRScheduler (warmup_prefix=False), the cosine
    is counted from step 0, so the warm-up overlaps its start.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - cooldown_steps)
    if step >= decay_steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * step / decay_steps))


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """Keras decays every variable; timm exempts biases, norms (ndim < 2) and `no_weight_decay()` names."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# devices with a fused AdamW kernel: one pass over each parameter instead of a dozen foreach passes
# (on the 2-core test machine 0.27 ms against 2.1 ms a step for cct_2_3x2_32_keras; bench_cpu.py)
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if all(p.device.type in _FUSED_ADAMW_DEVICES and p.is_floating_point() for g in groups for p in g["params"]):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # PyTorch before 2.4 has no fused AdamW on CPUs
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def augment_config(cfg: TrainConfig, mean, std):
    from .policies import AugmentConfig
    return AugmentConfig(translate=cfg.translate, hflip=cfg.hflip, rrc_scale=cfg.rrc_scale,
                         rrc_interpolation=cfg.rrc_interpolation, rand_augment=cfg.rand_augment,
                         auto_augment=cfg.auto_augment,
                         erasing=cfg.erasing, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                         mix_prob=cfg.mix_prob, switch_prob=cfg.switch_prob, mix_mode=cfg.mix_mode,
                         label_smoothing=cfg.label_smoothing, mean=mean, std=std)


# ---------------------------------------------------------------------- the step
class NonFiniteLossError(CCTError):
    """The loss became NaN or infinite."""


class TrainStep:
    """One optimisation step on a uint8 batch: augment → forward → loss → backward → step → zero_grad.

    `train()` and `cct bench` both call this object, so a benchmark times exactly what training does.
    Running sums (loss, correct, images) stay on the device; `totals()` syncs once to read them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, aug_cfg, *, precision: str,
                 device: torch.device | str, label_smoothing: float, num_classes: int, generator: torch.Generator,
                 skip_nonfinite: bool = False, sync_grads: bool = False):
        self.model, self.optimizer, self.aug_cfg = model, optimizer, aug_cfg
        self.sync_grads = sync_grads  # average gradients over processes here (a model not wrapped in DDP)
        self.precision, self.device = precision, torch.device(device)
        self.label_smoothing, self.num_classes, self.generator = label_smoothing, num_classes, generator
        self.skip_nonfinite = skip_nonfinite
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.skipped = 0
        self.shared: tuple[bool, ...] = ()
        self.reset_totals()

    def reset_totals(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)

    def totals(self) -> tuple[float, float, int]:
        """(mean loss, top-1 accuracy, images) since `reset_totals()`, summed over processes."""
        loss_sum, correct, seen = reduce_metrics(torch.stack([self.loss_sum, self.correct.double(), self.seen.double()]))
        seen = int(seen)
        return (float(loss_sum) / seen, float(correct) / seen, seen) if seen else (float("nan"), float("nan"), 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float, *, mix: bool = True,
                 share: typing.Callable[[], tuple[bool, ...]] | None = None) -> torch.Tensor:
        """Train on one batch of uint8 images (B, C, H, W) and int64 labels; returns the detached loss.

        `share`: the loop's stop decisions, read once the gradients are computed, OR-ed over processes
        and left in `self.shared`; they travel in the step's own collective where it has one, so that
        a step synchronises the processes once.
        """
        from .policies import augment_batch
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, targets = augment_batch(images, labels, self.generator, self.aug_cfg, num_classes=self.num_classes, mix=mix)
        x = x.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with autocast(self.precision, self.device):
            logits = self.model(x)
        # mixed (soft) targets already carry the smoothing: augment_batch applies it, as timm's Mixup does
        smoothing = self.label_smoothing if targets.ndim == 1 else 0.0
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        if self.sync_grads:  # backward first: the gradients, the loss's finiteness and the flags in one exchange
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            finite, self.shared = distributed.average_gradients(params, finite=bool(torch.isfinite(loss)),
                                                                flags=share() if share else ())
        else:  # DDP exchanges in backward, which every rank must then run: agree on the loss first
            finite = distributed.all_finite(loss)
            self.shared = ()
        loss = self._update(loss, logits, targets, labels, finite)  # raises on every rank together, or on none
        if share and not self.sync_grads:
            self.shared = distributed.any_true(*share())
        return loss

    def _update(self, loss, logits, targets, labels, finite: bool) -> torch.Tensor:
        if not finite:  # never step on a NaN (on any rank)
            self.optimizer.zero_grad(set_to_none=True)
            if not self.skip_nonfinite:
                raise NonFiniteLossError(f"the loss became {loss.item()}")
            self.skipped += 1
            return loss.detach()
        if not self.sync_grads:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        hard = targets if targets.ndim == 1 else targets.argmax(-1)
        self.loss_sum += loss.detach().double() * labels.shape[0]
        self.correct += (logits.detach().argmax(-1) == hard).sum()
        self.seen += labels.shape[0]
        return loss.detach()

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen.cpu(),
                "skipped": self.skipped, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.correct = state["correct"].to(self.device)
        self.seen = state["seen"].to(self.device)
        self.skipped = int(state["skipped"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def make_train_step(model, optimizer, aug_cfg, *, precision, device, label_smoothing, num_classes, generator,
                    skip_nonfinite: bool = False, world_size: int = 1) -> TrainStep:
    """The per-batch work of `train()`: `step(x_uint8, labels, lr, mix=True) -> loss`.

    With `world_size` > 1, `model` is what `wrap_model` returned: DistributedDataParallel on GPUs, else
    the plain model, whose gradients the step averages over processes itself.
    """
    sync = world_size > 1 and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return TrainStep(model, optimizer, aug_cfg, precision=precision, device=device, label_smoothing=label_smoothing,
                     num_classes=num_classes, generator=generator, skip_nonfinite=skip_nonfinite, sync_grads=sync)


# ---------------------------------------------------------------------- distributed hooks
def wrap_model(model: nn.Module, world_size: int = 1) -> nn.Module:
    """The model the training step calls: itself for one process or on CPUs, else DistributedDataParallel.

    On CUDA the weights go channels-last (the convolutional tokenizer's fast layout). Every rank starts
    from rank 0's weights; the model has no running statistics, so no buffers are synchronised in
    forward. On CPUs (gloo) the step averages the gradients in one exchange after the backward pass
    (`distributed.average_gradients`), which measured faster than DDP's overlapped buckets with one
    core per process (cct_2_3x2_32_keras, 2 processes: see benchmarks/README.md). Checkpoints,
    evaluation and the optimiser keep using the unwrapped `model`.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world_size == 1:
        return model
    assert distributed.is_active(), "world_size > 1 needs a process group (cct.distributed.process_group)"
    if device.type == "cpu":
        distributed.broadcast_module(model)
        return model
    import inspect
    from torch.nn.parallel import DistributedDataParallel
    # the only buffer (a sine positional embedding) is the same everywhere: never sync it in forward
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}  # the older name
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def reduce_metrics(values: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """Per-process metric sums (loss × images, correct, images) summed over processes, on the CPU."""
    return distributed.all_reduce_sum(values)


# ---------------------------------------------------------------------- interruption
class TrainingInterrupted(CCTError):
    """Training stopped early (a signal, or `stop_at_step`); `last.pt` holds where it stopped."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def _stop_on_signals(stop: types.SimpleNamespace):
    """SIGINT/SIGTERM set `stop.signum` so the loop ends after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving last.pt "
              "(send it again to abort without saving)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------- outputs
OUTPUT_FILES = ("last.pt", "best.pt", "history.csv", "config.json", "results.json", "curves.png")
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds")


def _history_line(row: dict) -> list[str]:
    def num(v, spec):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    return [str(row["epoch"]), num(row["lr"], ".6g"), num(row["train_loss"], ".6f"), num(row["train_top1"], ".6f"),
            num(row["val_loss"], ".6f"), num(row["val_top1"], ".6f"), num(row["val_top5"], ".6f"),
            num(row["seconds"], ".2f")]


def write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    writer.writerows(_history_line(r) for r in rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _log(cfg_quiet: bool, *parts) -> None:
    if not cfg_quiet:
        print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- data and model
def _load_data(cfg: TrainConfig, dataset, quiet: bool):
    from . import data as data_mod
    if dataset is None:
        with distributed.main_process_first():  # rank 0 decodes and caches; the others then read the cache
            dataset = data_mod.load(cfg.data, img_size=cfg.img_size, in_chans=cfg.in_chans,
                                    skip_bad_images=cfg.skip_bad_images, progress=not quiet, stream=cfg.stream,
                                    threshold=cfg.stream_threshold, workers=cfg.loader_workers,
                                    processes_per_machine=distributed.env_from_environ().local_world_size)
    train_set, val_set = data_mod.split(dataset, train_limit=cfg.train_limit, val_split=cfg.val_split, seed=cfg.seed)
    if len(train_set.labels) == 0:
        raise CCTError(f"{cfg.data}: no training images")
    return dataset, train_set, val_set


def _mean_std(cfg: TrainConfig, train_images: torch.Tensor) -> tuple[tuple | None, tuple | None]:
    """The normalisation as fractions of 255 (None: x / 255), recorded in every checkpoint."""
    channels = train_images.shape[1]
    if cfg.normalize == "none":
        return None, None
    if cfg.normalize == "cifar":
        from .data import CIFAR_MEAN, CIFAR_STD
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


def eval_settings_dict(cfg: TrainConfig, precision: str, mean, std, img_size, in_chans) -> dict:
    """What `cct eval` and `cct predict` reuse, stored under the checkpoint's "eval" key."""
    return {"precision": precision, "batch_size": cfg.eval_batch_size, "tta": cfg.tta,
            "mean": list(mean) if mean else None, "std": list(std) if std else None,
            "img_size": list(img_size), "in_chans": in_chans}


def _rank_rng_state(aug_gen: torch.Generator) -> dict:
    """This rank's own random streams (augmentation, dropout), gathered into rank 0's `last.pt`."""
    state = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rank_rng(rng: dict, aug_gen: torch.Generator, *, seed: int, rank: int, world_size: int,
                      step: int) -> None:
    """Each rank's streams from `last.pt`; with another number of processes, fresh ones for ranks > 0."""
    ranks = rng.get("ranks") or []
    if len(ranks) == world_size:
        mine = ranks[rank]
        aug_gen.set_state(mine["augment"])
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
    elif rank > 0:  # rank 0 keeps the recorded streams; the others must not replay the start of the run
        aug_gen.manual_seed(distributed.rank_seed(seed + 2, rank) + step)
        torch.manual_seed(distributed.rank_seed(seed, rank) + step)


def _rng_state(data_epoch_state: torch.Tensor, data_gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data_epoch_start": data_epoch_state, "data": data_gen.get_state(),
             "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, dataset=None, resume: bool = False, quiet: bool = False,
          stop_at_step: int | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Train a model as `config` says, writing checkpoints, history, curves and results to `config.out`.

    Args:
        config: the run's configuration (see `make_config`).
        dataset: an in-memory `cct.data.Dataset` to use instead of loading `config.data`.
        resume: continue the run in `config.out` from its `last.pt`.
        quiet: no progress bar or per-epoch lines.
        stop_at_step: stop as if interrupted after this many optimisation steps (for tests and sessions).
        rank, world_size: this process's place in a data-parallel job; world_size > 1 needs the process
            group joined first (`cct.distributed.process_group`, which `cct train` enters under torchrun).
    Returns:
        the contents of `results.json`.
    Raises:
        TrainingInterrupted: after a signal or `stop_at_step`, once `last.pt` is written.
    """
    cfg = config
    validate(cfg)
    is_main = rank == 0
    quiet = quiet or not is_main
    if cfg.batch_size % world_size:
        raise CCTError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the {world_size} "
                       "processes")
    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    checkpoint = None
    if resume and not last_path.is_file() and (out / "config.json").is_file():
        _log(quiet, f"{out} has no last.pt (the run stopped before its first epoch ended): starting it again")
        resume = False
    if resume:
        checkpoint = read_checkpoint(last_path)
        finished = checkpoint.get("train_state", {}).get("finished") and (out / "results.json").is_file()
        if distributed.from_main(finished):  # rank 0's view, so that no rank trains alone
            _log(quiet, f"{out}: this run is already finished ({checkpoint['train_state']['epoch']} epochs); "
                        f"results in {out / 'results.json'}")
            return json.loads((out / "results.json").read_text())
    elif last_path.exists():
        raise CCTError(f"{out} already holds a run (last.pt): continue it with `cct train --resume {out}`, "
                       "or choose another --out")
    if is_main:  # what writes cut short by a kill left behind (never read, but they take space)
        remove_stale_temporaries(out, OUTPUT_FILES)
    configure_threads(cfg.workers or None)
    device = distributed.local_device(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    # data
    dataset, train_set, val_set = _load_data(cfg, dataset, quiet)
    n_train, (in_chans, height, width) = len(train_set.labels), tuple(train_set.images.shape[1:])
    num_classes = cfg.num_classes or len(dataset.classes)
    if num_classes < len(dataset.classes):
        raise CCTError(f"--num-classes {num_classes} is fewer than the data's {len(dataset.classes)} classes")
    mean, std = _mean_std(cfg, train_set.images)
    if checkpoint is not None:  # the recorded normalisation, even if "dataset" statistics would now differ
        mean, std = checkpoint["eval"]["mean"], checkpoint["eval"]["std"]
        mean, std = (tuple(mean) if mean else None), (tuple(std) if std else None)
    eval_settings = eval_settings_dict(cfg, precision, mean, std, (height, width), in_chans)

    # model and optimiser
    drop_rates = {k: getattr(cfg, k) for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")
                  if getattr(cfg, k) is not None}
    model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, img_size=(height, width), **drop_rates)
    model.class_names = list(dataset.classes)
    model = model.to(device)  # unwrapped: checkpoints, evaluation, optimiser; the step trains through wrap_model
    optimizer = make_optimizer(model, cfg)
    # the data order is shared by every rank; augmentation and dropout differ by rank (rank 0's: one process's)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 2, rank))
    if rank:
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
    step = make_train_step(wrap_model(model, world_size), optimizer, augment_config(cfg, mean, std),
                           precision=precision, device=device,
                           label_smoothing=cfg.label_smoothing, num_classes=num_classes, generator=aug_gen,
                           skip_nonfinite=cfg.skip_nonfinite, world_size=world_size)
    local_batch = cfg.batch_size // world_size  # --batch-size is global
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)

    # where we are: fresh, or from last.pt
    state = {"epoch": 0, "batch": 0, "step": 0, "total_steps": cfg.epochs * steps_per_epoch, "best_top1": -1.0,
             "best_epoch": 0, "train_seconds": 0.0, "images": 0, "finished": False}
    history: list[dict] = []
    data_epoch_state = data_gen.get_state()
    if checkpoint is not None:
        _restore(checkpoint, model, optimizer, step, last_path)
        state.update(checkpoint["train_state"])
        history = [dict(r) for r in checkpoint["history"] if r["epoch"] <= state["epoch"]]
        data_epoch_state = checkpoint["rng"]["data_epoch_start"]
        data_gen.set_state(checkpoint["rng"]["data"])
        aug_gen.set_state(checkpoint["rng"]["augment"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        if world_size > 1:
            _restore_rank_rng(checkpoint["rng"], aug_gen, seed=cfg.seed, rank=rank, world_size=world_size,
                              step=state["step"])
            if rank:  # last.pt holds the running sums of all ranks, restored on rank 0 only
                step.reset_totals()
        if is_main:  # rows past the checkpoint's epoch (written after it, by a run that then died) go
            write_history(out / "history.csv", history)
        _log(quiet, f"resuming {out} at epoch {state['epoch'] + 1}" + (f", batch {state['batch']}" if state["batch"] else ""))
    deadline = None  # a budgeted run re-fits its length as it goes (not after a resume)
    budgeted = checkpoint is None and cfg.time_budget is not None
    if budgeted:
        state["total_steps"] = _fit_to_budget(cfg, model, step, train_set, val_set, steps_per_epoch,
                                              budget_seconds=cfg.time_budget * 60, local_batch=local_batch, quiet=quiet)
        state["total_steps"] = distributed.min_int(state["total_steps"])  # every rank the same length

    def epochs_to_cover() -> int:
        """Epochs until total_steps, from the steps taken (an epoch cut short by a re-fit stays short)."""
        return state["epoch"] + math.ceil((state["total_steps"] - state["step"] + state["batch"]) / steps_per_epoch)

    total_epochs = epochs_to_cover()
    # a run shortened by --epochs or --time-budget keeps a schedule: warm-up at most half, cooldown a quarter
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), state["total_steps"] // 2)
    cooldown_steps = min(round(cfg.cooldown_epochs * steps_per_epoch), state["total_steps"] // 4)

    def learning_rate(i: int) -> float:
        return lr_at(i, lr=cfg.lr, total_steps=state["total_steps"], warmup_steps=warmup_steps, warmup_lr=cfg.warmup_lr,
                     min_lr=cfg.min_lr, cooldown_steps=cooldown_steps, schedule=cfg.schedule)

    resolved = {**cfg.to_dict(), "precision_resolved": precision, "device_resolved": str(device),
                "total_steps": state["total_steps"], "steps_per_epoch": steps_per_epoch, "num_classes": num_classes,
                "in_chans": in_chans, "img_size_resolved": [height, width], "mean": eval_settings["mean"],
                "std": eval_settings["std"], "world_size": world_size}
    if is_main:
        write_json(out / "config.json", resolved)

    def save_last(path: Path = last_path) -> None:
        """Every rank calls this (it gathers); rank 0 writes."""
        step_state, rng = step.state_dict(), _rng_state(data_epoch_state, data_gen, aug_gen)
        if world_size > 1:  # the running sums of all ranks, and each rank's own random streams
            loss_sum, correct, seen = reduce_metrics(torch.stack([step.loss_sum, step.correct.double(),
                                                                  step.seen.double()]))
            step_state.update(loss_sum=loss_sum, correct=correct.long(), seen=seen.long())
            rng["ranks"] = distributed.all_gather_object(_rank_rng_state(aug_gen))
        if is_main:
            save_checkpoint(model, path, train_config=cfg.to_dict(), resolved_config=resolved, eval=eval_settings,
                            optimizer=optimizer.state_dict(), step_state=step_state, train_state=dict(state),
                            rng=rng, history=history)
        distributed.barrier()  # no rank goes on (to a resume, say) before last.pt is whole

    from .evaluate import evaluate
    from . import data as data_mod
    from . import stream as stream_mod

    def run_eval(images, labels, smoothing=0.0) -> dict:
        if world_size == 1:
            return evaluate(model, images, labels, precision=precision, batch_size=cfg.eval_batch_size, tta=cfg.tta,
                            mean=mean, std=std, device=device, label_smoothing=smoothing)
        from .evaluate import metrics, predict_logits
        # each rank predicts its share; the gathered logits give every rank the same metrics
        logits = distributed.sharded_rows(lambda part: predict_logits(
            model, part, precision=precision, batch_size=cfg.eval_batch_size, tta=cfg.tta, mean=mean, std=std,
            device=device), images)
        return metrics(logits, labels, label_smoothing=smoothing, class_names=model.class_names)

    stop = types.SimpleNamespace(signum=None)
    t_loop = time.perf_counter()
    if budgeted:  # the budget counts from the first training step, as the time to accuracy is measured
        deadline = t_loop + cfg.time_budget * 60
    with _stop_on_signals(stop):
        while state["epoch"] < total_epochs:
            epoch = state["epoch"]
            t_epoch, epoch_first_step = time.perf_counter(), state["step"]
            if state["batch"] == 0:
                data_epoch_state = data_gen.get_state()
                step.reset_totals()
            data_gen.set_state(data_epoch_state)  # the epoch's permutation, re-drawn identically on resume
            batches = data_mod.batch_indices(n_train, cfg.batch_size, data_gen, shuffle=True, drop_last=False,
                                             rank=rank, world_size=world_size)
            batches = itertools.islice(batches, state["batch"], None)
            mix = cfg.mix_off_epoch is None or epoch < cfg.mix_off_epoch
            steps_this_epoch = min(steps_per_epoch, state["total_steps"] - state["step"] + state["batch"])
            bar = _progress(quiet, epoch, total_epochs, n_train, state["batch"] * local_batch)
            lr = learning_rate(state["step"])
            for idx, images, labels in data_mod.load_batches(train_set, batches, pin_memory=device.type == "cuda"):
                if state["batch"] >= steps_this_epoch:
                    break
                lr = learning_rate(state["step"])
                try:  # with the step's exchange: one decision for all ranks, or some would wait
                    step(images, labels, lr, mix=mix, share=lambda: (
                        stop.signum is not None, deadline is not None and time.perf_counter() > deadline))
                except NonFiniteLossError as e:
                    if bar is not None:
                        bar.close()
                    raise NonFiniteLossError(
                        f"{e} at epoch {epoch + 1}, step {state['batch'] + 1}; stopped without saving — the last good "
                        f"checkpoint is {last_path}; try a lower --lr, --precision fp32, or --skip-nonfinite") from None
                state["batch"] += 1
                state["step"] += 1
                state["images"] += len(idx) * world_size
                if bar is not None:
                    bar.update(len(idx) * world_size)
                    if state["batch"] % cfg.log_interval == 0 or state["batch"] == steps_this_epoch:
                        # this rank's running loss: rank 0 alone shows a bar, so no collective here
                        local_loss = float(step.loss_sum) / max(1, int(step.seen))
                        bar.set_postfix_str(f"loss {local_loss:.4f} lr {lr:.3g}", refresh=False)
                stopping, out_of_time = step.shared
                if stopping or state["step"] == stop_at_step:
                    break
                if out_of_time:
                    state["total_steps"] = resolved["total_steps"] = state["step"]  # out of time: this epoch is the last
                    if is_main:
                        write_json(out / "config.json", resolved)
                    steps_this_epoch, total_epochs = state["batch"], epoch + 1
                    break
            if bar is not None:
                bar.close()
            state["train_seconds"] += time.perf_counter() - t_epoch
            if state["batch"] < steps_this_epoch:  # interrupted inside the epoch: record the position
                save_last()
                _interrupted(stop, out, state, steps_this_epoch, quiet)

            # end of epoch: evaluate, then best.pt → last.pt → history.csv (a crash between them is harmless)
            train_loss, train_top1, _ = step.totals()
            val = run_eval(val_set.images, val_set.labels, cfg.label_smoothing) if val_set is not None else None
            state.update(epoch=epoch + 1, batch=0)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_top1": train_top1,
                   "val_loss": val["loss"] if val else None, "val_top1": val["top1"] if val else None,
                   "val_top5": val["top5"] if val else None, "seconds": time.perf_counter() - t_epoch}
            history.append(row)
            improved = val is None or val["top1"] > state["best_top1"]
            if improved:
                state.update(best_top1=val["top1"] if val else -1.0, best_epoch=epoch + 1)
                if is_main:
                    save_checkpoint(model, best_path, train_config=cfg.to_dict(), eval=eval_settings,
                                    epoch=epoch + 1, val=_brief(val))
            if deadline is not None:
                # this epoch's cost of a step, evaluation and saving included: the latest rate, so that
                # one slow epoch (a busy machine, the first epoch's warm-up) does not cut the run for good
                per_step = (time.perf_counter() - t_epoch) / max(1, state["step"] - epoch_first_step)
                fit = state["step"] + int((deadline - time.perf_counter()) * 0.98 / per_step)
                fit = distributed.min_int(fit)
                # shorten whenever the run would overshoot; lengthen while a quarter of the longer
                # schedule remains to absorb it
                if fit < state["total_steps"] or (fit > state["total_steps"] and 4 * state["step"] < 3 * fit):
                    state["total_steps"] = max(fit, state["step"])
                    total_epochs = epochs_to_cover()
                    resolved["total_steps"] = state["total_steps"]
                    if is_main:
                        write_json(out / "config.json", resolved)
            state["finished"] = state["epoch"] >= total_epochs
            data_epoch_state = data_gen.get_state()
            save_last()
            if is_main:
                write_history(out / "history.csv", history)
                _plot_curves(history, out / "curves.png")
            _log(quiet, _epoch_line(row, total_epochs, step.skipped))
            if distributed.any_true(stop.signum is not None)[0] or state["step"] == stop_at_step:
                if state["epoch"] < total_epochs:
                    _interrupted(stop, out, state, steps_per_epoch, quiet)

    # test: with the best validation weights when asked (the Keras example's ModelCheckpoint + load_weights)
    if cfg.restore_best and val_set is not None and distributed.from_main(is_main and best_path.is_file()):
        if is_main:  # other machines may not see rank 0's files: rank 0 reads, then sends the weights
            model.load_state_dict(read_checkpoint(best_path)["state_dict"])
        distributed.broadcast_module(model)
    test = run_eval(dataset.test.images, dataset.test.labels) if dataset.test is not None else None
    results = {
        "model": cfg.model, "recipe": cfg.recipe, "params": num_params(model), "epochs": state["epoch"],
        "steps": state["step"], "test_top1": test["top1"] if test else None, "test_top5": test["top5"] if test else None,
        "test_loss": test["loss"] if test else None, "test_images": len(dataset.test.labels) if test else 0,
        "best_epoch": state["best_epoch"], "best_val_top1": state["best_top1"] if val_set is not None else None,
        "weights": "best" if cfg.restore_best and val_set is not None else "last",
        "train_seconds": round(state["train_seconds"], 2),
        "images_per_second": round(state["images"] / max(state["train_seconds"], 1e-9), 1),
        "train_images": n_train, "val_images": len(val_set.labels) if val_set is not None else 0,
        "data": cfg.data, "classes": list(dataset.classes), "skipped_images": dataset.skipped,
        "skipped_steps": step.skipped, "precision": precision, "seed": cfg.seed, "world_size": world_size,
        "device": str(device),
    }
    if is_main:
        write_json(out / "results.json", results)
        _log(quiet, f"done: {results['epochs']} epochs in {results['train_seconds']:.0f}s "
                    f"({results['images_per_second']:.0f} images/s)" +
             (f"; test top-1 {results['test_top1']:.4f}, top-5 {results['test_top5']:.4f}" if test else "") +
             f"; outputs in {out}")
    distributed.barrier()  # every output is written before any rank returns
    return results


def _restore(checkpoint: dict, model: nn.Module, optimizer, step: TrainStep, path: Path) -> None:
    try:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step.load_state_dict(checkpoint["step_state"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this run: {str(e).strip().splitlines()[0][:200]}") from None


def _interrupted(stop, out: Path, state: dict, steps_this_epoch: int, quiet: bool):
    where = (f"epoch {state['epoch'] + 1}, batch {state['batch']}/{steps_this_epoch}" if state["batch"]
             else f"the end of epoch {state['epoch']}")
    code = 128 + stop.signum if stop.signum is not None else 0
    message = f"stopped at {where}; saved {out / 'last.pt'}; resume with: cct train --resume {out}"
    raise TrainingInterrupted(message, code)


def _brief(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: metrics[k] for k in ("top1", "top5", "loss")}


def _epoch_line(row: dict, total_epochs: int, skipped: int) -> str:
    line = (f"epoch {row['epoch']}/{total_epochs}: lr {row['lr']:.3g}, train loss {row['train_loss']:.4f}, "
            f"top-1 {row['train_top1']:.4f}")
    if row["val_top1"] is not None:
        line += f"; val loss {row['val_loss']:.4f}, top-1 {row['val_top1']:.4f}, top-5 {row['val_top5']:.4f}"
    line += f"; {row['seconds']:.1f}s"
    return line + (f"; {skipped} non-finite steps skipped" if skipped else "")


def _progress(quiet: bool, epoch: int, total_epochs: int, n_images: int, done: int):
    if quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=n_images, initial=done, desc=f"epoch {epoch + 1}/{total_epochs}", unit="img", unit_scale=True,
                file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5)


def _plot_curves(history: list[dict], path: Path) -> None:
    from .plots import plot_curves
    plot_curves(history, path)


# ---------------------------------------------------------------------- time budget
def _fit_to_budget(cfg, model, step: TrainStep, train_set, val_set, steps_per_epoch: int, *,
                   budget_seconds: float, local_batch: int, quiet: bool) -> int:
    """Time the step on copies of the model and optimiser, then choose the number of steps that fits.

    Copies and a throwaway generator keep the real run untouched, so a budgeted run is still the
    seeded run, only of a measured length. Returns the number of steps. The loop then re-fits the
    run at each epoch's end from the time it really took, and stops at once if it runs out of time.
    """
    torch_state = torch.get_rng_state()
    trial_model, trial_opt = copy.deepcopy(model), None
    trial_opt = make_optimizer(trial_model, cfg)
    trial = make_train_step(trial_model, trial_opt, step.aug_cfg, precision=step.precision, device=step.device,
                            label_smoothing=step.label_smoothing, num_classes=step.num_classes,
                            generator=torch.Generator().manual_seed(12345))
    trial.sync_grads = step.sync_grads  # time the gradient exchange too (every rank runs the trial)
    n = len(train_set.labels)
    g = torch.Generator().manual_seed(0)
    warm, timed = 2, 6
    times = []
    for i in range(warm + timed):
        idx = torch.randint(0, n, (min(local_batch, n),), generator=g)
        t = time.perf_counter()
        trial(train_set.images[idx], train_set.labels[idx], cfg.lr * 1e-3)
        times.append(time.perf_counter() - t)
    torch.set_rng_state(torch_state)
    del trial_model, trial_opt, trial
    step_seconds = sorted(times[warm:])[timed // 2]
    # evaluation costs roughly a third of a training step per image
    eval_seconds_per_image = step_seconds / local_batch / 3
    val_seconds = (len(val_set.labels) if val_set is not None else 0) * eval_seconds_per_image
    remaining = budget_seconds * 0.97
    per_step = step_seconds + (val_seconds + 0.5) / steps_per_epoch
    total_steps = max(1, int(remaining / per_step))
    _log(quiet, f"time budget {cfg.time_budget:g} min: {step_seconds * 1e3:.0f} ms/step → {total_steps} steps "
                f"({total_steps / steps_per_epoch:.2f} epochs)")
    return total_steps


# ---------------------------------------------------------------------- command line
def _flag_type(tp):
    """(argparse type, nargs) of a TrainConfig field annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
        args = list(typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], len(typing.get_args(tp))
    return tp, None


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model", "data", "out", "recipe")) -> None:
    """One flag per TrainConfig field (`--batch-size`, `--hflip/--no-hflip`, ...); unset flags stay None."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, nargs = _flag_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, nargs=nargs, default=None, choices=f.metadata.get("choices"),
                               metavar=f.name.upper() if nargs is None and "choices" not in f.metadata else None,
                               help=help_text)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (recipes: keras, paper, fast)",
                              description="Train a model; writes last.pt, best.pt, history.csv, curves.png, "
                                          "config.json and results.json to --out.")
    p.add_argument("--model", help="a name from `cct models` (default: the recipe's own: "
                                   + ", ".join(f"{m} for {r}" for r, m in RECIPE_MODELS.items()) + ")")
    p.add_argument("--data", help="data source (a directory of class folders, an archive, ...)")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="keras (default for *_keras models), paper (default "
                                                            "otherwise) or fast")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_config_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("model", "data", "out", "recipe") and getattr(args, f.name) is not None}
    if overrides.get("rrc_scale") is not None:
        overrides["rrc_scale"] = tuple(overrides["rrc_scale"])
    if args.resume:
        extra = [k for k in ("model", "out", "recipe") if getattr(args, k) is not None]
        extra += [k for k in overrides if k not in RESUME_OVERRIDES]
        if extra:
            raise CCTError("--resume takes the run's configuration from its last.pt; drop "
                           + ", ".join("--" + k.replace("_", "-") for k in extra))
        cfg = resume_config(args.resume, **overrides, **({"data": args.data} if args.data else {}))
    else:
        missing = [k for k in ("data", "out") if not getattr(args, k)]
        if missing:
            raise CCTError("missing " + ", ".join("--" + k for k in missing) + " (or --resume DIR)")
        model = args.model or RECIPE_MODELS[args.recipe or "keras"]
        cfg = make_config(model, args.data, args.out, args.recipe, **overrides)
    validate(cfg)
    procs = distributed.resolve_procs(cfg.procs, resolve_device(cfg.device),
                                      batch_sizes={"--batch-size": cfg.batch_size})
    try:
        # --procs N: this process becomes rank 0 of N on this machine; without it (or under torchrun) a no-op
        with distributed.local_workers(procs, args.argv), \
                distributed.process_group(cfg.device, threads=cfg.workers) as job:  # a no-op for one process
            train(cfg, resume=bool(args.resume), quiet=args.quiet, rank=job.rank, world_size=job.world_size)
    except TrainingInterrupted as e:
        print(f"cct train: {e}", file=sys.stderr)
        return e.exit_code or 130
    return 0


def resume_config(out: str | Path, **overrides) -> TrainConfig:
    """The configuration of the run in `out`, from its last.pt, with `data`/`device`/`workers` overrides."""
    path = Path(out) / "last.pt"
    if not path.is_file() and (Path(out) / "config.json").is_file():  # stopped before its first last.pt
        try:
            cfg = TrainConfig.from_dict(json.loads((Path(out) / "config.json").read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"nothing to resume: no {path}, and {Path(out) / 'config.json'} is unreadable "
                                  f"({e})") from None
        return replace(cfg, out=str(out), **{k: v for k, v in overrides.items() if k != "quiet"})
    if not path.is_file():
        raise CCTError(f"nothing to resume: {path} not found")
    checkpoint = read_checkpoint(path)
    if "train_config" not in checkpoint or "train_state" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (no train_config/train_state)")
    cfg = TrainConfig.from_dict(checkpoint["train_config"])
    return replace(cfg, out=str(out), **{k: v for k, v in overrides.items() if k != "quiet"})
