"""cct.data: every source type from tiny generated fixtures, safety of archives, cache, splits, batching."""
import io
import logging
import os
import pickle
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cct import data
from cct.data import DataError, Dataset, ImageSet, batch_indices, load, split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------------
# fixtures


def make_tree(root: Path, counts: dict, size=(8, 8), mode="RGB", ext="png", seed=0) -> Path:
    """root/<split>/<class>/<i>.<ext> random images; counts = {split: {class: n}}."""
    rs = np.random.RandomState(seed)
    for split_name, classes in counts.items():
        for cls, n in classes.items():
            d = root / split_name / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], len(mode))
                Image.fromarray(rs.randint(0, 256, shape).astype(np.uint8), mode).save(d / f"{i:03d}.{ext}")
    return root


def pack(src: Path, dest: Path, top: str | None) -> Path:
    """A .tar, .tar.gz or .zip of the files under src, inside folder `top` or at the archive's root."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    arc = lambda p: (f"{top}/" if top else "") + p.relative_to(src).as_posix()
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for p in files:
                zf.write(p, arc(p))
    else:
        with tarfile.open(dest, "w:gz" if dest.name.endswith(".gz") else "w") as tf:
            for p in files:
                tf.add(p, arc(p))
    return dest


def fake_cifar(root: Path, kind: str, per_batch: int = 4, archive: bool = True, seed=0) -> Path:
    """A tiny copy of an official CIFAR python release: same files, keys and layout (bytes keys, as the
    Python 2 originals load with encoding='bytes')."""
    rs = np.random.RandomState(seed)
    release = data._CIFAR[kind]
    folder = root / release.folder
    folder.mkdir(parents=True)
    n_classes = 10 if kind == "cifar10" else 100

    def batch(name, n):
        labels = [int(v) for v in rs.randint(0, n_classes, n)]
        d = {b"data": rs.randint(0, 256, (n, 3072)).astype(np.uint8), release.label_key.encode(): labels,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if kind == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))

    for name in release.train_files:
        batch(name, per_batch)
    batch(release.test_file, per_batch)
    names = [f"class{i:02d}".encode() for i in range(n_classes)]
    (folder / release.meta_file).write_bytes(pickle.dumps({release.names_key.encode(): names}, protocol=2))
    if not archive:
        return folder
    dest = root / release.archive
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, release.folder)
    return dest


COUNTS = {"train": {"dog": 3, "cat": 4, "ant": 2}, "test": {"cat": 2, "dog": 1, "ant": 1}}


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tree", COUNTS)


# ---------------------------------------------------------------------------------------------------
# sources


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


@pytest.mark.parametrize("name", ["t.tar", "t.tar.gz", "t.zip"])
@pytest.mark.parametrize("top", [None, "cifar-like"])
def test_image_tree_archives(tree, tmp_path, cache, name, top):
    reference = load(tree, cache_dir=cache, progress=False)
    ds = load(pack(tree, tmp_path / name, top), cache_dir=cache, progress=False)
    assert ds.classes == reference.classes
    assert torch.equal(ds.train.images, reference.train.images) and torch.equal(ds.test.labels, reference.test.labels)


def test_val_folder_and_no_test(tmp_path, cache):
    root = make_tree(tmp_path / "t", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    ds = load(root, cache_dir=cache, progress=False)
    assert ds.test is None and len(ds.val) == 2
    with pytest.raises(DataError, match="not a class of train"):
        load(make_tree(tmp_path / "u", {"train": {"a": 1}, "test": {"z": 1}}), cache_dir=cache, progress=False)
    with pytest.raises(DataError, match="train/<class>"):
        load(make_tree(tmp_path / "v", {"a": {"b": 1}}), cache_dir=cache, progress=False)


def test_sizes_and_channels(tmp_path, cache):
    gray = make_tree(tmp_path / "gray", {"train": {"a": 2}, "test": {"a": 1}}, mode="L")
    ds = load(gray, cache_dir=cache, progress=False)
    assert ds.train.images.shape == (2, 1, 8, 8)  # every image grayscale → 1 channel
    assert load(gray, cache_dir=cache, in_chans=3, progress=False).train.images.shape == (2, 3, 8, 8)

    mixed = make_tree(tmp_path / "mixed", {"train": {"a": 2}}, mode="L")
    make_tree(mixed, {"train": {"b": 1}}, mode="RGBA", ext="png", seed=1)
    make_tree(mixed, {"train": {"c": 1}}, size=(12, 10), mode="RGB", ext="jpg", seed=2)
    ds = load(mixed, cache_dir=cache, progress=False)
    assert ds.train.images.shape == (4, 3, 8, 8)  # RGB wins; the odd 12x10 image resized to the common 8x8
    gray_rgb = ds.train.images[0]
    assert torch.equal(gray_rgb[0], gray_rgb[1]) and torch.equal(gray_rgb[1], gray_rgb[2])
    ds = load(mixed, cache_dir=cache, img_size=(6, 5), in_chans=1, progress=False)
    assert ds.train.images.shape == (4, 1, 6, 5)


def test_bad_image(tree, cache, caplog):
    (tree / "train" / "cat" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg"):
        load(tree, cache_dir=cache, progress=False)
    with caplog.at_level(logging.WARNING, logger="cct.data"):
        ds = load(tree, cache_dir=cache, skip_bad_images=True, progress=False)
    assert ds.skipped == 1 and len(ds.train) == 9 and "skipped 1" in caplog.text
    assert load(tree, cache_dir=cache, skip_bad_images=True, progress=False).skipped == 1  # the cache keeps it


def test_cifar10_archive_and_folder(tmp_path, cache):
    archive = fake_cifar(tmp_path / "a", "cifar10")
    ds = load(archive, cache_dir=cache, progress=False)
    assert ds.classes == [f"class{i:02d}" for i in range(10)] and "CIFAR-10" in ds.source
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    raw = pickle.loads((tmp_path / "a" / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")
    assert torch.equal(ds.train.images[:4].reshape(4, -1), torch.from_numpy(raw[b"data"]))
    assert ds.train.labels[:4].tolist() == raw[b"labels"]
    folder = load(tmp_path / "a" / "cifar-10-batches-py", cache_dir=cache, progress=False)
    assert torch.equal(folder.train.images, ds.train.images)
    small = load(archive, cache_dir=cache, img_size=16, in_chans=1, progress=False)
    assert small.train.images.shape == (20, 1, 16, 16)


def test_cifar100_archive(tmp_path, cache):
    ds = load(fake_cifar(tmp_path, "cifar100", per_batch=6), cache_dir=cache, progress=False)
    assert len(ds.classes) == 100 and ds.train.images.shape == (6, 3, 32, 32) and len(ds.test) == 6
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="bytes")
    assert ds.train.labels.tolist() == raw[b"fine_labels"]


def test_cifar_by_name(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as e:
        load("cifar10", cache_dir=cache, download=False)
    assert str(cache) in str(e.value) and "\n" not in str(e.value)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="put cifar-100-python.tar.gz"):
        load("cifar100", cache_dir=cache, progress=False)

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": "5"}
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"wrong"))
    with pytest.raises(DataError, match="md5"):
        load("cifar10", cache_dir=cache, progress=False)
    assert not list(cache.glob("*.tar.gz*"))  # no partial download left behind

    fake_cifar(cache, "cifar10")  # an archive in the cache directory is found by name
    monkeypatch.setenv("CCT_DATA", str(cache))
    assert load("cifar10", progress=False).train.images.shape == (20, 3, 32, 32)


def test_crafted_pickle_refused(tmp_path, cache):
    folder = fake_cifar(tmp_path, "cifar10", archive=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="not allowed"):
        load(folder, cache_dir=cache, progress=False)


# ---------------------------------------------------------------------------------------------------
# archive safety


def _tar_with(dest: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    with tarfile.open(dest, "w") as tf:
        ok = tarfile.TarInfo("train/a/0.png")
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, "png")
        ok.size = len(buf.getvalue())
        tf.addfile(ok, io.BytesIO(buf.getvalue()))
        if member.isfile():
            member.size = len(payload)
            tf.addfile(member, io.BytesIO(payload))
        else:
            tf.addfile(member)
    return dest


@pytest.mark.parametrize("name", ["../evil.png", "train/../../evil.png", "/tmp/evil.png"])
def test_traversal_refused(tmp_path, cache, name):
    with pytest.raises(DataError, match="refused.*outside"):
        load(_tar_with(tmp_path / "x.tar", tarfile.TarInfo(name)), cache_dir=cache, progress=False)
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("train/a/0.png", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(DataError, match="refused.*outside"):
        load(tmp_path / "x.zip", cache_dir=cache, progress=False)
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_refused(tmp_path, cache, kind):
    link = tarfile.TarInfo("train/a/link.png")
    link.type, link.linkname = kind, "train/a/0.png"
    with pytest.raises(DataError, match="refused.*link"):
        load(_tar_with(tmp_path / "x.tar", link), cache_dir=cache, progress=False)


def test_zip_symlink_refused(tmp_path, cache):
    info = zipfile.ZipInfo("train/a/link.png")
    info.external_attr = (0o120777 << 16)  # S_IFLNK
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="refused.*link"):
        load(tmp_path / "x.zip", cache_dir=cache, progress=False)


def test_missing_and_foreign_sources(tmp_path, cache):
    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "nope", cache_dir=cache)
    (tmp_path / "f.txt").write_text("hello")
    with pytest.raises(DataError, match="not a folder"):
        load(tmp_path / "f.txt", cache_dir=cache)


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


def test_corrupt_cache_is_ignored(tree, cache):
    load(tree, cache_dir=cache, progress=False)
    (file,) = (cache / "decoded").iterdir()
    file.write_bytes(b"garbage")
    assert len(load(tree, cache_dir=cache, progress=False).train) == 9


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
