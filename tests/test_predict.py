"""Prediction: image files of any size and mode, checkpoints and ONNX files, JSON output, bad input."""
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cct
from cct.cli import main
from cct.errors import CCTError
from cct.predict import load_image, open_classifier, predict
from cct.preprocess import Preprocessing


def _checkpoint(tmp_path, name="cct_2_3x2_32", fmt="pt", **overrides):
    torch.manual_seed(0)
    model = cct.create_model(name, num_classes=4, **overrides)
    model.class_names = ["ant", "bee", "cow", "doe"]
    return cct.save_checkpoint(model, tmp_path / f"m.{fmt}", format=fmt)


def _images(tmp_path):
    """Files of several sizes and Pillow modes, as users have them."""
    rng = np.random.default_rng(0)
    files = []
    for name, size, mode in (("rgb.jpg", (45, 61), "RGB"), ("rgba.png", (32, 32), "RGBA"),
                             ("gray.png", (10, 90), "L"), ("palette.gif", (40, 20), "P"), ("cmyk.jpg", (33, 33), "CMYK"),
                             ("bits.bmp", (64, 64), "1"), ("deep.png", (16, 24), "I;16")):
        array = rng.integers(0, 255, size=(size[0], size[1], 3), dtype=np.uint8)
        im = Image.fromarray(array).convert(mode)
        im.save(tmp_path / name)
        files.append(str(tmp_path / name))
    return files


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_predicts_images_of_any_size_and_mode(tmp_path, fmt):
    files = _images(tmp_path)
    results = predict(_checkpoint(tmp_path, fmt=fmt), files, topk=3)
    assert [r["image"] for r in results] == files
    for r in results:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {p["class"] for p in r["predictions"]} <= {"ant", "bee", "cow", "doe"}


def test_topk_is_capped_at_the_number_of_classes(tmp_path):
    results = predict(_checkpoint(tmp_path), _images(tmp_path)[:1], topk=10)
    assert len(results[0]["predictions"]) == 4
    assert sum(p["probability"] for p in results[0]["predictions"]) == pytest.approx(1, abs=1e-5)


def test_predictions_match_the_model(tmp_path):
    ckpt = _checkpoint(tmp_path)
    files = _images(tmp_path)[:2]
    model = cct.load_checkpoint(ckpt)
    prep = Preprocessing.from_checkpoint(cct.checkpoint.read_checkpoint(ckpt))
    x = prep(torch.stack([load_image(f, (32, 32), 3) for f in files]))
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    results = predict(ckpt, files, topk=1)
    for r, p in zip(results, probs):
        assert r["predictions"][0]["index"] == p.argmax().item()
        assert r["predictions"][0]["probability"] == pytest.approx(p.max().item(), abs=1e-6)


