"""cct.data: trees in memory (sizes, channels, bad images), the cache, splits, batching, the one `load`."""
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_tree
from cct import data, stream
from cct.data import DataError, Dataset, ImageSet, batch_indices, load, split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


COUNTS = {"train": {"dog": 3, "cat": 4, "ant": 2}, "test": {"cat": 2, "dog": 1, "ant": 1}}


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tree", COUNTS)


# ---------------------------------------------------------------------------------------------------
# image-folder trees in memory


def test_image_tree_folder(tree, cache):
    ds = load(tree, cache_dir=cache, progress=False)
    assert isinstance(ds, Dataset) and ds.classes == ["ant", "cat", "dog"]  # sorted folder names
    assert ds.train.images.shape == (9, 3, 8, 8) and ds.train.images.dtype == torch.uint8
    assert ds.train.images.is_contiguous() and ds.train.labels.dtype == torch.int64
    assert torch.bincount(ds.train.labels).tolist() == [2, 4, 3]
    assert torch.bincount(ds.test.labels).tolist() == [1, 2, 1]
    assert ds.val is None and ds.skipped == 0 and str(tree) in ds.source
    # pixels are the files' pixels, channels first
    first = np.array(Image.open(tree / "train" / "ant" / "000.png"))
    assert torch.equal(ds.train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_val_folder_and_no_test(tmp_path, cache):
    root = make_tree(tmp_path / "t", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    ds = load(root, cache_dir=cache, progress=False)
    assert ds.test is None and len(ds.val) == 2
    with pytest.raises(DataError, match="not a class of train"):
        load(make_tree(tmp_path / "u", {"train": {"a": 1}, "test": {"z": 1}}), cache_dir=cache, progress=False)
    with pytest.raises(DataError, match="no image files"):  # neither a tree nor class folders
        (tmp_path / "w" / "notes").mkdir(parents=True)
        (tmp_path / "w" / "notes" / "readme.txt").write_text("no image")
        load(tmp_path / "w", cache_dir=cache, progress=False)
    # without train/, the folders are classes (flat class folders): one of a single image is an error
    with pytest.raises(DataError, match="class 'b' has 1 image"):
        load(make_tree(tmp_path / "v", {"a": {"b": 1, "c": 3}}), cache_dir=cache, progress=False)
    ds = load(tmp_path / "v", cache_dir=cache, progress=False, test_split=0)  # ... unless no test image is drawn
    assert ds.classes == ["b", "c"] and len(ds.train) == 4  # a/ only wraps the class folders: looked into
    with pytest.raises(DataError, match="one class only .'x'.; a classifier needs two or more"):
        load(make_tree(tmp_path / "one", {"b": {"x": 2}}), cache_dir=cache, progress=False)


def test_sizes_and_channels(tmp_path, cache):
    gray = make_tree(tmp_path / "gray", {"train": {"a": 2}, "test": {"a": 1}}, mode="L")
    ds = load(gray, cache_dir=cache, progress=False)
    assert ds.train.images.shape == (2, 1, 8, 8)  # every image grayscale → 1 channel
    assert load(gray, cache_dir=cache, in_chans=3, progress=False).train.images.shape == (2, 3, 8, 8)

    mixed = make_tree(tmp_path / "mixed", {"train": {"a": 2}}, mode="L")
    make_tree(mixed, {"train": {"b": 1}}, mode="RGBA", ext="png", seed=1)
    make_tree(mixed, {"train": {"c": 1}}, size=(12, 10), mode="RGB", ext="jpg", seed=2)
    ds = load(mixed, cache_dir=cache, progress=False, test_split=0)  # train/ alone, and classes of one image
    assert ds.train.images.shape == (4, 3, 8, 8)  # RGB wins; the odd 12x10 image resized to the common 8x8
    gray_rgb = ds.train.images[0]
    assert torch.equal(gray_rgb[0], gray_rgb[1]) and torch.equal(gray_rgb[1], gray_rgb[2])
    ds = load(mixed, cache_dir=cache, img_size=(6, 5), in_chans=1, progress=False, test_split=0)
    assert ds.train.images.shape == (4, 1, 6, 5)


def test_bad_image(tree, cache, caplog):
    (tree / "train" / "cat" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg"):
        load(tree, cache_dir=cache, progress=False)
    with caplog.at_level(logging.WARNING, logger="cct.data"):
        ds = load(tree, cache_dir=cache, skip_bad_images=True, progress=False)
    assert ds.skipped == 1 and len(ds.train) == 9 and "skipped 1" in caplog.text
    assert load(tree, cache_dir=cache, skip_bad_images=True, progress=False).skipped == 1  # the cache keeps it


# ---------------------------------------------------------------------------------------------------
# cache


def test_cache_roundtrip_and_keys(tree, cache, monkeypatch):
    first = load(tree, cache_dir=cache, progress=False)
    files = list((cache / "decoded").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left

    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")
    monkeypatch.setattr(data, "_decode_tree", no_decoding)
    again = load(tree, cache_dir=cache, progress=False)
    assert torch.equal(again.train.images, first.train.images) and again.classes == first.classes
    assert again.source == first.source and again.test is not None
    moved = tree.rename(tree.parent / "moved")  # same content elsewhere: cached, described by its new path
    assert "moved" in load(moved, cache_dir=cache, progress=False).source
    tree = moved
    with pytest.raises(AssertionError, match="decoded again"):  # other size → other key
        load(tree, cache_dir=cache, img_size=4, progress=False)
    (tree / "train" / "cat" / "000.png").unlink()  # content change → other key
    with pytest.raises(AssertionError, match="decoded again"):
        load(tree, cache_dir=cache, progress=False)
    # two files swapped (a label fixed by hand): the same names, sizes and mtimes, other content
    monkeypatch.undo()
    a, b = tree / "train" / "cat" / "x.bmp", tree / "train" / "dog" / "x.bmp"
    for p, value in ((a, 0), (b, 255)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(p)
        os.utime(p, ns=(10**18, 10**18))
    load(tree, cache_dir=cache, progress=False)
    monkeypatch.setattr(data, "_decode_tree", no_decoding)
    a.rename(tree / "swap.bmp"), b.rename(a), (tree / "swap.bmp").rename(b)
    with pytest.raises(AssertionError, match="decoded again"):
        load(tree, cache_dir=cache, progress=False)


def test_corrupt_cache_is_ignored(tree, cache):
    load(tree, cache_dir=cache, progress=False)
    (file,) = (cache / "decoded").iterdir()
    file.write_bytes(b"garbage")
    assert len(load(tree, cache_dir=cache, progress=False).train) == 9


# ---------------------------------------------------------------------------------------------------
# the choice between memory and streaming


def test_streaming_is_chosen_above_the_memory_threshold(tree, cache, monkeypatch):
    assert isinstance(load(tree, cache_dir=cache, progress=False).train, ImageSet)  # 13 tiny images fit
    monkeypatch.setattr(data, "available_memory", lambda: 5000)  # 13×3×8×8 = 2496 B > 0.25 × 5000 B
    assert isinstance(load(tree, cache_dir=cache, progress=False).train, stream.StreamImageSet)
    assert isinstance(load(tree, cache_dir=cache, threshold=0.5, progress=False).train, ImageSet)
    assert isinstance(load(tree, cache_dir=cache, stream=False, progress=False).train, ImageSet)
    # every process on the machine holds its own copy
    assert isinstance(load(tree, cache_dir=cache, threshold=0.5, processes_per_machine=2, progress=False).train,
                      stream.StreamImageSet)
    with pytest.raises(DataError, match="--stream-threshold"):
        load(tree, threshold=0)


def test_stream_needs_a_folder_tree(tree, tmp_path, cache):
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tree, arcname="tree")
    with pytest.raises(DataError, match="image-folder tree"):
        load(archive, stream=True)
    assert isinstance(load(archive, cache_dir=cache, progress=False).train, ImageSet)  # archives load into memory


def test_option_checks(tree):
    with pytest.raises(DataError, match="image size must be positive"):
        load(tree, img_size=(0, 8), stream=True)
    with pytest.raises(DataError, match="in_chans must be 1 or 3"):
        load(tree, in_chans=2, stream=True)


# ---------------------------------------------------------------------------------------------------
# splits and batches


def _synthetic(n_per_class=(50, 30, 20), val=None) -> Dataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    images = torch.arange(len(labels)).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.uint8).contiguous()
    return Dataset(ImageSet(images, labels), None, val, ["a", "b", "c"], "synthetic", 0)


def test_split_stratified_and_seeded():
    ds = _synthetic()
    train, val = split(ds, train_limit=50, val_split=0.2, seed=0)
    assert len(train) + len(val) == 50
    assert torch.bincount(torch.cat([train.labels, val.labels])).tolist() == [25, 15, 10]  # stratified limit
    assert torch.bincount(val.labels).tolist() == [5, 3, 2]
    ids = lambda s: set(s.images[:, 0, 0, 0].tolist())
    assert not ids(train) & ids(val)
    again = split(ds, train_limit=50, val_split=0.2, seed=0)
    assert torch.equal(again[0].images, train.images) and torch.equal(again[1].images, val.images)
    assert not torch.equal(split(ds, train_limit=50, val_split=0.2, seed=1)[1].images, val.images)


def test_train_limit_keeps_every_class(caplog):
    """A stratified --train-limit rounds a rare class down to nothing: it keeps one example while there are enough
    to go round (the rare class was tested but never trained on), and a limit below the class count warns."""
    ds = _synthetic((60, 30, 3))
    assert torch.bincount(split(ds, train_limit=10, val_split=0.0, seed=0)[0].labels).tolist() == [6, 3, 1]
    ds = _synthetic((100, 40, 2))
    assert torch.bincount(split(ds, train_limit=20, val_split=0.0, seed=0)[0].labels, minlength=3).tolist() == [13, 6, 1]
    with caplog.at_level(logging.WARNING, logger="cct.data"):
        train, _ = split(ds, train_limit=2, val_split=0.0, seed=0)
    assert len(train) == 2 and "--train-limit 2 is below the 3 classes" in caplog.text


def test_split_edges(caplog):
    ds = _synthetic((5, 5, 5))
    train, val = split(ds, train_limit=None, val_split=0.0, seed=0)
    assert val is None and len(train) == 15
    _, val = split(ds, train_limit=None, val_split=0.01, seed=0)
    assert torch.bincount(val.labels).tolist() == [1, 1, 1]  # at least one per class
    for bad in (dict(train_limit=None, val_split=1.0), dict(train_limit=0, val_split=0.1)):
        with pytest.raises(DataError):
            split(ds, seed=0, **bad)
    folder_val = ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]))
    with caplog.at_level(logging.WARNING, logger="cct.data"):
        train, val = split(_synthetic(val=folder_val), train_limit=None, val_split=0.1, seed=0)
    assert val is folder_val and len(train) == 100 and "val-split ignored" in caplog.text


