"""cct.sources: folders and archives as files, the safety of archives (paths, links, truncation), the tree layout."""
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_fixtures import make_tree, pack
from cct.data import load
from cct.sources import DataError, Files, tree_items

COUNTS = {"train": {"dog": 3, "cat": 4, "ant": 2}, "test": {"cat": 2, "dog": 1, "ant": 1}}


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tree", COUNTS)


# ---------------------------------------------------------------------------------------------------
# sources


@pytest.mark.parametrize("name", ["t.tar", "t.tar.gz", "t.zip"])
@pytest.mark.parametrize("top", [None, "cifar-like"])
def test_image_tree_archives(tree, tmp_path, cache, name, top):
    reference = load(tree, cache_dir=cache, progress=False)
    ds = load(pack(tree, tmp_path / name, top), cache_dir=cache, progress=False)
    assert ds.classes == reference.classes
    assert torch.equal(ds.train.images, reference.train.images) and torch.equal(ds.test.labels, reference.test.labels)


def test_files_of_a_folder_and_its_archives_are_the_same(tree, tmp_path):
    folder = Files(tree)
    assert folder.kind == "folder" and "train/ant/000.png" in folder.names
    for name, kind in (("t.tar.gz", "tar"), ("t.zip", "zip")):
        archive = Files(pack(tree, tmp_path / name, None))
        assert archive.kind == kind and archive.names == folder.names
        assert all(archive.read(n) == folder.read(n) for n in folder.names)
        assert isinstance(archive.handle(folder.names[0]), bytes)  # archives stay in memory
    assert folder.handle(folder.names[0]) == str(tree / folder.names[0])  # folders are read by path


def test_tree_items_order_and_wrapping_folder(tree, tmp_path):
    classes, items = tree_items(Files(tree))
    assert classes == ["ant", "cat", "dog"] and set(items) == {"train", "test"}
    assert [label for label, _ in items["train"]] == [0, 0, 1, 1, 1, 1, 2, 2, 2]  # (class, name) order
    assert items["train"][0] == (0, "train/ant/000.png")
    wrapped = tree_items(Files(pack(tree, tmp_path / "w.zip", "top")))
    assert wrapped[0] == classes and [n for _, n in wrapped[1]["test"]] == [f"top/{n}" for _, n in items["test"]]
    (tree / "train" / ".hidden").mkdir()
    (tree / "train" / ".hidden" / "x.png").write_bytes(b"x")  # hidden folders are no class
    assert tree_items(Files(tree))[0] == classes
    with pytest.raises(DataError, match="test/zebra is not a class of train"):
        tree_items(Files(make_tree(tmp_path / "u", {"train": {"a": 1}, "test": {"zebra": 1}})))


def test_tree_spellings_and_class_folders_named_like_splits(tmp_path, cache, caplog):
    # split folders in any case, valid/ for val (Kaggle's Train/Test, Roboflow's valid/)
    spelled = make_tree(tmp_path / "kaggle", {"Train": {"a": 3, "b": 3}, "Test": {"a": 1, "b": 1},
                                              "valid": {"a": 1, "b": 1}})
    ds = load(spelled, cache_dir=cache, progress=False)
    assert ds.classes == ["a", "b"] and (len(ds.train), len(ds.test), len(ds.val)) == (6, 2, 2)
    # flat class folders, one of them named train (with subfolders): three classes, not a tree of day/night
    flat = make_tree(tmp_path / "vehicles", {c: {"day": 2, "night": 2} for c in ("bus", "car", "train")})
    assert load(flat, cache_dir=cache, progress=False, test_split=0.25).classes == ["bus", "car", "train"]
    # a tree with an extra folder of images beside train/ and test/ is still a tree
    make_tree(spelled, {"docs": {"figures": 1}})
    assert load(spelled, cache_dir=cache, progress=False).classes == ["a", "b"]
    # train/ alone: a test split is held out of it, as from class folders (it was a run with no test set)
    alone = make_tree(tmp_path / "alone", {"train": {"a": 5, "b": 5}})
    with caplog.at_level("WARNING"):
        ds = load(alone, cache_dir=cache, progress=False, test_split=0.2, seed=3)
    assert (len(ds.train), len(ds.test)) == (8, 2) and ds.split_record["test_files"][0].startswith("train/")
    assert "without images" not in caplog.text  # train/ is no empty class folder
    # files without an image extension in a tree are not images (Thumbs.db, desktop.ini, notes)
    (alone / "train" / "a" / "Thumbs.db").write_bytes(b"\0" * 10)
    (alone / "train" / "b" / "notes.txt").write_text("shot in 2019")
    assert len(load(alone, cache_dir=cache, progress=False, test_split=0).train) == 10


def test_truncated_tar_refused(tree, tmp_path):
    archive = pack(tree, tmp_path / "t.tar", None)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2 + 100])
    with pytest.raises(DataError, match="cannot read archive"):
        Files(cut)


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


