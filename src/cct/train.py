"""Training: the loop — `cct train`.

As nanoGPT's train.py, one `train(config) -> results` function whose body is an ordered list of
phases (where the run stands → runtime → data → model and step → position → length → epochs →
test). The data phase is the input kind's (`cct.kinds`): `cct.image_run` for images, `cct.text_run`
for text; every later phase sees batches of (inputs, labels) and a model config. Beside it: the step,
optimiser and schedule (`cct.step`), recipes (`cct.recipes`), last.pt and the random streams
(`cct.resume`), the output files (`cct.runfiles`), the time budget (`cct.budget`), the command line (`cct.cli`).

Interruption (SIGINT/SIGTERM): the current step finishes, `last.pt` records the position inside the
epoch (the epoch's shuffling seed, the batch index and the running sums), and `--resume` continues
from that very batch, so an interrupted run ends exactly as an uninterrupted one would.

Several processes (`cct train --procs N` on one CPU, or `torchrun --nproc_per_node N -m cct train ...`,
see `cct.distributed`): data-parallel training, gradients averaged by DistributedDataParallel on GPUs
and by one exchange per step on CPUs. `--batch-size` stays the global batch; every rank draws the
same epoch permutation and trains on its shard of each batch; augmentation and dropout are seeded per
rank; metric sums are all-reduced; validation and test are sharded and gathered; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import budget, data as data_mod, distributed, kinds, runfiles
from .augment import alternating_flips, flip_where
from .checkpoint import read_checkpoint, save_checkpoint
from .data import Dataset
from .errors import CCTError, TrainingInterrupted
from .evaluate import evaluate, metrics, predict_logits
from .image_run import image_inputs, pretrained_image_model
from .kernels import fuse, use_kernels
from .kinds import RunInputs, TextPreprocessing
from .model import num_params
from .preprocess import Preprocessing
from .recipes import TrainConfig, drop_rates, make_config, mixing_off, validate
from .registry import create_model, model_kind
from .runlock import hold_run_lock
from .resume import is_finished, last_state, read_last, restore, resume_config
from .runfiles import log
from .runtime import configure_threads, resolve_device, resolve_precision
from .step import (NonFiniteLossError, TrainStep, lr_at, make_optimizer, make_train_step, res_phases,
                   resolution_at, schedule_steps, trained_macs, wrap_model)
from .text_data import TextDataset
from .text_run import text_inputs

# `make_config` and `resume_config` stay importable from here: the two ways to get a `train()` config
__all__ = ["TrainingInterrupted", "make_config", "resume_config", "train"]


# ---------------------------------------------------------------------- model
def _build_model(cfg: TrainConfig, inputs: RunInputs, *, num_classes: int, device: torch.device,
                 pretrained: str | None, quiet: bool) -> nn.Module:
    classes = inputs.classes
    if num_classes < len(classes):
        raise CCTError(f"--num-classes {num_classes} is fewer than the data's {len(classes)} classes")
    overrides = dict(num_classes=num_classes, **inputs.model_overrides, **drop_rates(cfg))
    model = (pretrained_image_model(cfg.model, pretrained, classes, quiet=quiet, **overrides) if pretrained and
             model_kind(cfg.model) == "image" else create_model(cfg.model, pretrained=pretrained, **overrides))
    model.class_names = list(classes)
    if inputs.setup_model is not None:
        inputs.setup_model(model)
    use_kernels(model, cfg.kernels)
    return model.to(device)  # unwrapped: checkpoints, evaluation, optimiser; the step trains through wrap_model


# ---------------------------------------------------------------------- the run's shared state
@dataclass
class _Run:
    """What the phases of `train()` share; `state` is the position, saved in last.pt as "train_state"."""
    cfg: TrainConfig
    out: Path
    rank: int
    world_size: int
    quiet: bool
    device: torch.device
    precision: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    data_gen: torch.Generator  # the data order: the same on every rank
    aug_gen: torch.Generator  # augmentation: this rank's own
    inputs: RunInputs  # the splits, the input record (`prep`, saved in every checkpoint as "eval"), ...
    steps_per_epoch: int
    data_epoch_state: torch.Tensor  # `data_gen` at the start of the current epoch
    state: dict
    history: list[dict] = field(default_factory=list)
    resolved: dict = field(default_factory=dict)  # config.json
    total_epochs: int = 0
    warmup_steps: int = 0
    cooldown_steps: int = 0
    mix_off_step: int | None = None  # MixUp/CutMix stop at the first epoch starting at or after this step
    phases: list[tuple[float, int]] | None = None  # progressive resizing (--res-schedule): (start fraction, side)
    step_costs: dict[int, float] | None = None  # a budgeted run's cost of a step at each side, native = 1
    epoch_floor: int | None = None  # the smallest input side this epoch could train at (`resolution_at`'s floor)
    deadline: float | None = None  # time.perf_counter() at which a budgeted run must end
    signum: int | None = None  # the signal that asked the run to stop

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def prep(self) -> Preprocessing | TextPreprocessing:
        return self.inputs.prep

    def epochs_to_cover(self) -> int:
        """Epochs until total_steps, from the steps taken (an epoch cut short by a re-fit stays short)."""
        s = self.state
        return s["epoch"] + math.ceil((s["total_steps"] - s["step"] + s["batch"]) / self.steps_per_epoch)

    def lr(self, step: int) -> float:
        return lr_at(step, lr=self.cfg.lr, total_steps=self.state["total_steps"], warmup_steps=self.warmup_steps,
                     warmup_lr=self.cfg.warmup_lr, min_lr=self.cfg.min_lr, cooldown_steps=self.cooldown_steps,
                     schedule=self.cfg.schedule)

    def resolution(self, step: int) -> int | None:
        """The input side of optimisation step `step` (None: no progressive resizing, the native size)."""
        if self.phases is None:
            return None
        return resolution_at(step, total_steps=self.state["total_steps"], phases=self.phases,
                             floor=self.state.get("side_floor"))

    def stop_flags(self) -> tuple[bool, bool]:
        """(a signal asked to stop, the time budget is spent): shared by the ranks in the step's collective."""
        return self.signum is not None, self.deadline is not None and time.perf_counter() > self.deadline

    def set_total_steps(self, total_steps: int) -> None:
        self.state["total_steps"] = self.resolved["total_steps"] = total_steps
        if self.is_main:
            runfiles.write_json(self.out / "config.json", self.resolved)

    def eval_metrics(self, inputs, labels: torch.Tensor, smoothing: float = 0.0) -> dict:
        if self.world_size == 1:  # `evaluate` starts with `cct.kernels.fuse`: the weights as they are now
            return evaluate(self.model, inputs, labels, self.prep, device=self.device, label_smoothing=smoothing)
        # each rank predicts its share; the gathered logits give every rank the same metrics
        fuse(self.model)
        logits = distributed.sharded_rows(lambda part: predict_logits(self.model, part, self.prep, device=self.device),
                                          inputs)
        return metrics(logits, labels, label_smoothing=smoothing, class_names=self.model.class_names)

    def records(self) -> dict:
        """What every checkpoint of the run carries for `cct eval` and `cct predict`."""
        split = self.inputs.split_record
        return {"eval": self.prep.to_dict(), **({"split": split} if split else {})}

    def save_last(self) -> None:
        """Every rank calls this (it gathers); rank 0 writes."""
        step_state, rng = last_state(self.step, data_epoch_state=self.data_epoch_state, data_gen=self.data_gen,
                                     aug_gen=self.aug_gen, world_size=self.world_size)
        if self.is_main:
            save_checkpoint(self.model, self.out / "last.pt", train_config=self.cfg.to_dict(),
                            resolved_config=self.resolved, **self.records(),
                            optimizer=self.optimizer.state_dict(), step_state=step_state,
                            train_state=dict(self.state), rng=rng, history=self.history)
        distributed.barrier()  # no rank goes on (to a resume, say) before last.pt is whole

    def interrupted(self, steps_this_epoch: int) -> TrainingInterrupted:
        s = self.state
        where = (f"epoch {s['epoch'] + 1}, batch {s['batch']}/{steps_this_epoch}" if s["batch"]
                 else f"the end of epoch {s['epoch']}")
        code = 128 + self.signum if self.signum is not None else 0
        return TrainingInterrupted(f"stopped at {where}; saved {self.out / 'last.pt'}; resume with: "
                                   f"cct train --resume {self.out}", code)


