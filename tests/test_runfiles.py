"""cct.runfiles: the formats of history.csv and results.json, and the lines a run logs."""
import csv
import json
import types

from cct import runfiles
from cct.recipes import make_config


def test_history_csv_format(tmp_path):
    rows = [runfiles.history_row(1, lr=1e-3, train_loss=1.23456789, train_top1=0.5, val=None, seconds=2.345),
            runfiles.history_row(2, lr=5e-4, train_loss=float("nan"), train_top1=0.75,
                                 val={"loss": 0.9, "top1": 0.8, "top5": 1.0}, seconds=3.0)]
    assert list(rows[0]) == list(runfiles.HISTORY_COLUMNS)
    runfiles.write_history(tmp_path / "history.csv", rows)
    with open(tmp_path / "history.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(runfiles.HISTORY_COLUMNS)
    assert lines[1] == ["1", "0.001", "1.234568", "0.500000", "", "", "", "2.35"]  # no validation: empty cells
    assert lines[2] == ["2", "0.0005", "", "0.750000", "0.900000", "0.800000", "1.000000", "3.00"]  # NaN: empty


def test_epoch_and_done_lines():
    row = runfiles.history_row(3, lr=1e-3, train_loss=0.5, train_top1=0.8, val=None, seconds=1.25)
    assert runfiles.epoch_line(row, 10, 0) == "epoch 3/10: lr 0.001, train loss 0.5000, top-1 0.8000; 1.2s"
    row = runfiles.history_row(3, lr=1e-3, train_loss=0.5, train_top1=0.8, val={"loss": 0.7, "top1": 0.6, "top5": 0.9},
                               seconds=1.25)
    assert runfiles.epoch_line(row, 10, 2).endswith("; val loss 0.7000, top-1 0.6000, top-5 0.9000; 1.2s; "
                                                    "2 non-finite steps skipped")
    assert ", top-3 0.9000;" in runfiles.epoch_line(row, 10, 0, num_classes=3)  # k as cct eval names it


def test_results_keys_and_json(tmp_path):
    cfg = make_config("cct_2_3x2_32", "data", str(tmp_path), "keras")
    inputs = types.SimpleNamespace(test_set=[0] * 18, classes=["a", "b"], skipped=1, kind="image", results={},
                                   split_record=None)
    state = {"epoch": 2, "step": 6, "best_epoch": 1, "best_top1": 0.5, "train_seconds": 3.14159, "images": 300}
    test = {"top1": 0.75, "top5": 1.0, "loss": 0.6}
    kwargs = dict(state=state, test=test, params=1000, inputs=inputs, train_images=150, val_images=12,
                  skipped_steps=0, precision="fp32", world_size=1, device="cpu")
    assert runfiles.results(cfg, **kwargs)["weights"] == "last"  # no best.pt in --out: the last weights were tested
    (tmp_path / "best.pt").write_bytes(b"")
    r = runfiles.results(cfg, **kwargs)
    assert list(r) == ["model", "recipe", "params", "epochs", "steps", "test_top1", "test_top5", "test_loss",
                       "test_images", "best_epoch", "best_val_top1", "weights", "train_seconds", "images_per_second",
                       "train_images", "val_images", "data", "classes", "skipped_images", "skipped_steps", "precision",
                       "seed", "world_size", "device", "processor", "bf16", "train_images_seen", "train_tflop",
                       "test_split", "kind"]
    assert (r["weights"], r["best_val_top1"], r["test_images"], r["train_seconds"]) == ("best", 0.5, 18, 3.14)
    assert (r["train_images_seen"], r["train_tflop"], r["bf16"]) == (300, None, False) and r["processor"]
    costed = runfiles.results(cfg, state=state, test=test, params=1000, inputs=inputs, train_images=150,
                              val_images=12, skipped_steps=0, precision="bf16", world_size=1, device="cpu",
                              train_macs=300 * 10 ** 9)
    assert costed["train_tflop"] == 1.8 and costed["bf16"]  # 300 images × 3 passes × 2 FLOPs × 1 GMAC
    assert runfiles.done_line(r, tmp_path).startswith("done: 2 epochs in 3s (96 images/s); test top-1 0.7500")
    assert "(96 texts/s)" in runfiles.done_line(dict(r, kind="text"), tmp_path)
    assert ", top-2 " in runfiles.done_line(dict(r, classes=["a", "b"]), tmp_path)
    assert "last.pt" not in runfiles.done_line(r, tmp_path)
    last = dict(r, weights="last", best_epoch=1)  # validated, tested the last epoch: best.pt is another one
    assert "of the last epoch's weights (last.pt; best.pt holds epoch 1's" in runfiles.done_line(last, tmp_path)
    assert "last.pt" not in runfiles.done_line(dict(last, best_epoch=2), tmp_path)
    none = runfiles.results(cfg, state=state, test=None, params=1000, inputs=inputs, train_images=150,
                            val_images=None, skipped_steps=0, precision="fp32", world_size=1, device="cpu")
    assert (none["weights"], none["best_val_top1"], none["val_images"], none["test_images"]) == ("last", None, 0, 0)
    assert "test top-1" not in runfiles.done_line(none, tmp_path)
    runfiles.write_json(tmp_path / "results.json", r)
    assert json.loads((tmp_path / "results.json").read_text()) == r


def test_no_progress_bar_off_a_terminal(capsys):
    """A redirected stderr (a log file, here pytest's capture) gets no carriage-return redraws of the epoch bar."""
    bar = runfiles.progress_bar(False, 0, 3, 100, 0)
    bar.update(50)
    bar.close()
    assert bar.disable and "\r" not in capsys.readouterr().err
    assert runfiles.progress_bar(True, 0, 3, 100, 0) is None
