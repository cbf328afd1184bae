"""cct.resume: an interrupted run, resumed, ends as the uninterrupted one; last.pt's reading and random streams."""
import csv
import json
from pathlib import Path

import pytest
import torch

from cct import resume
from cct.errors import CCTError, CheckpointError
from cct.recipes import make_config
from cct.train import TrainingInterrupted, train
from helpers import MODEL, memory_dataset, seeded_config


def _history_without_seconds(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, train(seeded_config(out), dataset=memory_dataset(), quiet=True)


@pytest.mark.parametrize("stop_step", [3, 4])  # 3 batches per epoch: after epoch 1, and mid-epoch 2
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, reference_run, stop_step):
    ds = memory_dataset()
    reference_dir, reference = reference_run
    out = tmp_path / "split"
    with pytest.raises(TrainingInterrupted, match="resume with: cct train --resume"):
        train(seeded_config(out), dataset=ds, quiet=True, stop_at_step=stop_step)
    if stop_step == 3:  # a row written after last.pt by a run that died: dropped on resume
        with open(out / "history.csv", "a") as f:
            f.write("2,0.001,9,0.5,9,0.5,0.5,1.0\n")
    resumed = train(resume.resume_config(out), dataset=ds, resume=True, quiet=True)
    assert _history_without_seconds(out / "history.csv") == _history_without_seconds(reference_dir / "history.csv")
    assert resumed["test_top1"] == reference["test_top1"] and resumed["test_loss"] == reference["test_loss"]


