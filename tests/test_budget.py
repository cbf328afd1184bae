"""cct.budget: sizing a run to --time-budget, as arithmetic on a virtual clock and inside `train()` (CPU)."""
import json
import types
from dataclasses import replace

import pytest
import torch

import cct

from cct import budget, distributed
from cct import train as train_mod
from cct.evaluate import tta_logits, tta_views
from cct.optim import Lookahead
from cct.recipes import make_config
from cct.checkpoint import read_checkpoint
from cct.policies import AugmentConfig
from cct.step import TrainStep, resolution_at
from cct.resume import resume_config
from cct.train import TrainingInterrupted, train
from helpers import MODEL, memory_dataset


# ---------------------------------------------------------------------- the arithmetic
def test_planned_steps_leave_room_for_validation():
    kw = dict(budget_seconds=100.0, step_seconds=0.1, local_batch=100, steps_per_epoch=10)
    without = budget.planned_steps(val_images=0, **kw)
    assert without == int(100 * budget.PLAN_SHARE / (0.1 + 0.05))  # half a second an epoch for saving
    with_val = budget.planned_steps(val_images=3000, **kw)  # 3000 images at a third of a step's cost: 1 s
    assert with_val == int(100 * budget.PLAN_SHARE / (0.1 + 1.5 / 10)) < without
    assert budget.planned_steps(**{**kw, "budget_seconds": 1e-3}, val_images=0) == 1  # never zero
    # test-time augmentation: 6 forward passes per validation image cost 6 s an epoch, not 1
    with_tta = budget.planned_steps(val_images=3000, eval_views=6, **kw)
    assert with_tta == int(100 * budget.PLAN_SHARE / (0.1 + 6.5 / 10)) < with_val


@pytest.mark.parametrize("tta, translate", [(False, 0), (True, 0), (True, 1)])
def test_tta_views_counts_the_forward_passes_of_tta_logits(tta, translate):
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x.mean((1, 2, 3))[:, None].repeat(1, 10)

    model, x = Counting(), torch.zeros(4, 3, 8, 8)
    logits = model(x)
    if tta:
        tta_logits(model, x, logits, translate)
    assert len(calls) == tta_views(tta, translate)


def test_refit_shortens_at_once_and_lengthens_while_a_quarter_remains():
    assert budget.refit(step=10, total_steps=100, fit=60) == 60  # would overshoot: shorter
    assert budget.refit(step=70, total_steps=100, fit=60) == 70  # never before the steps already taken
    assert budget.refit(step=10, total_steps=100, fit=140) == 140  # early: longer
    assert budget.refit(step=110, total_steps=100, fit=140) == 100  # too late to absorb a longer schedule
    assert budget.refit(step=10, total_steps=100, fit=100) == 100


def test_refits_on_a_virtual_clock_follow_the_machine():
    """Epochs of 10 steps on a clock advanced by hand: a slow first epoch cuts the plan, faster ones restore it."""
    budget_seconds, steps_per_epoch = 60.0, 10
    total = budget.planned_steps(budget_seconds=budget_seconds, step_seconds=0.1, local_batch=32, val_images=0,
                                 steps_per_epoch=steps_per_epoch)
    now, step, totals = 0.0, 0, []
    while step < total:
        seconds_per_step = 1.0 if step == 0 else 0.1
        steps = min(steps_per_epoch, total - step)  # the last epoch ends at the planned step
        now += seconds_per_step * steps
        step += steps
        fit = budget.steps_that_fit(step=step, seconds_left=budget_seconds - now, seconds_per_step=seconds_per_step)
        total = budget.refit(step=step, total_steps=total, fit=fit)
        totals.append(total)
    assert totals[0] < 100 and totals[1] > totals[0]  # cut after the slow epoch, lengthened after a fast one
    assert now <= budget_seconds and now > 0.9 * budget_seconds  # ends within the budget, most of it used


def test_schedule_cost_prices_each_phase_at_its_side():
    phases, costs = [(0.0, 16), (0.4, 24), (0.7, 32)], {16: 0.25, 24: 0.5, 32: 1.0}
    kw = dict(total_steps=10, phases=phases, costs=costs)
    assert budget.schedule_cost(0, 10, **kw) == 4 * 0.25 + 3 * 0.5 + 3 * 1.0  # steps 0-3 at 16, 4-6 at 24, 7-9 at 32
    assert budget.schedule_cost(3, 8, **kw) == 0.25 + 3 * 0.5 + 1.0
    assert budget.schedule_cost(3, 8, total_steps=10, phases=None, costs=None) == 5  # no resizing: steps
    assert budget.schedule_cost(0, 10, **kw, floor=24) == 7 * 0.5 + 3 * 1.0  # never below the side reached


