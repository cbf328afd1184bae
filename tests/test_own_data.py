"""A user's own images through `cct train`/`eval`: class folders and CSVs with a recorded test split,
fine-tuning from each weights format, and one run per output folder (tiny generated data, CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cct
from helpers import run_cli
from test_checkpoint import official_keys

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCT_DATA", str(tmp_path / "cache"))


def flat_folder(root: Path, per_class: int = 10, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3)) + 70 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


TINY = ["--model", "cct_2_3x2_32", "--epochs", "2", "--batch-size", "8", "--quiet", "--procs", "1"]


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_class_folders_and_csv_train_and_eval_on_the_recorded_split(tmp_path, capsys, caplog, layout):
    root = flat_folder(tmp_path / "photos")
    data = root
    if layout == "csv":
        data = tmp_path / "labels.csv"
        rows = [f"photos/{c}/{i}.png,{c}" for c in CLASSES for i in range(10)]
        data.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(out), "--test-split", "0.3", "--seed", "3",
                        *TINY], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert results["test_split"] == {"seed": 3, "fraction": 0.3, "files": "split.json"}
    assert split["seed"] == 3 and len(split["test_files"]) == results["test_images"] == 9  # 3 per class
    assert cct.checkpoint.read_checkpoint(out / "best.pt")["split"] == split
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(data), "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["n"] == 9 and report["top1"] == pytest.approx(results["test_top1"])
    assert "source_changed" not in report
    (root / "bee" / "extra.png").write_bytes((root / "bee" / "0.png").read_bytes())  # the folder changes
    if layout == "csv":
        with data.open("a") as f:
            f.write("photos/bee/extra.png,bee\n")
    (root / "ant" / "broken.png").write_bytes(b"not an image")  # not a recorded test file: never decoded
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(data), "--json"], capsys)
    assert code == 0, err
    changed = json.loads(stdout)
    assert changed["source_changed"] and changed["n"] == 9 and changed["top1"] == report["top1"]
    assert "changed since its test split was recorded" in caplog.text  # a warning on stderr


def test_eval_reproduces_the_weights_results_json_names(tmp_path, capsys):
    """A run that validates but tests its last epoch: results.json says "last", and eval on last.pt reproduces it."""
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / "photos")), "--out", str(out), *TINY,
                            "--val-split", "0.3", "--no-restore-best", "--lr", "0.05"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["weights"] == "last"
    code, stdout, err = run_cli(["eval", str(out / "last.pt"), "--data", str(out.parent / "photos"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["top1"] == pytest.approx(results["test_top1"])
    assert json.loads(stdout)["loss"] == pytest.approx(results["test_loss"], rel=1e-5)


def test_eval_on_other_labelled_data_than_the_run_held_out(tmp_path, capsys, caplog):
    """A model trained on a flat folder, evaluated on new photos (another flat folder, none of its files the
    run's) scores all of them; on a tree with a test split of its own, that split."""
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / "photos")), "--out", str(out), *TINY],
                           capsys)
    assert code == 0, err
    new = flat_folder(tmp_path / "new", per_class=4)
    for image in list(new.glob("*/*.png")):  # other photos, other names
        image.rename(image.with_name(f"new-{image.name}"))
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(new), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["n"] == 12 and "evaluating all 12 of its images" in caplog.text
    tree = tmp_path / "tree"
    flat_folder(tree / "train", per_class=3), flat_folder(tree / "test", per_class=2)
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(tree), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["n"] == 6 and "evaluating its test split" in caplog.text
    # the other way round: a run on a tree held nothing out, so a flat folder is scored whole, not a drawn 20%
    tree_run = tmp_path / "tree_run"
    code, _, err = run_cli(["train", "--data", str(tree), "--out", str(tree_run), *TINY], capsys)
    assert code == 0, err
    caplog.clear()
    code, stdout, err = run_cli(["eval", str(tree_run / "best.pt"), "--data", str(new), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["n"] == 12 and "held out no files of it: evaluating all 12 of its images" in caplog.text
    code, stdout, err = run_cli(["eval", str(tree_run / "best.pt"), "--data", str(tree), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["n"] == 6, err


def _finetune(tmp_path, capsys, pretrained: Path, *extra: str) -> dict:
    out = tmp_path / f"ft-{pretrained.stem}"
    code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / f"d-{pretrained.stem}")), "--out", str(out),
                        "--pretrained", str(pretrained), "--epochs", "2", "--batch-size", "8", "--quiet",
                        "--procs", "1", "--img-size", "16", *extra], capsys)
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_a_resume_keeps_the_held_out_test_split_or_refuses(tmp_path, capsys):
    """A resumed run draws the test split of class folders again: on the same files it is the recorded one; on a
    folder with files added since, it would move images the run trained on into the test set, so it is refused."""
    from cct.recipes import make_config
    from cct.train import TrainingInterrupted, resume_config, train
    data = flat_folder(tmp_path / "photos")
    cfg = make_config("cct_2_3x2_32", str(data), str(tmp_path / "run"), epochs=2, batch_size=8, procs=1,
                      precision="fp32")
    with pytest.raises(TrainingInterrupted):
        train(cfg, quiet=True, stop_at_step=3)
    recorded = json.loads((tmp_path / "run" / "split.json").read_text())
    Image.new("RGB", (16, 16)).save(data / "ant" / "new.png")
    with pytest.raises(cct.CCTError, match=r"photos changed since the run held its 6 test images out of it \(30 files "
                                           r"then, 31 now\)"):
        train(resume_config(tmp_path / "run"), quiet=True, resume=True)
    (data / "ant" / "new.png").unlink()
    train(resume_config(tmp_path / "run"), quiet=True, resume=True)
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == recorded