def test_zip_of_utf8_names_without_the_utf8_flag(tmp_path):
    """Info-ZIP's `zip` stores UTF-8 names without the flag that says so, which Python reads as cp437: the class
    "café" came out as "caf├⌐" and 猫 as "τî½". Written here as that tool writes it (the flag cleared in the local
    and the central headers); a real cp437 name that is no valid UTF-8 keeps its cp437 reading."""
    from cct.sources import Files
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "png")
    names = ["café/0.png", "猫/0.png", "dog/0.png"]
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        for name in names:
            zf.writestr(name, buf.getvalue())
    raw = bytearray((tmp_path / "x.zip").read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local headers, central directory
        start = raw.find(signature)
        while start >= 0:
            raw[start + flags_at + 1] &= ~0x08  # bit 11 of the little-endian flags: the UTF-8 flag
            start = raw.find(signature, start + 4)
    (tmp_path / "x.zip").write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp_path / "x.zip") as zf:
        assert not any(i.flag_bits & 0x800 for i in zf.infolist()) and zf.namelist()[0] == "caf├⌐/0.png"
    assert sorted(Files(tmp_path / "x.zip").names) == sorted(names)
    with zipfile.ZipFile(tmp_path / "dos.zip", "w") as zf:
        zf.writestr(zipfile.ZipInfo("caf\x82/0.png".encode("latin-1").decode("cp437")), b"x")  # cp437 é: no UTF-8
    assert Files(tmp_path / "dos.zip").names == ["café/0.png"]


def test_missing_and_foreign_sources(tmp_path, cache):
    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "nope", cache_dir=cache)
    (tmp_path / "f.txt").write_text("hello")
    with pytest.raises(DataError, match="not a folder"):
        load(tmp_path / "f.txt", cache_dir=cache)




def test_symlinked_class_folders_are_followed(tree, tmp_path, cache):
    """A tree whose class folders link to photos kept elsewhere loads as the real tree."""
    linked = tmp_path / "linked"
    for split in ("train", "test"):
        (linked / split).mkdir(parents=True)
        for folder in (tree / split).iterdir():
            (linked / split / folder.name).symlink_to(folder, target_is_directory=True)
    assert Files(linked).names == Files(tree).names and "train/dog/000.png" in Files(linked).names
    reference = load(tree, cache_dir=cache, progress=False)
    ds = load(linked, cache_dir=tmp_path / "cache2", progress=False)
    assert ds.classes == reference.classes and torch.equal(ds.train.images, reference.train.images)


def test_a_class_linked_to_a_sibling_is_warned_about(tree, caplog):
    """A class folder that links to another class's folder puts each image in both classes (a CSV listing a path
    twice is an error): the images are read as before, and a warning names both folders."""
    (tree / "train" / "kitty").symlink_to(tree / "train" / "cat", target_is_directory=True)
    with caplog.at_level("WARNING"):
        names = Files(tree).names
    assert "train/kitty/000.png" in names and "train/cat/000.png" in names
    assert caplog.text.count("train/cat and train/kitty are the same folder (a link)") == 1
    with caplog.at_level("WARNING"):
        Files(tree)
    assert caplog.text.count("are the same folder") == 1  # once a process
    caplog.clear()
    with caplog.at_level("WARNING"):
        Files(tree / "test")
    assert "a link" not in caplog.text  # a folder reached once: no warning


def test_a_symlink_cycle_is_not_entered(tree):
    before = Files(tree).names
    (tree / "train" / "dog" / "up").symlink_to(tree / "train", target_is_directory=True)  # a link to its parent
    assert Files(tree).names == before


def test_a_folder_that_cannot_be_listed_is_an_error_not_a_missing_class(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list; a class folder without read permission (simulated: CI runs as root,
    which reads anything) must not quietly drop its images or its class."""
    import os
    from cct.sources import folder_files
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "0.png").write_bytes(b"x")
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "dog":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"cannot read folder .*dog: Permission denied"):
        folder_files(tmp_path)


def test_files_pillow_reads_but_cct_does_not_are_warned_about(tmp_path, caplog):
    from cct.sources import layout
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "extra.tga")
    (tmp_path / "cat" / "notes.txt").write_text("not an image: no warning for it")
    _, classes, items, _ = layout(tmp_path)
    assert classes == ["cat", "dog"] and len(items["train"]) == 4
    assert "1 file(s) of .tga left out, first cat/extra.tga" in caplog.text and "notes.txt" not in caplog.text


@pytest.mark.parametrize("tree", [False, True])
def test_images_outside_the_class_folders_are_warned_about(tmp_path, caplog, tree):
    """A preview beside flat class folders, or Kaggle's unlabelled test/*.jpg beside train/<class>/: left out, as
    the layout says, with a warning naming how many and the first."""
    from cct.sources import layout
    root = tmp_path / "train" if tree else tmp_path
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(root / c / f"{i}.png")
    with caplog.at_level("WARNING"):
        layout(tmp_path)
    assert "outside the class folders" not in caplog.text
    stray = tmp_path / "test" if tree else tmp_path  # unlabelled test images, or previews beside the classes
    stray.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(stray / f"{i}.png")
    with caplog.at_level("WARNING"):
        _, classes, items, _ = layout(tmp_path)
    assert classes == ["cat", "dog"] and sum(map(len, items.values())) == 4
    first = "test/0.png" if tree else "0.png"
    assert f"3 image(s) outside the class folders left out (no label to learn), first {first}" in caplog.text