@pytest.mark.parametrize("batch", ["dynamic", "3"])
def test_predict_on_an_onnx_file_matches_the_checkpoint(tmp_path, batch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    ckpt = _checkpoint(tmp_path, "cct_2_3x2_32_keras")
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--output", str(onnx_path), "--batch-size", batch]) == 0
    files = _images(tmp_path)  # 7 images: more than the fixed batch of 3
    from_onnx = predict(onnx_path, files, topk=4)
    from_ckpt = predict(ckpt, files, topk=4)
    for a, b in zip(from_onnx, from_ckpt):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        for pa, pb in zip(a["predictions"], b["predictions"]):
            assert pa["probability"] == pytest.approx(pb["probability"], abs=1e-5)


def test_json_output_is_only_json(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    files = _images(tmp_path)[:2]
    assert main(["predict", str(ckpt), *files, "--topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out["results"]] == files
    assert all(len(r["predictions"]) == 2 for r in out["results"])


def test_csv_to_standard_output(tmp_path, capsys):
    """`--output -` writes the CSV on stdout (and nothing else there), as Unix tools read "-"; with --json it is
    refused, and a command whose output is a binary file refuses "-" instead of writing a file named "-"."""
    ckpt, files = _checkpoint(tmp_path), _images(tmp_path)[:2]
    assert main(["predict", str(ckpt), *files, "--topk", "2", "--output", "-"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(captured.out)))
    assert rows[0] == ["path", "label", "probability", "top2_label", "top2_probability", "error"]
    assert [r[0] for r in rows[1:]] == files and "wrote standard output: 2 file(s)" in captured.err
    assert main(["predict", str(ckpt), *files, "--output", "-", "--json"]) == 2
    assert "both write to standard output" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "safetensors", "--output", "-"]) == 2
    assert "--output - (standard output) is not for" in capsys.readouterr().err
    assert not (Path.cwd() / "-").exists()


def test_human_output(tmp_path, capsys):
    files = _images(tmp_path)[:1]
    assert main(["predict", str(_checkpoint(tmp_path)), *files, "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == files[0] and len(lines) == 3 and lines[1].strip().endswith(("ant", "bee", "cow", "doe"))


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_bad_image_is_one_line_naming_the_file(tmp_path, capsys, content):
    bad = tmp_path / "broken.png"
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(CCTError, match="broken.png"):
        predict(_checkpoint(tmp_path), [str(bad)])
    good = _images(tmp_path)[:1]
    assert main(["predict", str(tmp_path / "m.pt"), *good, str(bad)]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "broken.png" in captured.err
    assert captured.out.splitlines()[0] == good[0] and "broken.png" not in captured.out  # the others still classified


def test_truncated_image_is_an_error(tmp_path):
    good = _images(tmp_path)[0]
    data = open(good, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CCTError, match="cut.jpg"):
        predict(_checkpoint(tmp_path), [str(tmp_path / "cut.jpg")])


def test_grayscale_model_and_size(tmp_path):
    ckpt = _checkpoint(tmp_path, in_chans=1, img_size=(24, 40))
    clf = open_classifier(ckpt)
    assert clf.preprocessing.in_chans == 1 and clf.preprocessing.mean is None  # CIFAR statistics need 3 channels
    assert load_image(_images(tmp_path)[0], (24, 40), 1).shape == (1, 24, 40)
    assert len(predict(clf, _images(tmp_path), topk=1)) == 7


def test_recorded_normalisation_is_used(tmp_path):
    torch.manual_seed(0)
    model = cct.create_model("cct_2_3x2_32", num_classes=4)
    path = cct.save_checkpoint(model, tmp_path / "m.pt", eval={"mean": None, "std": None, "precision": "fp32"})
    assert open_classifier(path).preprocessing.mean is None


def test_onnx_needs_onnxruntime(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CCTError, match=r"cct\[export\]"):
        predict(tmp_path / "m.onnx", _images(tmp_path)[:1])


def test_a_model_without_a_classifier_is_refused_with_one_line(tmp_path, capsys):
    """num_classes 0 (a feature extractor): no classes to predict, from the checkpoint or its ONNX export."""
    image = _images(tmp_path)[0]
    headless = cct.save_checkpoint(cct.create_model("cct_2_3x2_32", num_classes=0), tmp_path / "nc0.pt")
    argvs = [["predict", str(headless), image], ["explain", str(headless), image, "--output", str(tmp_path / "x.png")]]
    if _has_onnx():
        assert main(["export", str(headless), "--format", "onnx", "--output", str(tmp_path / "nc0.onnx")]) == 0
        argvs.append(["predict", str(tmp_path / "nc0.onnx"), image])
    capsys.readouterr()
    for argv in argvs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "has no classifier (num_classes 0" in err and err.count("\n") == 1, argv


def test_flags_that_would_do_nothing_are_refused(tmp_path, capsys):
    image, ckpt = _images(tmp_path)[0], _checkpoint(tmp_path)
    argvs = [(["explain", str(ckpt), image, "--output", str(tmp_path / "x.png"), "--json"], "--json prints a text"),
             (["explain", str(tmp_path / "m.onnx"), image, "--output", str(tmp_path / "x.png")], "explain reads a "
              "checkpoint"),
             (["cache", "clear", "--older-than", "nan"], "--older-than must be a number of days")]
    if _has_onnx():
        assert main(["export", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
        argvs.append((["predict", str(tmp_path / "m.onnx"), image, "--precision", "bf16"], "is for checkpoints"))
    capsys.readouterr()
    for argv, message in argvs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, argv
    assert main(["explain", str(ckpt), str(tmp_path), "--output", str(tmp_path / "x.png")]) == 0  # a folder, as predict


def _has_onnx() -> bool:
    try:
        import onnxruntime, onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def test_topk_must_be_positive(tmp_path):
    with pytest.raises(CCTError, match="topk"):
        predict(_checkpoint(tmp_path), _images(tmp_path)[:1], topk=0)


def _folder(tmp_path):
    """photos/ with images in nested folders, a broken one, a hidden one and a file that is not an image."""
    root = tmp_path / "photos"
    (root / "trip" / "day2").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.png", "trip/b.JPG", "trip/day2/c.gif", ".hidden/d.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / name)
    (root / "trip" / "broken.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image")
    return root


def _read_csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_a_folder_to_csv_with_bad_files_included(tmp_path, capsys, fmt):
    model = _checkpoint(tmp_path)
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
        assert main(["export", str(model), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
        model = tmp_path / "m.onnx"
    root = _folder(tmp_path)
    extra = _images(tmp_path)[0]  # a file given by name next to the folder
    capsys.readouterr()
    assert main(["predict", str(model), str(root), extra, "--output", str(tmp_path / "out" / "preds.csv"),
                 "--topk", "3"]) == 2
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if "cannot read image" in line]
    assert len(failed) == 1 and "broken.png" in failed[0] and captured.out == ""
    rows = _read_csv(tmp_path / "out" / "preds.csv")
    expected = [str(root / n) for n in ("a.png", "trip/b.JPG", "trip/broken.png", "trip/day2/c.gif")] + [extra]
    assert [r["path"] for r in rows] == expected  # one row per file, in order, the bad one included
    assert list(rows[0]) == ["path", "label", "probability", "top2_label", "top2_probability", "top3_label",
                             "top3_probability", "error"]
    bad = rows[2]
    assert bad["label"] == "" and "cannot identify image file" in bad["error"]
    reference = predict(_checkpoint(tmp_path), [r["path"] for r in rows if not r["error"]], topk=3)
    for row, want in zip([r for r in rows if not r["error"]], reference):
        assert row["error"] == "" and row["label"] == want["predictions"][0]["class"]
        assert [row["label"], row["top2_label"], row["top3_label"]] == [p["class"] for p in want["predictions"]]
        assert float(row["probability"]) == pytest.approx(want["predictions"][0]["probability"], abs=1e-5)
        assert float(row["probability"]) >= float(row["top2_probability"]) >= float(row["top3_probability"])


def test_every_file_classified_exits_0_and_json_reports_errors(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    root = _folder(tmp_path)
    (root / "trip" / "broken.png").unlink()
    assert main(["predict", str(ckpt), str(root), "--output", str(tmp_path / "p.csv")]) == 0
    assert len(_read_csv(tmp_path / "p.csv")) == 3
    (root / "bad.jpg").write_bytes(b"\xff\xd8 cut")
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(root), "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # still one object
    bad = [r for r in out["results"] if "error" in r]
    assert len(out["results"]) == 4 and len(bad) == 1 and bad[0]["image"].endswith("bad.jpg")
    assert bad[0]["predictions"] == [] and all(len(r["predictions"]) == 4 for r in out["results"] if r not in bad)
    assert "bad.jpg" in captured.err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(ckpt), str(tmp_path / "empty")]) == 2
    assert "no image files in" in capsys.readouterr().err


def test_batches_and_reported_errors_in_the_library(tmp_path):
    files = _images(tmp_path) + [str(tmp_path / "missing.png")]
    clf = open_classifier(_checkpoint(tmp_path))
    whole = predict(clf, files, topk=2, bad_images="report")
    in_twos = predict(clf, files, topk=2, bad_images="report", batch_size=2)
    assert [r["image"] for r in in_twos] == files and "No such file" in in_twos[-1]["error"]
    for a, b in zip(whole, in_twos):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        for pa, pb in zip(a["predictions"], b["predictions"]):
            assert pa["probability"] == pytest.approx(pb["probability"], abs=1e-5)
    with pytest.raises(CCTError, match="missing.png"):
        predict(clf, files)  # the default still raises on the first unreadable file


def test_predict_averages_the_recorded_test_time_views_as_eval_does(tmp_path, capsys):
    """A recipe that records TTA (the fast one: mirror and 1-px shifts) is scored with it by `cct eval`; `cct predict`
    gives the same probabilities, from the checkpoint and from its ONNX export; --no-tta the plain image's."""
    torch.manual_seed(0)
    model = cct.create_model("cct_2_3x2_32", num_classes=4)
    record = {"mean": None, "std": None, "precision": "fp32", "tta": True, "tta_translate": 1}
    path = cct.save_checkpoint(model, tmp_path / "m.pt", eval=record)
    files = _images(tmp_path)[:3]
    x = torch.stack([load_image(f, (32, 32), 3) for f in files]).float() / 255
    with torch.no_grad():
        plain = model.eval()(x)
        views = cct.evaluate.tta_logits(model, x, plain, 1)
    assert not torch.allclose(plain, views, atol=1e-4)
    for tta, expected in ((None, views), (False, plain)):
        clf = open_classifier(path, tta=tta)
        assert torch.allclose(clf.logits(x), expected, atol=1e-5)
    got = predict(path, files, topk=1)
    assert [r["predictions"][0]["probability"] for r in got] == pytest.approx(
        torch.softmax(views, 1).max(1).values.tolist(), abs=1e-5)
    if all(__import__("importlib").util.find_spec(m) for m in ("onnxscript", "onnxruntime")):
        assert main(["export", str(path), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
        assert torch.allclose(open_classifier(tmp_path / "m.onnx").logits(x), views, atol=1e-4)
    capsys.readouterr()
    assert main(["predict", str(path), files[0], "--no-tta", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]["predictions"][0]["probability"]
    assert top == pytest.approx(torch.softmax(plain[:1], 1).max().item(), abs=1e-5)