def test_refits_on_a_virtual_clock_price_cheap_low_resolution_epochs():
    """Progressive resizing on a virtual clock: epochs at a quarter of the cost early must not make the re-fit
    believe every later step is as cheap (which would overrun the budget and cut the full-size phase short)."""
    phases, costs = [(0.0, 16), (0.5, 32)], {16: 0.25, 32: 1.0}
    budget_seconds, native, steps_per_epoch = 60.0, 0.1, 10
    mean = 0.5 * 0.25 * native + 0.5 * native
    total = budget.planned_steps(budget_seconds=budget_seconds, step_seconds=mean, local_batch=32, val_images=0,
                                 steps_per_epoch=steps_per_epoch)
    now, step, sides = 0.0, 0, []

    def cost(first, end, total_steps):
        return budget.schedule_cost(first, end, total_steps=total_steps, phases=phases, costs=costs)

    while step < total:
        first, end = step, min(step + steps_per_epoch, total)
        sides += [resolution_at(s, total_steps=total, phases=phases) for s in range(first, end)]
        spent = native * cost(first, end, total)
        now, step = now + spent, end
        fit = budget.steps_that_fit(step=step, seconds_left=budget_seconds - now,
                                    seconds_per_step=spent / cost(first, end, total),
                                    cost=lambda a, n: cost(a, n, n))
        total = budget.refit(step=step, total_steps=total, fit=fit)
    assert 0.9 * budget_seconds < now <= budget_seconds  # most of the budget, no overrun
    assert step > budget_seconds / native  # more steps than at the native size alone
    assert 0.4 < sides.count(32) / len(sides) < 0.6  # the full-size phase kept its share


# ---------------------------------------------------------------------- inside the loop
def _virtual_clock(monkeypatch, seconds) -> dict:
    """The loop and the budget's trial on a virtual clock: every training step, the trial's included, runs as it
    would and then advances the clock by `seconds(step, args, kwargs)` (which may also record the call). The
    test then checks the decisions, not the speed of the machine it runs on (real timings were flaky on CI)."""
    clock = {"now": 0.0}
    real_call = TrainStep.__call__

    def timed_step(self, *args, **kwargs):
        clock["now"] += seconds(self, args, kwargs)
        return real_call(self, *args, **kwargs)

    virtual = types.SimpleNamespace(perf_counter=lambda: clock["now"])
    monkeypatch.setattr(train_mod, "time", virtual)
    monkeypatch.setattr(budget, "time", virtual)
    monkeypatch.setattr(TrainStep, "__call__", timed_step)
    return clock


def _record(plans: list, fit: tuple[int, dict | None]) -> tuple[int, dict | None]:
    plans.append(fit[0])
    return fit


def test_the_trial_leaves_the_run_untouched():
    """The budget's trial steps train copies, with their own generator, and restore torch's random state: the real
    model, optimiser and random streams are as they were, so a budgeted run is still the seeded run."""
    from cct.step import augment_config, make_optimizer, make_train_step
    torch.manual_seed(0)
    cfg = make_config(MODEL, "memory", "unused", "fast", batch_size=8, precision="fp32")
    model = cct.create_model(MODEL, num_classes=3, img_size=16, drop_path_rate=0.2)  # drop path draws from torch
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(1)
    step = make_train_step(model, optimizer, augment_config(cfg, None, None), precision="fp32", device="cpu",
                           label_smoothing=0.1, num_classes=3, generator=generator)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    states = torch.get_rng_state(), generator.get_state()
    times = budget.time_trial_steps(cfg, model, step, memory_dataset(n_train=32, size=16).train, local_batch=8,
                                    resolutions=[None, 8], warm=1, timed=2)
    assert set(times) == {None, 8} and all(t > 0 for t in times.values())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), states[0]) and torch.equal(generator.get_state(), states[1])