@contextlib.contextmanager
def _stop_on_signals(run: _Run, *, testing: bool = False):
    """SIGINT/SIGTERM set `run.signum` so the loop ends after the current step; a second one aborts. While testing
    (training done, last.pt written) the first one stops at once, saying that a resume runs the test."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if testing:
            raise TrainingInterrupted(f"{signal.Signals(signum).name} while testing: training is complete; "
                                      f"cct train --resume {run.out} runs the test", 128 + signum)
        if run.signum is not None:
            raise KeyboardInterrupt
        run.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving last.pt "
              "(send it again to abort without saving)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, dataset: Dataset | TextDataset | None = None, resume: bool = False, quiet: bool = False,
          stop_at_step: int | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Train a model as `config` says, writing checkpoints, history, curves and results to `config.out`.

    Args:
        config: the run's configuration (see `make_config`).
        dataset: an in-memory `cct.data.Dataset` (or `cct.text_data.TextDataset`) to use instead of loading
            `config.data`.
        resume: continue the run in `config.out` from its `last.pt`.
        quiet: nothing on stderr but warnings and errors.
        stop_at_step: stop as if interrupted after this many optimisation steps (for tests and sessions).
        rank, world_size: this process's place in a data-parallel job; world_size > 1 needs the process
            group joined first (`cct.distributed.process_group`, which `cct train` enters under torchrun).
    Returns:
        the contents of `results.json`.
    Raises:
        TrainingInterrupted: after a signal or `stop_at_step`, once `last.pt` is written.
    """
    with hold_run_lock(config.out, rank=rank):  # one run per folder; other ranks share rank 0's lock
        return _train(config, dataset=dataset, resume=resume, quiet=quiet, stop_at_step=stop_at_step, rank=rank,
                      world_size=world_size)