def test_batch_indices():
    g = lambda: torch.Generator().manual_seed(3)
    batches = list(batch_indices(10, 4, g()))
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [b.tolist() for b in batch_indices(10, 4, g())] == [b.tolist() for b in batches]
    assert [len(b) for b in batch_indices(10, 4, g(), drop_last=True)] == [4, 4]
    assert torch.cat(list(batch_indices(5, 2, g(), shuffle=False))).tolist() == [0, 1, 2, 3, 4]
    # two ranks: shards of the same global batches, equal and non-empty, covering every index
    shards = [list(batch_indices(10, 4, g(), rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards[0]] == [2, 2, 1] == [len(s) for s in shards[1]]
    for i, b in enumerate(batches[:2]):
        assert torch.equal(torch.cat([shards[0][i], shards[1][i]]), b)
    assert set(torch.cat(shards[0] + shards[1]).tolist()) == set(range(10))
    three = [list(batch_indices(7, 3, g(), rank=r, world_size=3)) for r in range(3)]
    assert all(len(b) == 1 for s in three for b in s) and len(three[0]) == 3


# ---------------------------------------------------------------------------------------------------
# the shared CIFAR-10 copy


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").exists(), reason="shared data not present")
def test_shared_cifar10_jpeg():
    """Through the user's own cache ($CCT_DATA or ~/.cache/cct), as a run would: the first run decodes
    (~6 s on an idle machine), later ones load the cache in about a second."""
    ds = load(SHARED / "cifar10-jpeg.tar.gz", progress=False)
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