def test_a_run_past_its_deadline_stops_after_the_step(tmp_path, monkeypatch):
    """A host that stalls mid-epoch (its 5th step takes 100 s of a 3 s budget): the run ends right after that step,
    with that epoch its last and the plan cut to the steps taken, never a step past the deadline."""
    calls = []

    def seconds(step, args, kwargs) -> float:
        calls.append(1)
        return 100.0 if len(calls) == 8 + 5 else 0.02  # 8 trial steps, then the run's 5th
    _virtual_clock(monkeypatch, seconds)
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.05,
                      precision="fp32", res_schedule=None)
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    assert (results["steps"], results["epochs"]) == (5, 1) and len(calls) == 8 + 5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["total_steps"] == 5
    assert results["test_top1"] is not None  # tested, as a run that ends on time is


def test_time_budget_fits_the_run(tmp_path):
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.08,
                      precision="fp32")
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert results["steps"] == config["total_steps"] >= 1
    # the budget covers training, first step to last (data loading and the final test excluded)
    assert results["train_seconds"] < 0.08 * 60 + 3.0


@pytest.mark.parametrize("lookahead", [False, True])
def test_time_budget_recovers_from_a_slow_epoch(tmp_path, monkeypatch, lookahead):
    """A slow first epoch (a busy machine) shortens the plan; faster epochs after it lengthen it again; with
    --lookahead its schedule follows each plan, and the run's last step ends on its slow weights.

    The loop's clock is virtual (`_virtual_clock`)."""
    calls = []

    def seconds(step, args, kwargs) -> float:
        calls.append(1)
        # the 8 trial steps of the fit take 20 ms; the first epoch's 8 take 200 ms; later ones 20 ms
        return 0.2 if 8 < len(calls) <= 16 else 0.02

    _virtual_clock(monkeypatch, seconds)
    plans, fits = [], []  # the initial plan and every agreed re-fit
    real_fit, real_min_int = budget.fit_to_budget, distributed.min_int
    monkeypatch.setattr(budget, "fit_to_budget", lambda *a, **k: _record(plans, real_fit(*a, **k)))
    monkeypatch.setattr(distributed, "min_int", lambda v: fits.append(real_min_int(v)) or fits[-1])
    updates, finished = [], []  # --lookahead: (step, planned steps) of each update; the lookahead at each finish
    real_update, real_finish = Lookahead.update, Lookahead.finish
    monkeypatch.setattr(Lookahead, "update", lambda self, t, total: updates.append((t, total)) or
                        real_update(self, t, total))
    monkeypatch.setattr(Lookahead, "finish", lambda self: real_finish(self) or finished.append(self))
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.05,
                      precision="fp32", res_schedule=None, lookahead=lookahead)  # one cost a step (resizing: below)
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    if lookahead:
        assert [t for t, _ in updates] == list(range(1, results["steps"] + 1))
        assert {total for _, total in updates} <= set(fits) | {results["steps"]}  # the plans, or the budget's cut
        assert updates[7][1] == plans[0] and updates[8][1] == fits[1]  # the first epoch's re-fit moved the schedule
        # the run ends on the slow weights (an epoch that reached the plan, then re-fitted longer, finished once
        # more: a sync with d = 1 in mid-run)
        assert finished and all(torch.equal(p, s) for p, s in zip(finished[-1].params, finished[-1].slow))
    else:
        assert not updates and not finished
    # the first min_int is the ranks agreeing on the plan; the end-of-epoch re-fits follow
    assert len(plans) == 1 and fits[0] == plans[0] and len(fits) >= 3
    refits = fits[1:]
    assert 8 < refits[0] < plans[0]  # the slow epoch cut the plan
    assert results["steps"] > 2 * refits[0]  # the fast epochs after it lengthened it again
    assert json.loads((tmp_path / "out" / "config.json").read_text())["total_steps"] == results["steps"]
    assert 0.05 * 60 * 0.9 < results["train_seconds"] <= 0.05 * 60  # most of the budget used, none overrun


