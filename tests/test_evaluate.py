"""cct.evaluate: metrics, logits with TTA and normalisation, checkpoint settings, and `cct eval`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cct import create_model, save_checkpoint
from cct.data import CIFAR_MEAN
from cct.evaluate import load_for_eval, metrics, predict_logits
from cct.kernels import FastAttention
from cct.preprocess import Preprocessing
from helpers import run_cli

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCT_DATA", str(tmp_path / "cache"))


def make_tree(root: Path, classes=CLASSES, per_class=4, size=16) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 90, (size, size, 3)) + 70 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def tiny_checkpoint(path: Path, num_classes=3, eval_settings=None) -> Path:
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32", num_classes=num_classes, img_size=16)
    model.class_names = CLASSES[:num_classes] if num_classes <= 3 else None
    extra = {"eval": eval_settings} if eval_settings is not None else {}
    save_checkpoint(model, path, **extra)
    return path


def test_metrics_top_k_per_class_and_confusion():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 0])
    m = metrics(logits, labels, class_names=CLASSES)
    assert m["top1"] == 0.5 and m["top5_k"] == 3 and m["top5"] == 1.0
    assert m["per_class"] == {"ant": 1.0, "bee": 0.0, "cat": 0.0}
    assert m["confusion"] == [[2, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-6)
    m2 = metrics(torch.randn(6, 10), torch.arange(6))
    assert m2["top5_k"] == 5 and m2["per_class"]["9"] is None


def test_predict_logits_normalisation_tta_and_batching():
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32", num_classes=3, img_size=16).eval()
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    prep = Preprocessing((16, 16), 3, mean, std, precision="fp32", batch_size=4)
    logits = predict_logits(model, images, prep)
    with torch.no_grad():
        expected = model(prep(images))
    assert logits.shape == (10, 3) and torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(prep(images), (images.float() / 255 - torch.tensor(mean)[:, None, None])
                          / torch.tensor(std)[:, None, None], atol=1e-6)
    with torch.no_grad():
        flipped = model(prep(images.flip(-1)))
    tta = predict_logits(model, images, Preprocessing((16, 16), 3, mean, std, batch_size=10, tta=True))
    assert torch.allclose(tta, (expected + flipped) / 2, atol=1e-5)
    # with 1-px shifts: half the flip average, half the mean of the up-left and down-right shifts and their mirrors
    x = prep(images)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    up_left, down_right = padded[..., :16, :16], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :15, :15])
    assert torch.equal(down_right[..., :15, :15], x[..., 1:, 1:])
    with torch.no_grad():
        shifts = sum(model(s) + model(s.flip(-1)) for s in (up_left, down_right)) / 4
    shifted = predict_logits(model, images, Preprocessing((16, 16), 3, mean, std, batch_size=4, tta=True,
                                                          tta_translate=1))
    assert torch.allclose(shifted, ((expected + flipped) / 2 + shifts) / 2, atol=1e-5)
    assert not torch.allclose(shifted, tta, atol=1e-3)
    plain = predict_logits(model, images, Preprocessing((16, 16), 3, batch_size=3))  # no normalisation: x / 255
    with torch.no_grad():
        assert torch.allclose(plain, model(images.float() / 255), atol=1e-5)


def test_settings_come_from_the_checkpoint(tmp_path):
    settings = {"precision": "fp32", "batch_size": 7, "tta": True, "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1],
                "img_size": [16, 16], "in_chans": 3}
    model, got = load_for_eval(tiny_checkpoint(tmp_path / "a.pt", eval_settings=settings))
    assert (got.batch_size, got.tta, got.mean, got.img_size) == (7, True, (0.1, 0.2, 0.3), (16, 16))
    assert not model.training and not hasattr(model, "eval_settings")
    assert all(type(blk.attn) is FastAttention for blk in model.blocks)  # the default kernels
    reference, same = load_for_eval(tmp_path / "a.pt", kernels="reference")
    assert same == got and not any(isinstance(m, FastAttention) for m in reference.modules())
    _, default = load_for_eval(tiny_checkpoint(tmp_path / "b.pt"))  # not from `cct train`
    # an official-layout model not trained here: the official recipes' CIFAR statistics (as `cct predict` uses)
    assert (default.precision, default.batch_size, default.tta, default.mean) == ("fp32", 256, False, CIFAR_MEAN)


def test_eval_cli_text_json_and_plot(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    code, out, err = run_cli(["eval", str(ckpt), "--data", str(tree), "--json", "--plot", str(tmp_path / "cm.png")],
                             capsys)
    assert code == 0
    report = json.loads(out)
    for key in ("top1", "top5", "loss", "per_class", "confusion"):
        assert key in report
    assert report["n"] == 12 and 0 <= report["top1"] <= 1 and set(report["per_class"]) == set(CLASSES)
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(["eval", str(ckpt), "--data", str(tree), "--tta", "--batch-size", "5"], capsys)
    assert code == 0 and "top-1" in out and "TTA" in out and "ant" in out
    code, out, _ = run_cli(["eval", str(ckpt), "--data", str(tree), "--tta", "--tta-translate", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["tta_translate"] == 2
    code, _, err = run_cli(["eval", str(ckpt), "--data", str(tree), "--no-tta", "--tta-translate", "1"], capsys)
    assert code != 0 and "--tta-translate" in err and len(err.strip().splitlines()) == 1


def test_eval_errors_are_one_line(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    cases = [
        ([str(tmp_path / "missing.pt")], "not found"),
        ([str(garbage)], "garbage.pt"),
        ([str(tiny_checkpoint(tmp_path / "five.pt", num_classes=5))], "5 classes"),
    ]
    for args, message in cases:
        code, out, err = run_cli(["eval", *args, "--data", str(tree), "--json"], capsys)
        assert code == 2 and out == "" and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, err = run_cli(["eval", str(tmp_path / "five.pt"), "--data", str(tmp_path / "nodata")], capsys)
    assert code == 2 and "not found" in err


def test_eval_of_the_runs_own_source_reads_its_cache_entry(tmp_path, capsys):
    """The run decoded its tree at the images' own size; eval of the same tree decodes it the same way (one cache
    entry, not a second copy of the same pixels at the model's size). A source changed since is decoded at the
    model's size."""
    from cct import cache
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "cct_2_3x2_32", "--data", str(tree), "--out", str(out), "--epochs", "1",
                            "--batch-size", "4", "--quiet"], capsys)
    assert code == 0, err
    assert len(cache.entries()) == 1
    results = json.loads((out / "results.json").read_text())
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(tree), "--json"], capsys)
    assert code == 0, err
    assert len(cache.entries()) == 1 and json.loads(stdout)["loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    for image in tree.glob("*/*/*.png"):  # the same tree, now of 24x24 images: the model's 16x16 is asked for
        Image.open(image).resize((24, 24)).save(image)
    code, stdout, err = run_cli(["eval", str(out / "best.pt"), "--data", str(tree), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["n"] == 12, err


def test_figures_draw_dollars_as_written(tmp_path):
    """Class and file names are data: "from_$5_to_$10" used to be parsed as matplotlib maths and fail ("5_to_"), and
    "bills $1 and $2" was typeset as a formula."""
    from cct.plots import plot_confusion
    classes = ["from_$5_to_$10", "over_$10", "bills $1 and $2"]
    plot_confusion([[1, 0, 0], [0, 1, 0], [0, 0, 1]], classes, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    model = create_model("cct_2_3x2_32", num_classes=3)
    model.class_names = classes
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    image = tmp_path / "from_$5_to_$10.png"
    Image.new("RGB", (32, 32), (9, 90, 200)).save(image)
    from cct.explain import explain
    assert explain(ckpt, [str(image)], tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_confusion_plot_gives_each_cells_fraction_and_count(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    from cct.plots import plot_confusion
    texts, real = [], Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **kw: texts.append((x, y, s)) or real(self, x, y, s, **kw))
    plot_confusion([[3, 1], [0, 2]], ["ant", "a bee with a long name"], tmp_path / "cm.png")
    # (column: predicted, row: true, text); an empty cell says nothing
    assert sorted(texts) == [(0, 0, "0.75\n3"), (1, 0, "0.25\n1"), (1, 1, "1.00\n2")]
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
