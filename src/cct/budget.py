"""A run sized to a time budget (`cct train --time-budget MINUTES`).

Before the run, a few trial steps on copies of the model measure a step (`time_trial_steps`), and
`planned_steps` turns that into a number of steps. At each epoch's end the loop re-fits the plan
from the time the epoch really took (`steps_that_fit`, `refit`), and it stops at once when the
deadline passes. The sizing functions are pure arithmetic on seconds, so they can be checked on a
virtual clock.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .evaluate import tta_views
from .recipes import TrainConfig
from .runfiles import log
from .step import TrainStep, make_optimizer, make_train_step

# the share of the budget planned for; the rest absorbs the plan's error and the last evaluation
PLAN_SHARE, REFIT_SHARE = 0.97, 0.98


def planned_steps(*, budget_seconds: float, step_seconds: float, local_batch: int, val_images: int,
                  steps_per_epoch: int, eval_views: int = 1, native_step_seconds: float | None = None) -> int:
    """The steps that fit `budget_seconds` at `step_seconds` a step, validation at every epoch's end included;
    `eval_views` forward passes per validation image (test-time augmentation: `tta_views`), priced from
    `native_step_seconds` (a step at the input size evaluated; default `step_seconds`)."""
    # a forward pass: about a third of a training step
    eval_seconds_per_image = (native_step_seconds or step_seconds) / local_batch / 3
    val_seconds = val_images * eval_views * eval_seconds_per_image
    per_step = step_seconds + (val_seconds + 0.5) / steps_per_epoch
    return max(1, int(budget_seconds * PLAN_SHARE / per_step))


def schedule_cost(first: int, end: int, *, total_steps: int, phases: list[tuple[float, int]] | None,
                  costs: dict[int, float] | None, floor: int | None = None) -> float:
    """Steps `first` to `end` - 1 of a run of `total_steps`, in units of a native-resolution step: under
    progressive resizing (`phases` and `floor`, as `cct.step.resolution_at` reads them) a step at side s costs
    `costs[s]`."""
    if not phases:
        return float(end - first)
    units = 0.0
    bounds = [math.ceil(start * total_steps) for start, _ in phases[1:]] + [math.inf]
    lo = 0
    for (_, side), hi in zip(phases, bounds):  # phase i covers steps [lo, hi)
        units += max(0, min(end, hi) - max(first, lo)) * costs[max(side, floor or 0)]
        lo = hi
    return units


def steps_that_fit(*, step: int, seconds_left: float, seconds_per_step: float,
                   cost: Callable[[int, int], float] | None = None) -> int:
    """The total steps that end within the seconds left, at the last epoch's cost of a step.

    The latest epoch's rate (evaluation and saving included), so that one slow epoch (a busy
    machine, the first epoch's warm-up) does not cut the run for good. `cost(step, total)`: the remaining
    steps of a run of `total` in units of the step `seconds_per_step` prices (progressive resizing:
    `schedule_cost`); by default every step costs one.
    """
    affordable = seconds_left * REFIT_SHARE / seconds_per_step
    if cost is None:
        return step + int(affordable)
    # the remaining cost grows with the total (each added step costs more than the earlier phases' boundaries,
    # moving later, save), so bisect for the longest run that fits
    lo, hi = step, step + 1
    while cost(step, hi) <= affordable:
        lo, hi = hi, step + 2 * (hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(step, mid) <= affordable else (lo, mid)
    return lo


def refit(*, step: int, total_steps: int, fit: int) -> int:
    """The run's new length once `fit` steps fit: shorter whenever the run would overshoot; longer while a
    quarter of the longer schedule remains to absorb it; else unchanged. Never before `step`."""
    if fit < total_steps or (fit > total_steps and 4 * step < 3 * fit):
        return max(fit, step)
    return total_steps


def time_trial_steps(cfg: TrainConfig, model: nn.Module, step: TrainStep, train_set, *, local_batch: int,
                     resolutions: list[int | None], warm: int = 2, timed: int = 6) -> dict[int | None, float]:
    """The median seconds of a training step at each input side of `resolutions` (None: native), timed on
    copies of the model and optimiser.

    The sides take turns, one step each per round, so a host that speeds up or slows down during the trial
    (a shared VM does) moves every side's time alike and leaves their ratios, which decide progressive
    resizing, as they are. Copies and a throwaway generator keep the real run untouched, so a budgeted run
    is still the seeded run, only of a measured length.
    """
    torch_state = torch.get_rng_state()
    trial_model = copy.deepcopy(model)
    trial_optimizer = make_optimizer(trial_model, cfg, precision=step.precision)
    trial = make_train_step(trial_model, trial_optimizer, step.aug_cfg, precision=step.precision, device=step.device,
                            label_smoothing=step.label_smoothing, num_classes=step.num_classes,
                            generator=torch.Generator().manual_seed(12345))
    trial.sync_grads = step.sync_grads  # time the gradient exchange too (every rank runs the trial)
    n = len(train_set.labels)
    g = torch.Generator().manual_seed(0)
    times: dict[int | None, list[float]] = {side: [] for side in resolutions}
    for _ in range(warm + timed):
        idx = torch.randint(0, n, (min(local_batch, n),), generator=g)
        for side in resolutions:
            trial.resolution = side
            t = time.perf_counter()
            trial(train_set.inputs[idx], train_set.labels[idx], cfg.lr * 1e-3)
            times[side].append(time.perf_counter() - t)
    torch.set_rng_state(torch_state)
    return {side: sorted(t[warm:])[timed // 2] for side, t in times.items()}


def fit_to_budget(cfg: TrainConfig, model: nn.Module, step: TrainStep, train_set, *, val_images: int,
                  steps_per_epoch: int, local_batch: int, quiet: bool,
                  phases: list[tuple[float, int]] | None = None) -> tuple[int, dict[int, float] | None]:
    """The steps that fit `cfg.time_budget` minutes: a trial (`time_trial_steps`), then `planned_steps`.

    Under progressive resizing (`phases`) the trial prices a step at each side, the sides interleaved; the plan
    takes their mean over the schedule, or drops the schedule where that mean exceeds `cfg.res_schedule_max_cost`
    of a native step. Returns (steps, each side's cost of a step relative to the native one: None without a
    schedule or where it was dropped).
    """
    native = phases[-1][1] if phases else None  # timed as the loop runs it: TrainStep scales nothing down there
    seconds = time_trial_steps(cfg, model, step, train_set, local_batch=local_batch,
                               resolutions=sorted({side for _, side in phases}) if phases else [None])
    step_seconds = seconds[native]
    costs, mean_seconds = None, step_seconds
    if phases:
        costs = {side: t / step_seconds for side, t in seconds.items()}
        mean_seconds = sum((end - start) * seconds[side]
                           for (start, side), end in zip(phases, [start for start, _ in phases[1:]] + [1.0]))
    sides = "" if not costs else " (" + ", ".join(f"{s}px ×{c:.2f}" for s, c in sorted(costs.items())) + ")"
    if costs and cfg.res_schedule_max_cost is not None and mean_seconds > cfg.res_schedule_max_cost * step_seconds:
        log(quiet, f"progressive resizing off: its mean step costs ×{mean_seconds / step_seconds:.2f} of a "
                   f"full-size one on this machine{sides}, above the ×{cfg.res_schedule_max_cost:g} at which it pays "
                   "(--res-schedule-max-cost); full size throughout")
        costs, mean_seconds, sides = None, step_seconds, ""
    total = planned_steps(budget_seconds=cfg.time_budget * 60, step_seconds=mean_seconds, local_batch=local_batch,
                          val_images=val_images, steps_per_epoch=steps_per_epoch,
                          eval_views=tta_views(cfg.tta, cfg.tta_translate), native_step_seconds=step_seconds)
    log(quiet, f"time budget {cfg.time_budget:g} min: {step_seconds * 1e3:.0f} ms/step{sides} → {total} steps "
               f"({total / steps_per_epoch:.2f} epochs)")
    return total, costs