def test_an_interrupted_epochs_seconds_count_both_parts(tmp_path, monkeypatch):
    """Stopped after the first of epoch 2's 3 steps (each of those slowed to 0.5 s), resumed at full speed:
    history.csv's seconds for epoch 2 count the time before the stop too, not only the resumed part."""
    import time
    from cct.step import TrainStep
    real, slow = TrainStep.__call__, {"on": True}

    def call(self, *args, **kwargs):
        if slow["on"]:
            time.sleep(0.5)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(TrainStep, "__call__", call)
    ds, out = memory_dataset(), tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(seeded_config(out), dataset=ds, quiet=True, stop_at_step=4)
    slow["on"] = False
    train(resume.resume_config(out), dataset=ds, resume=True, quiet=True)
    with open(out / "history.csv", newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    assert seconds[0] >= 1.5 and seconds[1] >= 0.5  # epoch 1: 3 slow steps; epoch 2: 1 slow step, then 2 fast ones


@pytest.mark.parametrize("options, stop_step", [
    # --res-schedule: the side of a step is a function of the step, so a resume lands in the same phase (8, 12, 16 px)
    (dict(res_schedule="0.5@0,0.75@0.4,1@0.7"), 2),
    # --optimizer muon: its momentum buffers and groups travel through last.pt's safe load
    (dict(optimizer="muon", precision="bf16"), 4),
    # --lookahead: its slow weights travel in last.pt (rebuilt from the weights at step 4, the update at step 5,
    # d = 0.95⁵·(5/6)³ ≈ 0.45, would pull towards other weights)
    (dict(lookahead=True), 4),
], ids=["progressive", "muon", "lookahead"])
def test_a_resumed_run_with_options_matches_the_uninterrupted_one(tmp_path, options, stop_step):
    ds = memory_dataset()
    reference = train(seeded_config(tmp_path / "whole", **options), dataset=ds, quiet=True)
    with pytest.raises(TrainingInterrupted):
        train(seeded_config(tmp_path / "split", **options), dataset=ds, quiet=True, stop_at_step=stop_step)
    resumed = train(resume.resume_config(tmp_path / "split"), dataset=ds, resume=True, quiet=True)
    assert _history_without_seconds(tmp_path / "split" / "history.csv") == \
        _history_without_seconds(tmp_path / "whole" / "history.csv")
    assert (resumed["test_loss"], resumed["train_tflop"]) == (reference["test_loss"], reference["train_tflop"])


def test_a_fresh_run_removes_an_older_runs_results(tmp_path):
    """An --out without last.pt but with an older run's results.json: a fresh run there that is stopped in its last
    epoch's test, then resumed, reported those results as its own ("already finished")."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"model": "another run"}')
    with pytest.raises(TrainingInterrupted):
        train(seeded_config(tmp_path / "run"), dataset=memory_dataset(), quiet=True, stop_at_step=3)
    assert not (tmp_path / "run" / "results.json").exists()
    assert train(resume.resume_config(tmp_path / "run"), dataset=memory_dataset(), resume=True, quiet=True)["model"] == MODEL


def test_a_resume_after_the_last_step_says_it_tests(tmp_path, capsys):
    """Stopped in the final test (results.json not written): the resume has no epoch left to train, and said
    "resuming at epoch 3" of a 2-epoch run."""
    train(seeded_config(tmp_path / "run"), dataset=memory_dataset(), quiet=True)
    (tmp_path / "run" / "results.json").unlink()  # as a Ctrl-C in the test leaves it
    capsys.readouterr()
    train(resume.resume_config(tmp_path / "run"), dataset=memory_dataset(), resume=True, quiet=False)
    err = capsys.readouterr().err
    assert "after its last step: testing" in err and "at epoch 3" not in err, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["weights"] == "best"  # the keras recipe's
    # best.pt deleted as well: the last weights are tested, and said so (results.json claimed "best")
    (tmp_path / "run" / "results.json").unlink()
    (tmp_path / "run" / "best.pt").unlink()
    train(resume.resume_config(tmp_path / "run"), dataset=memory_dataset(), resume=True, quiet=False)
    assert "best.pt is missing: testing the last weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["weights"] == "last"


def test_a_resume_on_data_of_other_classes_is_refused(tmp_path):
    from dataclasses import replace
    ds = memory_dataset()
    with pytest.raises(TrainingInterrupted):
        train(seeded_config(tmp_path / "run"), dataset=ds, quiet=True, stop_at_step=3)
    other = replace(ds, classes=["ant", "bee", "gnu"])
    with pytest.raises(CheckpointError, match="the run trained on 3 classes and the data given holds 3, not the same: "
                                              "the data lacks '.*'; the data has 'gnu' the run did not"):
        train(resume.resume_config(tmp_path / "run"), dataset=other, resume=True, quiet=True)


def test_last_pt_keeps_its_keys(reference_run):
    """last.pt is a format: runs started by earlier versions resume, so its keys only ever grow."""
    checkpoint = torch.load(reference_run[0] / "last.pt", weights_only=True)
    for key in ("train_config", "resolved_config", "eval", "optimizer", "step_state", "train_state", "rng", "history"):
        assert key in checkpoint, key
    assert set(checkpoint["rng"]) >= {"torch", "data_epoch_start", "data", "augment"}
    assert set(checkpoint["step_state"]) == {"loss_sum", "correct", "seen", "skipped", "scaler", "lookahead"}
    assert set(checkpoint["train_state"]) == {"epoch", "batch", "step", "total_steps", "best_top1", "best_epoch",
                                              "train_seconds", "images", "reduced_images", "finished",
                                              "schedule_scale", "side_floor"}
    assert resume.is_finished(checkpoint, reference_run[0])


def test_resume_config_takes_the_run_and_the_allowed_overrides(reference_run, tmp_path):
    cfg = resume.resume_config(reference_run[0], data="elsewhere", workers=1, quiet=True)
    assert (cfg.model, cfg.seed, cfg.translate, cfg.data, cfg.workers) == (MODEL, 3, 2, "elsewhere", 1)
    assert cfg.out == str(reference_run[0])
    # a run that stopped before its first last.pt: its config.json
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_text(json.dumps(make_config(MODEL, "d", str(early), "fast").to_dict()))
    assert resume.resume_config(early).recipe == "fast"
    (early / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        resume.resume_config(early)
    with pytest.raises(CCTError, match="nothing to resume"):
        resume.resume_config(tmp_path / "none")


def test_read_last(reference_run, tmp_path):
    assert resume.read_last(reference_run[0], resume=True, quiet=True)["train_state"]["epoch"] == 2
    with pytest.raises(CCTError, match="already holds a run"):
        resume.read_last(reference_run[0], resume=False, quiet=True)
    (tmp_path / "config.json").write_text("{}")  # stopped before its first epoch ended: starts again
    assert resume.read_last(tmp_path, resume=True, quiet=True) is None
    assert resume.read_last(tmp_path / "fresh", resume=False, quiet=True) is None


def test_rank_streams_restore_or_start_fresh():
    aug = torch.Generator().manual_seed(7)
    torch.manual_seed(11)
    recorded = {"ranks": [resume.rank_rng_state(aug), resume.rank_rng_state(torch.Generator().manual_seed(8))]}
    expected = torch.rand(3, generator=aug), torch.rand(3)
    fresh = torch.Generator()
    resume.restore_rank_rng(recorded, fresh, seed=0, rank=0, world_size=2, step=5)  # the same number of ranks
    assert torch.equal(torch.rand(3, generator=fresh), expected[0]) and torch.equal(torch.rand(3), expected[1])
    other = torch.Generator().manual_seed(1)
    resume.restore_rank_rng(recorded, other, seed=0, rank=1, world_size=3, step=5)  # another number: fresh streams
    assert torch.equal(torch.rand(3, generator=other),
                       torch.rand(3, generator=torch.Generator().manual_seed(resume.distributed.rank_seed(2, 1) + 5)))