@pytest.mark.parametrize("res_schedule", [None, "0.5@0,1@0.5"])
def test_a_resumed_budgeted_run_keeps_to_what_is_left_of_its_budget(tmp_path, monkeypatch, res_schedule):
    """Interrupted after 12 steps, resumed on a host twice as slow: the resumed run re-fits to the budget's
    remaining seconds (at the trial's prices of each size, saved for it), so training stays within the budget."""
    host = {"slow": False}
    _virtual_clock(monkeypatch, lambda step, args, kwargs: (0.04 if host["slow"] else 0.02)
                   * (0.5 if step.resolution == 8 else 1.0))
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.05,
                      precision="fp32", res_schedule=res_schedule, res_schedule_max_cost=None)
    with pytest.raises(TrainingInterrupted):
        train(cfg, dataset=memory_dataset(n_train=256), quiet=True, stop_at_step=12)
    planned = read_checkpoint(tmp_path / "out" / "last.pt")["train_state"]["total_steps"]
    host["slow"] = True
    results = train(resume_config(tmp_path / "out"), dataset=memory_dataset(n_train=256), quiet=True, resume=True)
    assert 0.05 * 60 * 0.85 < results["train_seconds"] <= 0.05 * 60
    assert 12 < results["steps"] < planned  # shortened to what the slower host fits


def test_lookahead_ends_on_its_slow_weights_when_a_refit_ends_the_run(tmp_path, monkeypatch):
    """The re-fit at the first epoch's end finds no time left (the deadline passed while it evaluated, say): the run
    ends there, after the epoch's own check found steps still planned. It still ends on the slow weights, and the
    checkpoints and the test hold those weights."""
    monkeypatch.setattr(budget, "steps_that_fit", lambda *, step, **_: step)
    finished = []
    real_finish = Lookahead.finish
    monkeypatch.setattr(Lookahead, "finish", lambda self: real_finish(self) or finished.append(self))
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=1.0,
                      precision="fp32", res_schedule=None, lookahead=True)
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    assert results["steps"] == 8 and len(finished) == 1  # one epoch of 8 steps, of many planned
    slow = finished[0].slow
    assert all(torch.equal(p, s) for p, s in zip(finished[0].params, slow))
    for name in ("best.pt", "last.pt"):  # (the lookahead holds the optimiser's order of the parameters)
        saved = list(read_checkpoint(tmp_path / "out" / name)["state_dict"].values())
        assert all(any(v.shape == s.shape and torch.equal(v, s) for v in saved) for s in slow), name


def test_time_budget_scales_the_recipes_schedule(tmp_path, monkeypatch, capsys):
    """Under --time-budget, warm-up and the MixUp/CutMix stop keep their share of the recipe's --epochs at the
    planned length, whatever that length is (a fast machine's or a slow one's); --epochs alone keeps them in epochs."""
    calls = []  # (lr, mix) of every step of the real run
    _virtual_clock(monkeypatch, lambda step, args, kwargs: calls.append((args[2], kwargs.get("mix", True))) or 0.02)
    plans = []
    real_fit = budget.fit_to_budget
    monkeypatch.setattr(budget, "time_trial_steps", lambda *a, **k: {side: 0.02 for side in k["resolutions"]})
    monkeypatch.setattr(budget, "fit_to_budget", lambda *a, **k: _record(plans, real_fit(*a, **k)))
    # 256 images at batch 32: 8 steps an epoch; the recipe: 10 epochs, 1 of warm-up, MixUp until epoch 4
    options = dict(batch_size=32, precision="fp32", epochs=10, warmup_epochs=1, mixup_alpha=0.2, mix_off_epoch=4,
                   res_schedule=None)
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", time_budget=0.06, **options)
    train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    scale = plans[0] / 80
    assert 0.3 < scale < 0.8 and config["schedule_scale"] == round(scale, 6)
    warmup = round(8 * scale)
    assert config["warmup_steps"] == warmup < 8
    lrs = [lr for lr, _ in calls]
    ramp = [cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * i / warmup for i in range(warmup)]
    assert lrs[:warmup] == pytest.approx(ramp) and lrs[warmup] > lrs[warmup - 1]  # a warm-up of `warmup` steps
    mix_off = round(4 * 8 * scale)  # epochs starting before this step mix
    assert [mix for _, mix in calls[::8]] == [8 * e < mix_off for e in range(len(calls[::8]))]
    assert sum(mix for _, mix in calls) < 4 * 8  # fewer than the unscaled 4 epochs

    # a resumed budgeted run keeps the scale it was planned with (its length is the checkpoint's, not re-planned)
    stopped = make_config(MODEL, "memory", str(tmp_path / "stopped"), "fast", time_budget=0.06, **options)
    with pytest.raises(TrainingInterrupted):
        train(stopped, dataset=memory_dataset(n_train=256), quiet=True, stop_at_step=12)
    train(resume_config(tmp_path / "stopped"), dataset=memory_dataset(n_train=256), quiet=True, resume=True)
    assert json.loads((tmp_path / "stopped" / "config.json").read_text())["warmup_steps"] == warmup

    calls.clear()
    unbudgeted = make_config(MODEL, "memory", str(tmp_path / "fixed"), "fast", **{**options, "epochs": 6})
    train(unbudgeted, dataset=memory_dataset(n_train=256), quiet=True)
    assert json.loads((tmp_path / "fixed" / "config.json").read_text())["warmup_steps"] == 8
    assert [mix for _, mix in calls] == [i < 4 * 8 for i in range(6 * 8)]
    # a run too short for its warm-up keeps half of it, and says so
    capsys.readouterr()
    train(replace(unbudgeted, out=str(tmp_path / "short"), epochs=1), dataset=memory_dataset(n_train=256), quiet=False)
    assert "schedule: warm-up 8 → 4 steps (at most half of the run's 8)" in capsys.readouterr().err
    assert json.loads((tmp_path / "short" / "config.json").read_text())["warmup_steps"] == 4