def test_finetune_from_a_cct_checkpoint_new_classes_and_size(tmp_path, capsys):
    torch.manual_seed(0)
    source = cct.create_model("cct_2_3x2_32", num_classes=10)  # 32 px, 10 classes → 16 px, 3 classes
    cct.save_checkpoint(source, tmp_path / "source.pt", eval={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2],
                                                             "img_size": [32, 32], "in_chans": 3})
    results = _finetune(tmp_path, capsys, tmp_path / "source.pt")
    assert results["recipe"] == "finetune" and results["model"] == "cct_2_3x2_32"  # from the checkpoint
    best = cct.checkpoint.read_checkpoint(tmp_path / "ft-source" / "best.pt")
    assert best["eval"]["mean"] == [0.4, 0.5, 0.6]  # the weights' own normalisation
    assert best["config"]["num_classes"] == 3 and best["config"]["img_size"] == [16, 16]
    start = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=16, pretrained=str(tmp_path / "source.pt"))
    assert torch.equal(start.tokenizer.convs[0].weight, source.tokenizer.convs[0].weight)


def test_finetune_from_official_weights_needs_the_model_name(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(official_keys(cct.create_model("cct_2_3x2_32")), tmp_path / "official.pth")
    code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / "x")), "--out", str(tmp_path / "o"),
                        "--pretrained", str(tmp_path / "official.pth")], capsys)
    assert code == 2 and "give --model" in err and len(err.strip().splitlines()) == 1
    results = _finetune(tmp_path, capsys, tmp_path / "official.pth", "--model", "cct_2_3x2_32")
    assert results["recipe"] == "finetune"
    best = cct.checkpoint.read_checkpoint(tmp_path / "ft-official" / "best.pt")
    assert best["eval"]["mean"] == pytest.approx(list(cct.cifar.CIFAR_MEAN))  # the official recipes' input


def test_finetune_from_the_keras_example_weights(tmp_path, capsys):
    results = _finetune(tmp_path, capsys, FIXTURES / "keras_cct.weights.h5")
    assert results["model"] == "cct_2_3x2_32_keras" and results["recipe"] == "finetune"
    best = cct.checkpoint.read_checkpoint(tmp_path / "ft-keras_cct.weights" / "best.pt")
    assert best["eval"]["mean"] is None  # the example's x / 255