def _train(config: TrainConfig, *, dataset: Dataset | TextDataset | None, resume: bool, quiet: bool,
           stop_at_step: int | None, rank: int, world_size: int) -> dict:
    """`train()`'s phases, in order, under the run folder's lock."""
    cfg = config
    validate(cfg)
    quiet = quiet or rank != 0
    if cfg.batch_size % world_size:
        raise CCTError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the {world_size} "
                       "processes")
    out = Path(cfg.out)

    # where the run stands: fresh, resumed from last.pt, or already finished (rank 0's view: no rank trains alone)
    checkpoint = read_last(out, resume=resume, quiet=quiet, data=cfg.data)
    if checkpoint is not None and distributed.from_main(is_finished(checkpoint, out)):
        log(quiet, f"{out}: this run is already finished ({checkpoint['train_state']['epoch']} epochs); "
                   f"results in {out / 'results.json'}")
        return json.loads((out / "results.json").read_text())
    if rank == 0:  # partial writes of a killed run; a fresh run's older results.json
        runfiles.clear_leftovers(out, fresh=checkpoint is None)

    # where and how it computes
    configure_threads(cfg.workers or None)
    device = distributed.local_device(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    # data of the model's kind (images, text): the splits, the input record, the augmentation
    if dataset is None:
        kind = kinds.data_kind(cfg.data, cfg.data_kind, cfg.model)
    elif (kind := "text" if isinstance(dataset, TextDataset) else "image") != model_kind(cfg.model):
        raise CCTError(f"--model {cfg.model} is a {model_kind(cfg.model)} model, but the dataset given holds {kind}")
    if kind == "text":
        inputs = text_inputs(cfg, checkpoint=checkpoint, precision=precision, quiet=quiet, dataset=dataset, device=device)
    else:
        inputs = image_inputs(cfg, dataset, checkpoint=checkpoint, precision=precision, quiet=quiet)
    train_set, val_set, n_train = inputs.train_set, inputs.val_set, len(inputs.train_set)
    num_classes, precision = cfg.num_classes or len(inputs.classes), inputs.precision or precision  # text: a trial's

    # model, optimiser and step; the data order is shared by every rank, augmentation and dropout are
    # each rank's own (rank 0's: one process's)
    model = _build_model(cfg, inputs, num_classes=num_classes, device=device, quiet=quiet,
                         pretrained=cfg.pretrained if checkpoint is None else None)
    optimizer = make_optimizer(model, cfg, precision=precision)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 2, rank))
    if rank:
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
    step = make_train_step(wrap_model(model, world_size), optimizer, inputs.aug_cfg,
                           precision=precision, device=device, label_smoothing=cfg.label_smoothing,
                           num_classes=num_classes, generator=aug_gen, skip_nonfinite=cfg.skip_nonfinite,
                           world_size=world_size, lookahead=cfg.lookahead)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    # images trained at each reduced side (progressive resizing), for the run's TFLOP
    state = {"epoch": 0, "batch": 0, "step": 0, "total_steps": cfg.epochs * steps_per_epoch, "best_top1": -1.0,
             "best_epoch": 0, "train_seconds": 0.0, "images": 0, "reduced_images": {}, "finished": False}
    run = _Run(cfg=cfg, out=out, rank=rank, world_size=world_size, quiet=quiet, device=device, precision=precision,
               model=model, optimizer=optimizer, step=step, data_gen=data_gen, aug_gen=aug_gen, inputs=inputs,
               steps_per_epoch=steps_per_epoch, data_epoch_state=data_gen.get_state(),
               state=state, phases=res_phases(cfg, model))

    # position: where last.pt left the run
    if checkpoint is not None:
        restored, run.history, run.data_epoch_state = restore(
            checkpoint, out / "last.pt", model=model, optimizer=optimizer, step=step, data_gen=data_gen,
            aug_gen=aug_gen, seed=cfg.seed, rank=rank, world_size=world_size, classes=inputs.classes)
        state.update(restored)
        if rank == 0:  # rows past the checkpoint's epoch (written after it, by a run that then died) go
            runfiles.write_history(out / "history.csv", run.history)
        where = f"at epoch {state['epoch'] + 1}" + (f", batch {state['batch']}" if state["batch"] else "")
        log(quiet, f"resuming {out} " + ("after its last step: testing" if state["step"] >= state["total_steps"] else where))

    # length: --epochs, or what fits --time-budget (fitted before the run, re-fitted at each epoch's end)
    budgeted = checkpoint is None and cfg.time_budget is not None
    if budgeted:
        planned, run.step_costs = budget.fit_to_budget(
            cfg, model, step, train_set, steps_per_epoch=steps_per_epoch,
            val_images=len(val_set.labels) if val_set is not None else 0, local_batch=cfg.batch_size // world_size,
            quiet=quiet, phases=run.phases)
        # resizing does not pay here (by any rank's trial): this run, its records and a resume at full size
        if run.phases and distributed.any_true(run.step_costs is None)[0]:
            cfg = run.cfg = replace(cfg, res_schedule=None)
            run.phases, run.step_costs = None, None
        state["total_steps"] = distributed.min_int(planned)  # every rank the same length
        state["step_costs"] = run.step_costs  # for a resume's re-fits
    elif cfg.time_budget is not None and run.phases:  # resumed: the trial's prices (before they were saved: 1)
        run.step_costs = state.get("step_costs") or {side: 1.0 for _, side in run.phases}
    run.total_epochs = run.epochs_to_cover()
    # the schedule's shape. --time-budget keeps the recipe's shape at the length that fits: warm-up, cooldown and
    # the MixUp/CutMix stop scale by the planned steps over --epochs' (a 10-epoch recipe with 1 warm-up epoch warms
    # up for a tenth of any budget, on a fast machine or a slow one). Fixed when planned, recorded for a resume.
    if "schedule_scale" not in state:  # a fresh run, or one saved before the scale was recorded
        state["schedule_scale"] = state["total_steps"] / (cfg.epochs * steps_per_epoch) if budgeted else 1.0
    scaled = state["schedule_scale"] * steps_per_epoch
    run.warmup_steps, run.cooldown_steps, capped = schedule_steps(cfg, steps_per_epoch=scaled,
                                                                  total_steps=state["total_steps"])
    if capped:
        log(quiet, capped)
    run.mix_off_step = None if cfg.mix_off_epoch is None else round(cfg.mix_off_epoch * scaled)
    if reason := mixing_off(cfg, planned_epochs=state["schedule_scale"] * cfg.epochs):  # as planned, not re-fitted
        run.mix_off_step = 0
        log(quiet, reason)
    run.resolved = runfiles.resolved_config(cfg, precision=precision, device=str(device), world_size=world_size,
                                            total_steps=state["total_steps"], steps_per_epoch=steps_per_epoch,
                                            num_classes=num_classes, prep=inputs.prep)
    run.resolved.update(schedule_scale=round(state["schedule_scale"], 6), warmup_steps=run.warmup_steps,
                        cooldown_steps=run.cooldown_steps, mix_off_step=run.mix_off_step)
    if rank == 0:
        runfiles.write_json(out / "config.json", run.resolved)
        runfiles.write_record(out / "split.json", inputs.split_record)

    # the epochs; a budget counts from the first training step, as the time to accuracy is measured (a resumed run
    # has what its training so far left of it, and re-fits to that)
    if cfg.time_budget is not None:
        run.deadline = time.perf_counter() + cfg.time_budget * 60 - state["train_seconds"]
    if world_size > 1 and rank == 0:  # a recipe's --procs (the keras one's: one per core) is otherwise silent
        log(quiet, f"training in {world_size} data-parallel processes (--procs 1 for one)")
    with _stop_on_signals(run):
        while state["epoch"] < run.total_epochs:
            t_epoch, first_step, run.epoch_floor = time.perf_counter(), state["step"], state.get("side_floor")
            lr = _train_epoch(run, train_set, t_epoch=t_epoch, stop_at_step=stop_at_step)
            _end_epoch(run, val_set, lr=lr, t_epoch=t_epoch, first_step=first_step, stop_at_step=stop_at_step)

    with _stop_on_signals(run, testing=True):  # with the best validation weights when asked (as the Keras example)
        test = _test(run)
    results = runfiles.results(cfg, state=state, test=test, params=num_params(model), inputs=inputs,
                               train_images=n_train, val_images=len(val_set.labels) if val_set is not None else None,
                               skipped_steps=step.skipped, precision=precision, world_size=world_size,
                               device=str(device), train_macs=None if kind != "image" else
                               trained_macs(model, state["images"], state.get("reduced_images", {})))
    if rank == 0:
        runfiles.write_json(out / "results.json", results)
        log(quiet, runfiles.done_line(results, out))
    distributed.barrier()  # every output is written before any rank returns
    return results