@pytest.mark.parametrize("small_cost, max_cost, kept", [
    (0.25, None, True),   # no limit: the schedule runs whatever it saves
    (0.25, 0.7, True),    # mean cost 0.5 × 0.25 + 0.5 = 0.625 of a native step: under the limit
    (0.5, 0.7, False),    # mean cost 0.75: over it, so full size throughout
])
def test_time_budget_with_progressive_resizing(tmp_path, monkeypatch, capsys, small_cost, max_cost, kept):
    """--res-schedule under --time-budget, on a virtual clock where a step at 8 px costs `small_cost` of one at the
    native 16: the trial prices both sides, the run fills the budget without overrunning it, and the native phase
    keeps its share of the steps; where the schedule's mean step costs more than --res-schedule-max-cost, the run
    trains at full size throughout, and says so."""
    sides = []  # the side of every step of the real run (the trials' steps excluded)

    def seconds(step, args, kwargs) -> float:
        if kwargs.get("share") is not None:  # the loop's steps pass their stop flags; the trials' do not
            sides.append(step.resolution or 16)
        return 0.02 * small_cost if step.resolution == 8 else 0.02

    _virtual_clock(monkeypatch, seconds)
    out = tmp_path / "out"
    cfg = make_config(MODEL, "memory", str(out), "fast", batch_size=32, time_budget=0.05, precision="fp32",
                      res_schedule="0.5@0,1@0.5", res_schedule_max_cost=max_cost)
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=False)
    assert 0.05 * 60 * 0.9 < results["train_seconds"] <= 0.05 * 60
    assert results["steps"] == len(sides)
    saved = json.loads((out / "config.json").read_text())["res_schedule"]
    native = results["train_images_seen"] * 6 * cct.count_macs(cct.create_model(MODEL, img_size=16)) / 1e12
    if kept:
        assert results["steps"] > 0.05 * 60 / 0.02  # more steps than at 16 px throughout
        assert 0.4 < sides.count(16) / len(sides) < 0.6 and sides[-1] == 16
        assert results["train_tflop"] < 0.75 * native  # the 8-px images priced at their size
        assert saved == "0.5@0,1@0.5" and "progressive resizing off" not in capsys.readouterr().err
    else:
        assert set(sides) == {16} and results["steps"] < 0.05 * 60 / 0.02
        assert results["train_tflop"] == pytest.approx(native, abs=1e-3)  # results.json rounds it
        assert "progressive resizing off: its mean step costs ×0.75" in capsys.readouterr().err
        # the run's records say what it trained, so a resume from them trains at full size too
        assert saved is None and read_checkpoint(out / "last.pt")["train_config"]["res_schedule"] is None


