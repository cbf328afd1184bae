"""benchmarks/time_to_accuracy.py: runs made before, summarised and drawn (no training here)."""
import json
from pathlib import Path

from helpers import benchmark_script


def _script():
    return benchmark_script("time_to_accuracy")


def _fake_run(root: Path, name: str, *, top1: float, seconds: float, res_schedule: str | None,
              optimizer: str | None = None) -> Path:
    out = root / name
    out.mkdir()
    results = {"recipe": "fast", "model": "cct_2_3x2_32", "train_seconds": seconds, "epochs": 4, "steps": 100,
               "images_per_second": 300.0, "test_top1": top1, "train_tflop": 40.0, "train_images": 50000,
               "val_images": 0, "precision": "fp32", "processor": "test CPU"}
    (out / "results.json").write_text(json.dumps(results))
    (out / "history.csv").write_text("epoch,lr,train_loss,train_top1,val_loss,val_top1,val_top5,seconds\n"
                                     "1,0.001,1.0,0.5,,,,10.0\n")
    config = {"res_schedule": res_schedule, "lr": 0.002, **({"optimizer": optimizer} if optimizer else {})}
    (out / "config.json").write_text(json.dumps(config))  # runs before --optimizer have none
    return out


def test_runs_of_one_recipe_with_other_schedules_or_optimisers_are_separate_series(tmp_path, monkeypatch):
    tta = _script()
    before = _fake_run(tmp_path, "before", top1=0.69, seconds=590, res_schedule=None)
    after = _fake_run(tmp_path, "after", top1=0.72, seconds=580, res_schedule="0.5@0,1@0.5")
    muon = _fake_run(tmp_path, "muon", top1=0.75, seconds=580, res_schedule=None, optimizer="muon")
    plotted = []
    rows = tta.main(["--results", str(before), str(after), str(muon), "--plot", str(tmp_path / "t.png")])
    assert [r["res_schedule"] for r in rows] == [None, "0.5@0,1@0.5", None]
    assert [r["optimizer"] for r in rows] == ["adamw", "adamw", "muon"]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"

    class Axis:  # records the series labels drawn
        def plot(self, *args, label=None, **kwargs):
            plotted.append(label)

        def __getattr__(self, name):
            return lambda *a, **k: None

    tta_plot_axes = [Axis(), Axis()]

    class Fig:
        def __init__(self, *a, **k):
            pass

        def subplots(self, *a):
            return tta_plot_axes

        def __getattr__(self, name):
            return lambda *a, **k: None

    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure, "Figure", Fig)
    tta.plot(rows, str(tmp_path / "u.png"))
    assert "fast (cct_2_3x2_32, fp32, adamw lr 0.002)" in plotted
    assert "fast (cct_2_3x2_32, fp32, adamw lr 0.002, sizes 0.5@0,1@0.5)" in plotted
    assert "fast (cct_2_3x2_32, fp32, muon lr 0.002)" in plotted