def _train_epoch(run: _Run, train_set, *, t_epoch: float, stop_at_step: int | None) -> float:
    """The steps of one epoch (from `state["batch"]` on, to the epoch's end or a stop); returns the last lr.

    Stopped inside the epoch (a signal, `stop_at_step`): last.pt records the position, then
    TrainingInterrupted. Out of time: this epoch becomes the last.
    """
    cfg, state, step = run.cfg, run.state, run.step
    epoch, n_train = state["epoch"], len(train_set.labels)
    if state["batch"] == 0:
        run.data_epoch_state = run.data_gen.get_state()
        step.reset_totals()
    run.data_gen.set_state(run.data_epoch_state)  # the epoch's permutation, re-drawn identically on resume
    batches = itertools.islice(data_mod.batch_indices(n_train, cfg.batch_size, run.data_gen, shuffle=True, drop_last=False,
                                                      rank=run.rank, world_size=run.world_size), state["batch"], None)
    mix = run.mix_off_step is None or state["step"] - state["batch"] < run.mix_off_step  # from the epoch's start
    flips = alternating_flips(n_train, seed=cfg.seed + 3, epoch=epoch) if cfg.alternate_flip else None
    steps_this_epoch = min(run.steps_per_epoch, state["total_steps"] - state["step"] + state["batch"])
    bar = runfiles.progress_bar(run.quiet, epoch, run.total_epochs, n_train,
                                state["batch"] * (cfg.batch_size // run.world_size), kind=run.inputs.kind)
    lr = run.lr(state["step"])
    try:
        for idx, batch, labels in data_mod.load_batches(train_set, batches, pin_memory=run.device.type == "cuda"):
            if state["batch"] >= steps_this_epoch:
                break
            if flips is not None:  # by the images' indices, which the step's augmentation does not see
                batch = flip_where(batch, flips[idx])
            lr = run.lr(state["step"])
            step.resolution = state["side_floor"] = run.resolution(state["step"])  # never smaller again
            try:  # the stop flags travel with the step's exchange: one decision for all ranks, or some would wait
                step(batch, labels, lr, mix=mix, share=run.stop_flags)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} at epoch {epoch + 1}, step {state['batch'] + 1}; stopped without "
                                         f"saving{runfiles.nonfinite_advice(run.out, run.precision)}") from None
            state["batch"] += 1
            state["step"] += 1
            if step.lookahead is not None:  # by the planned length, which a budget's re-fit moves
                step.lookahead.update(state["step"], state["total_steps"])
            state["images"] += len(idx) * run.world_size
            if step.resolution is not None and step.resolution != run.phases[-1][1]:
                reduced = state.setdefault("reduced_images", {})
                reduced[step.resolution] = reduced.get(step.resolution, 0) + len(idx) * run.world_size
            if bar is not None:
                bar.update(len(idx) * run.world_size)
                if state["batch"] % cfg.log_interval == 0 or state["batch"] == steps_this_epoch:
                    # this rank's running loss: rank 0 alone shows a bar, so no collective here
                    local_loss = float(step.loss_sum) / max(1, int(step.seen))
                    side = f" {step.resolution}px" if step.resolution is not None else ""
                    bar.set_postfix_str(f"loss {local_loss:.4f} lr {lr:.3g}{side}", refresh=False)
            stopping, out_of_time = step.shared
            if stopping or state["step"] == stop_at_step:
                break
            if out_of_time:  # this epoch is the last
                run.set_total_steps(state["step"])
                steps_this_epoch, run.total_epochs = state["batch"], epoch + 1
                break
    finally:
        if bar is not None:
            bar.close()
    if step.lookahead is not None and state["step"] >= state["total_steps"]:  # the run's last step (or cut)
        step.lookahead.finish()
    state["train_seconds"] += time.perf_counter() - t_epoch
    if state["batch"] < steps_this_epoch:  # interrupted inside the epoch: record the position (and its time so far)
        state["epoch_seconds"] = state.get("epoch_seconds", 0.0) + time.perf_counter() - t_epoch
        run.save_last()
        raise run.interrupted(steps_this_epoch)
    return lr


