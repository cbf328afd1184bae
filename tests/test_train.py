"""cct.train: outputs, resume, interruption, recipes, schedule, and the CLI's error paths (tiny data, CPU)."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cct import cli
from cct import train as train_mod
from cct.data import Dataset, ImageSet
from cct.train import (HISTORY_COLUMNS, RECIPES, TrainingInterrupted, lr_at, make_config, param_groups, train)
from helpers import CLASSES, make_tree, poison_loss

MODEL = "cct_2_3x2_32"  # at the data's 16×16: 16 tokens, a fraction of a second per epoch


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCT_DATA", str(tmp_path_factory.mktemp("cache")))
        yield




def memory_dataset(n_train=90, n_test=30, size=16) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def images(n):
        y = torch.arange(n) % 3
        x = (torch.rand(n, 3, size, size, generator=g) * 90 + y.view(-1, 1, 1, 1) * 70).to(torch.uint8)
        return ImageSet(x, y.long())
    return Dataset(images(n_train), images(n_test), None, list(CLASSES), "memory", 0)


def run_cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def finished_run(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    code = cli.main(["train", "--model", MODEL, "--data", str(tree), "--out", str(out), "--epochs", "2",
                     "--batch-size", "16", "--val-split", "0.25", "--precision", "fp32", "--quiet"])
    assert code == 0
    return out


def test_recipe_supplies_the_model_when_none_is_given(tree, tmp_path):
    out = tmp_path / "fast"
    assert cli.main(["train", "--recipe", "fast", "--data", str(tree), "--out", str(out), "--epochs", "1",
                     "--batch-size", "16", "--precision", "fp32", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "cct_2_3x2_32"


# ---------------------------------------------------------------------- outputs
def test_two_epoch_run_writes_every_output(finished_run, tree):
    out = finished_run
    for name in ("last.pt", "best.pt", "history.csv", "curves.png", "results.json", "config.json"):
        assert (out / name).is_file(), name
    with open(out / "history.csv", newline="") as f:
        assert next(csv.reader(f)) == list(HISTORY_COLUMNS)
    rows = read_history(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        for key in ("train_top1", "val_top1", "val_top5"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert 1e-5 <= float(r["lr"]) <= 5.5e-4  # the paper recipe's warm-up and cosine, squeezed into 2 epochs
    results = json.loads((out / "results.json").read_text())
    for key in ("model", "params", "epochs", "test_top1", "test_top5", "train_seconds", "images_per_second", "data",
                "precision", "seed", "recipe", "world_size"):
        assert key in results, key
    assert results["recipe"] == "paper"  # the default for a model that is not *_keras
    assert results["epochs"] == 2 and results["world_size"] == 1 and 0 <= results["test_top1"] <= 1
    assert results["test_images"] == 18 and results["val_images"] == 12
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == MODEL and config["epochs"] == 2 and config["img_size_resolved"] == [16, 16]
    assert config["num_classes"] == 3 and config["mean"] is not None  # paper: CIFAR mean/std
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["eval"]["batch_size"] == 256 and ckpt["eval"]["img_size"] == [16, 16]
    assert ckpt["class_names"] == CLASSES and ckpt["config"]["num_classes"] == 3


def test_eval_of_best_checkpoint_equals_results(finished_run, tree, capsys):
    results = json.loads((finished_run / "results.json").read_text())
    code, out, err = run_cli(["eval", str(finished_run / "best.pt"), "--data", str(tree), "--json"], capsys)
    assert code == 0
    report = json.loads(out)  # stdout is exactly one JSON object
    assert report["top1"] == results["test_top1"] and report["top5"] == results["test_top5"]
    assert report["loss"] == pytest.approx(results["test_loss"], abs=0, rel=0)
    assert set(report["per_class"]) == set(CLASSES) and report["split"] == "test"


def test_resuming_a_finished_run_says_so(finished_run, capsys):
    before = (finished_run / "history.csv").read_text()
    code, out, err = run_cli(["train", "--resume", str(finished_run)], capsys)
    assert code == 0 and "already finished" in err
    assert (finished_run / "history.csv").read_text() == before


def test_keras_recipe_is_the_example():
    cfg = make_config("cct_2_3x2_32_keras", "cifar10", "out")
    assert cfg.recipe == "keras"
    assert (cfg.lr, cfg.weight_decay, cfg.eps, cfg.label_smoothing, cfg.batch_size, cfg.epochs, cfg.val_split) == \
        (1e-3, 1e-4, 1e-7, 0.1, 128, 30, 0.1)
    assert cfg.weight_decay_all and cfg.hflip and cfg.normalize == "none" and cfg.restore_best
    paper = make_config("cct_7_3x1_32", "cifar10", "out")
    assert paper.recipe == "paper" and paper.rand_augment == "rand-m9-mstd0.5-inc1" and paper.mix_off_epoch == 175
    assert make_config("cct_7_3x1_32", "d", "o", "fast", epochs=3).epochs == 3
    assert set(RECIPES) == {"keras", "paper", "fast"}


# ---------------------------------------------------------------------- resume
def _history_without_seconds(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_history(path)]


def _resume_config(out, **kw):
    # hflip + translate + mixup (augmentation generator), dropout and drop path (torch RNG), shuffling
    return make_config(MODEL, "memory", str(out), "keras", epochs=2, batch_size=32, translate=2, mixup_alpha=0.4,
                       seed=3, **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, train(_resume_config(out), dataset=memory_dataset(), quiet=True)


@pytest.mark.parametrize("stop_step", [3, 4])  # 3 batches per epoch: after epoch 1, and mid-epoch 2
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, reference_run, stop_step):
    ds = memory_dataset()
    reference_dir, reference = reference_run
    out = tmp_path / "split"
    with pytest.raises(TrainingInterrupted, match="resume with: cct train --resume"):
        train(_resume_config(out), dataset=ds, quiet=True, stop_at_step=stop_step)
    if stop_step == 3:  # a row written after last.pt by a run that died: dropped on resume
        with open(out / "history.csv", "a") as f:
            f.write("2,0.001,9,0.5,9,0.5,0.5,1.0\n")
    resumed = train(train_mod.resume_config(out), dataset=ds, resume=True, quiet=True)
    assert _history_without_seconds(out / "history.csv") == _history_without_seconds(reference_dir / "history.csv")
    assert resumed["test_top1"] == reference["test_top1"] and resumed["test_loss"] == reference["test_loss"]


def test_sigint_saves_and_exits_130(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_call = train_mod.TrainStep.__call__

    def call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-epoch; the step still completes
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(train_mod.TrainStep, "__call__", call)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted) as info:
        train(_resume_config(out), dataset=memory_dataset(), quiet=True)
    assert info.value.exit_code == 130 and "batch 2/3" in str(info.value)
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_call=5)  # epoch 2, batch 2
    out = tmp_path / "stop"
    with pytest.raises(train_mod.NonFiniteLossError, match="epoch 2, step 2.*last good checkpoint"):
        train(_resume_config(out), dataset=memory_dataset(), quiet=True)
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["epoch"] == 1
    monkeypatch.undo()
    poison_loss(monkeypatch, at_call=5)  # a fresh count for the second run
    results = train(_resume_config(tmp_path / "skip", skip_nonfinite=True), dataset=memory_dataset(), quiet=True)
    assert results["skipped_steps"] == 1 and results["epochs"] == 2


def test_time_budget_fits_the_run(tmp_path):
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.08,
                      precision="fp32")
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert results["steps"] == config["total_steps"] >= 1
    # the budget covers training, first step to last (data loading and the final test excluded)
    assert results["train_seconds"] < 0.08 * 60 + 3.0


def test_time_budget_recovers_from_a_slow_epoch(tmp_path, monkeypatch):
    """A slow first epoch (a busy machine) shortens the plan; faster epochs after it lengthen it again.

    The loop's clock is virtual, advanced by each step, so the test checks the decisions and not
    the speed of the machine it runs on (real timings made it flaky on a loaded CI runner)."""
    import types
    clock = {"now": 0.0, "calls": 0}
    real_call = train_mod.TrainStep.__call__

    def timed_step(self, *args, **kwargs):
        clock["calls"] += 1
        # the 8 trial steps of the fit take 20 ms; the first epoch's 8 take 200 ms; later ones 20 ms
        clock["now"] += 0.2 if 8 < clock["calls"] <= 16 else 0.02
        return real_call(self, *args, **kwargs)

    plans, fits = [], []  # the initial plan and every agreed re-fit
    real_fit, real_min_int = train_mod._fit_to_budget, train_mod.distributed.min_int
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setattr(train_mod.TrainStep, "__call__", timed_step)
    monkeypatch.setattr(train_mod, "_fit_to_budget", lambda *a, **k: plans.append(real_fit(*a, **k)) or plans[-1])
    monkeypatch.setattr(train_mod.distributed, "min_int", lambda v: fits.append(real_min_int(v)) or fits[-1])
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "fast", batch_size=32, time_budget=0.05,
                      precision="fp32")
    results = train(cfg, dataset=memory_dataset(n_train=256), quiet=True)
    # the first min_int is the ranks agreeing on the plan; the end-of-epoch re-fits follow
    assert len(plans) == 1 and fits[0] == plans[0] and len(fits) >= 3
    refits = fits[1:]
    assert 8 < refits[0] < plans[0]  # the slow epoch cut the plan
    assert results["steps"] > 2 * refits[0]  # the fast epochs after it lengthened it again
    assert json.loads((tmp_path / "out" / "config.json").read_text())["total_steps"] == results["steps"]
    assert 0.05 * 60 * 0.9 < results["train_seconds"] <= 0.05 * 60  # most of the budget used, none overrun


# ---------------------------------------------------------------------- schedule and optimiser
def test_lr_schedule():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.1, min_lr=0.01, cooldown_steps=20)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(5, **kw) == pytest.approx(0.55)
    assert lr_at(40, **kw) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 40 / 80)))
    assert lr_at(80, **kw) == lr_at(99, **kw) == pytest.approx(0.01)
    assert lr_at(50, **{**kw, "schedule": "constant"}) == 1.0
    assert lr_at(3, lr=1e-3, total_steps=10, schedule="constant") == 1e-3


def test_weight_decay_groups():
    from cct import create_model
    model = create_model(MODEL)
    (everything,) = param_groups(model, 1e-4, decay_all=True)
    assert len(everything["params"]) == len(list(model.parameters()))
    decay, no_decay = param_groups(model, 6e-2, decay_all=False)
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(p is model.pos_embed for p in no_decay["params"])
    assert all(p is not model.pos_embed for p in decay["params"])


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("extra, message", [
    (["--model", "cct_nope"], "unknown model"),
    (["--recipe", "nope"], "invalid choice"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--val-split", "1.0"], "--val-split must be in [0, 1)"),
    (["--val-split", "-0.1"], "--val-split must be in [0, 1)"),
    (["--precision", "fp64"], "invalid choice"),
    (["--data", "/no/such/data"], "not found"),
])
def test_train_errors_are_one_line(tree, tmp_path, capsys, extra, message):
    argv = ["train", "--model", MODEL, "--data", str(tree), "--out", str(tmp_path / "o"), "--epochs", "1"] + extra
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_resume_errors(tmp_path, finished_run, capsys):
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "none")], capsys)
    assert code == 2 and "nothing to resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["train", "--resume", str(finished_run), "--lr", "1"], capsys)
    assert code == 2 and "drop --lr" in err
    code, _, err = run_cli(["train", "--model", MODEL, "--data", "x", "--out", str(finished_run)], capsys)
    assert code == 2 and "already holds a run" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "bad")], capsys)
    assert code == 2 and "last.pt" in err and len(err.strip().splitlines()) == 1


def test_subprocess_error_exit_code(tmp_path):
    argv = [sys.executable, "-m", "cct", "train", "--model", "cct_nope", "--data", "x", "--out", str(tmp_path / "o")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown model 'cct_nope'" in proc.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_between_steps_sees_the_current_weights(precision):
    """Validation after training steps evaluates the weights as they are now: the Keras model's folded
    inference attention caches its products, and train's fused AdamW updates weights in place without
    bumping their version counters (a stale cache once evaluated old weights mid-run)."""
    from cct import create_model
    from cct.evaluate import evaluate
    cfg = make_config("cct_2_3x2_32_keras", "memory", "unused", "keras", batch_size=16, precision=precision)
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32_keras")
    optimizer = train_mod.make_optimizer(model, cfg)
    step = train_mod.make_train_step(model, optimizer, train_mod.augment_config(cfg, None, None), precision=precision,
                                     device="cpu", label_smoothing=0.1, num_classes=10,
                                     generator=torch.Generator().manual_seed(1))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(16) % 10
    losses = []
    for _ in range(3):
        model.train()
        step(images, labels, 1e-2)
        model.eval()
        folded = evaluate(model, images, labels, precision=precision, batch_size=16)["loss"]
        for blk in model.blocks:
            blk.attn.fold = False
        plain = evaluate(model, images, labels, precision=precision, batch_size=16)["loss"]
        for blk in model.blocks:
            blk.attn.fold = True
        assert folded == pytest.approx(plain, rel=2e-2 if precision == "bf16" else 1e-4)
        losses.append(plain)
    assert len(set(losses)) == 3  # the weights did move