def test_no_model_no_recipe_trains_the_fast_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / "p")), "--out", str(out), "--epochs", "1",
                        "--quiet"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert (results["recipe"], results["model"]) == ("fast", "cct_2_3x5_32")


def test_a_second_train_on_a_folder_in_use_exits_2_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cct.runlock import hold_run_lock\n"
                               "with hold_run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / "p")), "--out", str(out), *TINY], capsys)
        assert code == 2 and f"in use by another cct train (PID {holder.pid})" in err
        assert len(err.strip().splitlines()) == 1 and not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(["train", "--data", str(tmp_path / "p"), "--out", str(out), *TINY], capsys)  # a killed holder
    assert code == 0, err  # leaves no lock behind


def test_finetune_says_what_it_adapted_and_fits_head_and_channels(tmp_path, capsys, monkeypatch):
    """The log names each thing adapted; a head of as many classes but other ones starts fresh; grayscale weights
    read the data as grayscale; a finetune recipe without weights, a folder, or weights of the other kind are
    one-line errors."""
    torch.manual_seed(123)  # not the run's seed, whose fresh head would be this one
    source = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=16)
    source.class_names = ["x", "y", "z"]
    cct.save_checkpoint(source, tmp_path / "xyz.pt")
    data = flat_folder(tmp_path / "d")  # ant, bee, cat
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--pretrained",
                            str(tmp_path / "xyz.pt"), "--epochs", "1", "--batch-size", "8", "--procs", "1",
                            "--img-size", "24", "--lr", "1e-30", "--warmup-lr", "1e-30", "--min-lr", "0"], capsys)
    assert code == 0, err
    assert "--pretrained: head: new, 3 classes (the weights' 3 are others: x, y, z)" in err
    assert "--pretrained: positional embedding: interpolated from a 4x4 token grid to 6x6" in err
    assert "--pretrained: inputs normalised as its weights were trained" in err
    best = cct.load_checkpoint(tmp_path / "o" / "last.pt")
    assert not torch.allclose(best.head.weight, source.head.weight)
    assert torch.equal(best.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)  # lr 1e-30: unchanged

    gray = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=16, in_chans=1)
    cct.save_checkpoint(gray, tmp_path / "gray.pt")
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "g"), "--pretrained",
                            str(tmp_path / "gray.pt"), "--epochs", "1", "--batch-size", "8", "--procs", "1"], capsys)
    assert code == 0, err
    assert "weights take 1 channel" in err and cct.load_checkpoint(tmp_path / "g" / "last.pt").cfg.in_chans == 1

    for argv, message in [(["--recipe", "finetune"], "--recipe finetune fine-tunes weights: give --pretrained"),
                          (["--recipe", "finetune", "--model", "cct_2_3x2_32"], "give --normalize dataset"),
                          (["--pretrained", str(tmp_path / "o")], "is a folder, not a checkpoint file; did you mean"),
                          (["--pretrained", str(tmp_path / "no.pt"), "--model", "cct_2_3x2_32"],
                           "--pretrained: checkpoint not found"),
                          (["--pretrained", str(tmp_path / "xyz.pt"), "--model", "cct_4_3x2_32"],
                           "xyz.pt holds the model cct_2_3x2_32, whose weights do not fit cct_4_3x2_32"),
                          (["--pretrained", str(FIXTURES / "keras_cct.weights.h5"), "--data-kind", "text"],
                           "holds the image model cct_2_3x2_32_keras, and --data")]:
        code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "e"), *argv], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not (tmp_path / "e").exists()
    decoded = []  # weights that do not fit the model: refused before any image is decoded
    monkeypatch.setattr(cct.data, "load", lambda *a, **k: decoded.append(a))
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "e"), "--pretrained",
                            str(tmp_path / "xyz.pt"), "--model", "cct_4_3x2_32", "--img-size", "16"], capsys)
    assert code == 2 and "whose weights do not fit cct_4_3x2_32" in err and not decoded