def _end_epoch(run: _Run, val_set, *, lr: float, t_epoch: float, first_step: int,
               stop_at_step: int | None) -> None:
    """Evaluate, re-fit a budget, then best.pt → last.pt → history.csv (a crash between them is harmless)."""
    cfg, state = run.cfg, run.state
    epoch = state["epoch"]
    train_loss, train_top1, _ = run.step.totals()

    def validate() -> dict | None:
        return run.eval_metrics(val_set.inputs, val_set.labels, cfg.label_smoothing) if val_set is not None else None

    val = validate()
    state.update(epoch=epoch + 1, batch=0)
    if run.deadline is not None:  # priced with this epoch's evaluation (saving is small beside it)
        planned = state["total_steps"]
        _refit_to_budget(run, t_epoch=t_epoch, first_step=first_step)
        if run.step.lookahead is not None and planned > state["step"] >= state["total_steps"]:
            run.step.lookahead.finish()  # the re-fit ends the run here, past the epoch's own check: end as promised
            val = validate()
    row = runfiles.history_row(epoch + 1, lr=lr, train_loss=train_loss, train_top1=train_top1, val=val,
                               seconds=time.perf_counter() - t_epoch + state.pop("epoch_seconds", 0.0))
    run.history.append(row)
    if val is None or val["top1"] > state["best_top1"]:
        state.update(best_top1=val["top1"] if val else -1.0, best_epoch=epoch + 1)
        if run.is_main:
            save_checkpoint(run.model, run.out / "best.pt", train_config=cfg.to_dict(), **run.records(),
                            epoch=epoch + 1, val=runfiles.brief(val))
    state["finished"] = state["epoch"] >= run.total_epochs
    run.data_epoch_state = run.data_gen.get_state()
    run.save_last()
    if run.is_main:
        runfiles.write_history(run.out / "history.csv", run.history)
        runfiles.write_curves(run.history, run.out / "curves.png")
    log(run.quiet, runfiles.epoch_line(row, run.total_epochs, run.step.skipped, len(run.inputs.classes)))
    if distributed.any_true(run.signum is not None)[0] or state["step"] == stop_at_step:
        if state["epoch"] < run.total_epochs:
            raise run.interrupted(run.steps_per_epoch)