def test_a_longer_refit_never_goes_back_to_smaller_images(tmp_path, monkeypatch):
    """The trial prices a full-size step at twice what the run's take: the re-fits after the first full-size epoch
    lengthen the run, which moves the full-size phase's start past the steps already trained at full size. The
    images stay at full size from the first full-size step on."""
    sides = []

    def seconds(step, args, kwargs) -> float:
        in_loop = kwargs.get("share") is not None  # the loop's steps pass their stop flags; the trial's do not
        if in_loop:
            sides.append(step.resolution)
        return 0.005 if step.resolution == 8 else 0.02 if in_loop else 0.04

    _virtual_clock(monkeypatch, seconds)
    plans = []
    real_refit = budget.refit
    monkeypatch.setattr(budget, "refit", lambda **k: plans.append(real_refit(**k)) or plans[-1])
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.05,
                      precision="fp32", res_schedule="0.5@0,1@0.3")
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    first_full = sides.index(16)
    assert any(b > a for a, b in zip(plans, plans[1:]) if a >= first_full)  # lengthened after full size began
    assert sides[first_full:] == [16] * (len(sides) - first_full)
    assert results["steps"] == len(sides) and results["train_seconds"] <= 0.05 * 60


def test_trial_prices_each_side_under_the_same_host_speed(monkeypatch):
    """The sides take turns in the trial, so a host that slows down halfway through it (here to half speed)
    leaves the ratio of a reduced step to a native one, which decides progressive resizing, at its true 0.5.
    Timed side after side, the native steps would all fall in the fast half and the 8-px ones in the slow one."""
    clock, calls = {"now": 0.0}, []

    def timed_step(self, *args, **kwargs):
        calls.append(self.resolution)
        slow = 2.0 if len(calls) > 8 else 1.0
        clock["now"] += slow * (0.01 if self.resolution == 8 else 0.02)

    monkeypatch.setattr(budget, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setattr(TrainStep, "__call__", timed_step)
    cfg = make_config(MODEL, "memory", "unused", "fast", batch_size=32, precision="fp32")
    model = cct.create_model(MODEL, img_size=16, num_classes=10)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), AugmentConfig(),
                     precision="fp32", device="cpu", label_smoothing=0.0, num_classes=10,
                     generator=torch.Generator())
    seconds = budget.time_trial_steps(cfg, model, step, memory_dataset(n_train=64).train, local_batch=32,
                                      resolutions=[None, 8], warm=2, timed=6)
    assert calls == [None, 8] * 8  # interleaved
    assert seconds[8] / seconds[None] == pytest.approx(0.5)


@pytest.mark.parametrize("min_epochs, mixes", [(None, True), (2.0, True), (20.0, False)])
def test_mixing_only_in_runs_planned_long_enough(tmp_path, monkeypatch, capsys, min_epochs, mixes):
    """--mix-min-epochs reads the planned length: a budget that plans about 7 epochs mixes under a threshold of 2
    and trains unmixed throughout under one of 20 (and says so); a resume keeps the decision, not re-deciding it
    from the shorter run left; --epochs alone is the planned length without a budget."""
    mixed = []  # whether each step of the real run was asked to mix (the trials' steps excluded)

    def seconds(step, args, kwargs) -> float:
        if kwargs.get("share") is not None:
            mixed.append(kwargs.get("mix", True))
        return 0.02

    _virtual_clock(monkeypatch, seconds)
    monkeypatch.setattr(budget, "time_trial_steps", lambda *a, **k: {side: 0.02 for side in k["resolutions"]})
    # 256 images at batch 32: 8 steps an epoch; 0.04 min at 0.02 s a step: about 7 epochs planned of --epochs 10
    options = dict(batch_size=32, precision="fp32", epochs=10, cutmix_alpha=1.0, mix_prob=0.5, res_schedule=None,
                   mix_min_epochs=min_epochs)
    stopped = make_config(MODEL, "memory", str(tmp_path / "b"), "fast", time_budget=0.04, **options)
    with pytest.raises(TrainingInterrupted):
        train(stopped, dataset=memory_dataset(n_train=256), quiet=False, stop_at_step=12)
    train(resume_config(tmp_path / "b"), dataset=memory_dataset(n_train=256), quiet=True, resume=True)
    planned = json.loads((tmp_path / "b" / "config.json").read_text())["schedule_scale"] * 10
    assert 2 < planned < 20
    assert len(mixed) > 40 and set(mixed) == {mixes}
    assert ("MixUp/CutMix off: this run is planned for" in capsys.readouterr().err) == (not mixes)

    mixed.clear()
    fixed = make_config(MODEL, "memory", str(tmp_path / "e"), "fast", **{**options, "epochs": 3})
    train(fixed, dataset=memory_dataset(n_train=256), quiet=True)
    assert set(mixed) == {min_epochs is None or 3 >= min_epochs}
