"""cct.train: the loop's outputs, interruption, non-finite losses, and `cct train`'s error paths (tiny data, CPU).

The step, resume, run files, recipes and time budget have test files of their own.
"""
import csv
import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cct import cli
from cct.runfiles import HISTORY_COLUMNS
from cct.step import NonFiniteLossError, TrainStep
from cct.train import TrainingInterrupted, make_config, train
from helpers import CLASSES, MODEL, make_tree, memory_dataset, poison_loss, run_cli, seeded_config


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCT_DATA", str(tmp_path_factory.mktemp("cache")))
        yield




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
    assert json.loads((out / "config.json").read_text())["model"] == "cct_2_3x5_32"


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


def test_the_best_validation_weights_are_restored_before_the_test(tree, tmp_path, capsys, monkeypatch):
    """--restore-best (the keras recipe's ModelCheckpoint + load_weights): validation scores that peak at epoch 1 make
    best.pt epoch 1's, and the test is of those weights, not of the last epoch's."""
    from cct import train as train_mod
    real, scores = train_mod._Run.eval_metrics, iter([0.9, 0.1, 0.1])

    def eval_metrics(self, inputs, labels, smoothing=0.0):
        result = real(self, inputs, labels, smoothing)
        return dict(result, top1=next(scores)) if inputs is self.inputs.val_set.inputs else result
    monkeypatch.setattr(train_mod._Run, "eval_metrics", eval_metrics)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", MODEL, "--data", str(tree), "--out", str(out), "--epochs", "3",
                            "--batch-size", "8", "--val-split", "0.25", "--restore-best", "--lr", "0.05", "--quiet"],
                           capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["weights"] == "best" and results["best_epoch"] == 1
    monkeypatch.undo()
    reports = {}
    for name in ("best.pt", "last.pt"):
        code, stdout, err = run_cli(["eval", str(out / name), "--data", str(tree), "--json"], capsys)
        assert code == 0, err
        reports[name] = json.loads(stdout)
    assert reports["best.pt"]["loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    assert reports["last.pt"]["loss"] != pytest.approx(results["test_loss"], rel=1e-6)  # another epoch's weights


@pytest.mark.parametrize("flags, smoothing", [([], 0.1), (["--label-smoothing", "0.3"], 0.3)])
def test_the_recipes_label_smoothing_reaches_the_loss(tree, tmp_path, capsys, monkeypatch, flags, smoothing):
    from cct import train as train_mod
    seen = []
    real = train_mod.make_train_step

    def spy(model, optimizer, aug_cfg, **kwargs):
        seen.append((kwargs["label_smoothing"], aug_cfg.label_smoothing))
        return real(model, optimizer, aug_cfg, **kwargs)
    monkeypatch.setattr(train_mod, "make_train_step", spy)
    code, _, err = run_cli(["train", "--model", MODEL, "--data", str(tree), "--out", str(tmp_path / "r"), "--epochs",
                            "1", "--batch-size", "8", "--train-limit", "16", "--quiet", *flags], capsys)
    assert code == 0, err
    assert seen == [(smoothing, smoothing)]  # the paper recipe's 0.1, or the flag's


def test_resuming_a_finished_run_says_so(finished_run, capsys):
    before = (finished_run / "history.csv").read_text()
    code, out, err = run_cli(["train", "--resume", str(finished_run)], capsys)
    assert code == 0 and "already finished" in err
    assert (finished_run / "history.csv").read_text() == before


def test_alternate_flip_mirrors_each_image_in_every_other_epoch(tmp_path, monkeypatch):
    data = memory_dataset()
    seen = []  # each batch as the step receives it, 3 an epoch
    real_call = TrainStep.__call__

    def call(self, inputs, labels, *args, **kwargs):
        assert not self.aug_cfg.hflip  # the loop flips; the step's augmentation must not flip again
        seen.append(inputs.clone())
        return real_call(self, inputs, labels, *args, **kwargs)
    monkeypatch.setattr(TrainStep, "__call__", call)
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "keras", epochs=3, batch_size=32, alternate_flip=True)
    train(cfg, dataset=data, quiet=True)
    originals, mirrors = data.train.inputs, data.train.inputs.flip(-1)

    def sides(epoch):  # each training image of the epoch: True where it came to the step mirrored
        batches = seen[3 * epoch:3 * epoch + 3]
        mirrored = {}
        for x in torch.cat(batches):
            hits = [(i, m) for i in range(len(originals)) for m, ref in ((False, originals), (True, mirrors))
                    if torch.equal(x, ref[i])]
            assert len(hits) == 1
            mirrored[hits[0][0]] = hits[0][1]
        assert len(mirrored) == 81  # every training image once (the keras recipe holds out 9 of the 90)
        return mirrored
    first = sides(0)
    assert 0 < sum(first.values()) < len(first)
    assert sides(1) == {i: not m for i, m in first.items()} and sides(2) == first


# ---------------------------------------------------------------------- interruption, non-finite losses
def test_sigint_saves_and_exits_130(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_call = TrainStep.__call__

    def call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-epoch; the step still completes
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(TrainStep, "__call__", call)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted) as info:
        train(seeded_config(out), dataset=memory_dataset(), quiet=True)
    assert info.value.exit_code == 130 and "batch 2/3" in str(info.value)
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_call=5)  # epoch 2, batch 2
    out = tmp_path / "stop"
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 2.*last good checkpoint"):
        train(seeded_config(out), dataset=memory_dataset(), quiet=True)
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["epoch"] == 1
    monkeypatch.undo()
    poison_loss(monkeypatch, at_call=5)  # a fresh count for the second run
    results = train(seeded_config(tmp_path / "skip", skip_nonfinite=True), dataset=memory_dataset(), quiet=True)
    assert results["skipped_steps"] == 1 and results["epochs"] == 2


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
    # --data recorded as a relative path, resumed from another folder: say to give it (it was "data ... not found")
    shutil.copytree(finished_run, tmp_path / "moved")
    last = torch.load(tmp_path / "moved" / "last.pt", weights_only=True)
    last["train_config"]["data"] = "photos-relative"
    torch.save(last, tmp_path / "moved" / "last.pt")
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "moved")], capsys)
    assert code == 2 and "the run's data photos-relative is not found from here" in err and "--data" in err


def test_subprocess_error_exit_code(tmp_path):
    argv = [sys.executable, "-m", "cct", "train", "--model", "cct_nope", "--data", "x", "--out", str(tmp_path / "o")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown model 'cct_nope'" in proc.stderr