def _refit_to_budget(run: _Run, *, t_epoch: float, first_step: int) -> None:
    """Re-plan the run's length from this epoch's cost of a step, its evaluation included."""
    state = run.state
    def cost(first: int, end: int, total_steps: int, floor: int | None) -> float:  # in native steps (resizing: cheaper)
        return budget.schedule_cost(first, end, total_steps=total_steps, phases=run.phases, costs=run.step_costs,
                                    floor=floor)

    epoch_cost = cost(first_step, state["step"], state["total_steps"], run.epoch_floor)
    seconds_per_step = (time.perf_counter() - t_epoch) / max(1.0, epoch_cost)
    fit = distributed.min_int(budget.steps_that_fit(
        step=state["step"], seconds_left=run.deadline - time.perf_counter(), seconds_per_step=seconds_per_step,
        cost=(lambda first, total: cost(first, total, total, state.get("side_floor"))) if run.phases else None))
    total_steps = budget.refit(step=state["step"], total_steps=state["total_steps"], fit=fit)
    if total_steps != state["total_steps"]:
        run.set_total_steps(total_steps)
        run.total_epochs = run.epochs_to_cover()


def _test(run: _Run) -> dict | None:
    best_path, test_set = run.out / "best.pt", run.inputs.test_set
    if run.cfg.restore_best and run.inputs.val_set is not None:
        if distributed.from_main(run.is_main and best_path.is_file()):  # rank 0 reads, then sends the weights
            if run.is_main:  # (other machines may not see rank 0's files)
                run.model.load_state_dict(read_checkpoint(best_path)["state_dict"])
            distributed.broadcast_module(run.model)
        else:  # deleted since the epoch that wrote it (results.json then says "last")
            log(run.quiet, f"{best_path} is missing: testing the last weights")
    return run.eval_metrics(test_set.inputs, test_set.labels) if test_set is not None and len(test_set.labels) else None