def test_finetune_from_a_checkpoint_keeps_its_settings(tmp_path, capsys):
    """A checkpoint of a model built with non-registry settings (no positional embedding) fine-tunes in that model."""
    source = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=16, positional_embedding="none")
    cct.save_checkpoint(source, tmp_path / "none.pt")
    code, _, err = run_cli(["train", "--data", str(flat_folder(tmp_path / "d")), "--out", str(tmp_path / "o"),
                            "--pretrained", str(tmp_path / "none.pt"), "--epochs", "1", "--batch-size", "8",
                            "--procs", "1"], capsys)
    assert code == 0, err
    assert "model settings of none.pt: positional_embedding=none" in err
    assert cct.load_checkpoint(tmp_path / "o" / "last.pt").pos_embed is None


def test_eval_refuses_a_renamed_class_and_a_run_without_test_images(tmp_path, capsys, monkeypatch):
    """A class folder renamed since the run is an error, not a score over the classes left; a run that held out no
    test images says so; --split train draws the run's own split (its seed and fraction)."""
    data = flat_folder(tmp_path / "photos")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(out), "--seed", "1", *TINY], capsys)
    assert code == 0, err
    import cct.data
    calls, real_load = [], cct.data.load
    monkeypatch.setattr(cct.data, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(data), "--split", "train", "--json"],
                                capsys)
    assert code == 0, err
    assert calls[-1]["seed"] == 1 and calls[-1]["test_split"] == 0.2 and json.loads(stdout)["n"] == 24
    (data / "cat").rename(data / "cow")
    code, _, err = run_cli(["eval", str(out / "best.pt"), "--data", str(data), "--json"], capsys)
    assert code == 2 and "has no class cat of the run's (and cow it did not have: renamed?)" in err
    (data / "cow").rename(data / "cat")
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "all"), "--test-split", "0", *TINY],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", str(tmp_path / "all" / "best.pt"), "--data", str(data)], capsys)
    assert code == 2 and "the run held no test images out of" in err and len(err.strip().splitlines()) == 1


def test_train_flags_that_would_do_nothing(tmp_path, capsys):
    data = flat_folder(tmp_path / "photos")
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--recipe", "paper",
                            "--tta-translate", "2", *TINY], capsys)
    assert code == 2 and "--tta-translate 2 shifts the --tta views: it needs --tta" in err
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--model", "cct_2_3x2_32",
                            "--time-budget", "0.05", "--epochs", "3", "--batch-size", "8", "--procs", "1"], capsys)
    assert code == 0 and "--time-budget sets the run's length; --epochs 3 is the length its warm-up" in err


def test_tta_shift_beyond_the_image_and_restore_best_without_validation(tmp_path, capsys):
    data = flat_folder(tmp_path / "photos")  # 16 px
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--tta", "--tta-translate", "8",
                            *TINY], capsys)
    assert code == 2 and "--tta-translate 8 would shift 16x16 images by half of their side or more" in err
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--restore-best",
                            "--val-split", "0", *TINY[:-3], "--procs", "1"], capsys)
    assert code == 0 and "no validation split (--val-split 0): the run tests its last weights" in err


def test_eval_split_train_and_val_are_the_runs(tmp_path, capsys):
    """On the run's own flat folder, --split val scores the validation images the run held out of training, and
    --split train the images it trained on, not the two together."""
    data = flat_folder(tmp_path / "photos")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(out), *TINY, "--val-split", "0.25"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    counts = {}
    for split in ("train", "val", "test"):
        code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(data), "--split", split, "--json"],
                                    capsys)
        assert code == 0, (split, err)
        counts[split] = json.loads(stdout)["n"]
    assert counts == {"train": results["train_images"], "val": results["val_images"], "test": results["test_images"]}
    assert counts["val"] > 0
