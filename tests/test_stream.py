"""cct.stream: a streamed image-folder tree yields the in-memory path's images, trains and evaluates identically."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cct import cli, create_model, data, save_checkpoint, stream
from cct.data import DataError

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCT_DATA", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """PNGs and JPEGs, one grayscale image and one of another size (resized to the common 16×16)."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.integers(0, 90, (16, 16, 3)) + 70 * c).astype(np.uint8)
                image = Image.fromarray(pixels)
                if (c, i) == (1, 2):
                    image = image.convert("L")
                if (c, i) == (2, 1):
                    image = image.resize((20, 18))
                image.save(folder / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=95)
    return root


@pytest.mark.parametrize("img_size", [None, 12])
def test_streamed_images_equal_in_memory_images(tree, img_size):
    memory = data.load(tree, img_size=img_size, progress=False)
    streamed = data.load(tree, img_size=img_size, stream=True, workers=1, progress=False)
    assert isinstance(streamed.train, stream.StreamImageSet) and streamed.classes == memory.classes
    assert streamed.in_chans == memory.in_chans == 3 and streamed.img_size == memory.img_size
    for part in ("train", "test"):
        mem, lazy = getattr(memory, part), getattr(streamed, part)
        assert torch.equal(lazy.labels, mem.labels)
        assert lazy.images.shape == mem.images.shape
        assert torch.equal(lazy.images[torch.arange(len(mem))], mem.images)  # decoded in this process
        assert torch.equal(torch.cat(list(lazy.images.split(5))), mem.images)  # decoded by a loader worker
    # the training path: a shuffled epoch of index batches through the loader, and the seeded split
    train_mem, val_mem = data.split(memory, train_limit=None, val_split=0.25, seed=1)
    train_lazy, val_lazy = data.split(streamed, train_limit=None, val_split=0.25, seed=1)
    assert torch.equal(val_lazy.images[torch.arange(len(val_mem))], val_mem.images)
    batches = list(data.batch_indices(len(train_mem), 4, torch.Generator().manual_seed(0)))
    got = list(data.load_batches(train_lazy, batches))
    want = list(data.load_batches(train_mem, batches))
    assert len(got) == len(want) == len(batches)
    for (i1, x1, y1), (i2, x2, y2) in zip(got, want):
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.uint8


def test_mixed_sizes_are_reported_once_by_the_path_taken(tree, caplog):
    """The memory estimate samples image sizes on the way to an in-memory load too: only the path that resizes
    says so (a first in-memory load printed both warnings)."""
    with caplog.at_level("WARNING"):
        data.load(tree, progress=False)
    assert caplog.text.count("sizes; resizing all to the most common") == 1 and "of a sample" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        data.load(tree, stream=True, workers=0)
    assert caplog.text.count("images of several sizes; resizing all to the most common of a sample, 16x16") == 1


def test_grayscale_tree_streams_one_channel(tmp_path):
    for split in ("train", "test"):
        for name in CLASSES:
            (tmp_path / "gray" / split / name).mkdir(parents=True)
            Image.fromarray(np.full((8, 8), 40 * len(name), np.uint8)).save(tmp_path / "gray" / split / name / "a.png")
    memory = data.load(tmp_path / "gray", progress=False)
    streamed = data.load(tmp_path / "gray", stream=True, workers=0)
    assert streamed.in_chans == memory.in_chans == 1
    assert torch.equal(streamed.train.images[torch.arange(3)], memory.train.images)


def test_unreadable_image_is_one_error_or_black(tree, tmp_path):
    import shutil
    root = shutil.copytree(tree, tmp_path / "bad")
    (root / "train" / "ant" / "0.png").write_bytes(b"not an image")
    streamed = data.load(root, stream=True, workers=1)
    with pytest.raises(DataError, match=r"cannot read image .*ant/0\.png.*--skip-bad-images"):
        list(streamed.train.images.split(4))  # raised in this process, not as a worker's traceback
    skipping = data.load(root, stream=True, workers=0, skip_bad_images=True)
    first = skipping.train.images[torch.tensor([0, 1])]
    assert first.shape == (2, 3, 16, 16) and first[0].sum() == 0 and first[1].sum() > 0


def test_training_streamed_equals_training_in_memory(tree, tmp_path):
    common = ["train", "--model", "cct_2_3x2_32", "--data", str(tree), "--epochs", "1", "--batch-size", "8",
              "--val-split", "0.25", "--precision", "fp32", "--workers", "1", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "memory"), "--no-stream"]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "stream"), "--stream", "--loader-workers", "1"]) == 0
    memory, streamed = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("memory", "stream"))
    for key in ("test_loss", "test_top1", "best_val_top1", "train_images", "val_images", "test_images"):
        assert memory[key] == streamed[key], key
    assert (tmp_path / "memory" / "history.csv").read_text().split(",")[:-1] == \
        (tmp_path / "stream" / "history.csv").read_text().split(",")[:-1]  # all but the last column, seconds


def test_eval_streamed_equals_eval_in_memory(tree, tmp_path, monkeypatch, capsys):
    """`cct eval` streams a test set too large for memory, batch by batch, to the same figures."""
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32", num_classes=3, img_size=16)
    model.class_names = CLASSES
    ckpt = save_checkpoint(model, tmp_path / "m.pt", eval={"precision": "fp32", "batch_size": 4, "tta": True,
                                                            "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})

    def run_eval(available_memory):
        monkeypatch.setattr(data, "available_memory", lambda: available_memory)
        assert cli.main(["eval", str(ckpt), "--data", str(tree), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    memory = run_eval(None)  # memory unknown: loaded into memory
    decoded, real = [], stream.StreamImages.batches

    def spy(self, index_batches, **kwargs):
        index_batches = list(index_batches)
        decoded.append([len(b) for b in index_batches])
        return real(self, index_batches, **kwargs)
    monkeypatch.setattr(stream.StreamImages, "batches", spy)
    streamed = run_eval(1000)  # 33 images of 3×16×16 take 25 KB: streamed
    assert decoded == [[4, 4, 1]]  # the 9 test images, decoded in batches of the checkpoint's size
    assert streamed == memory and memory["n"] == 9 and memory["tta"] and memory["batch_size"] == 4
