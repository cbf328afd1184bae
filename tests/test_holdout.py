"""Flat class folders and CSVs: the seeded, stratified test split, its record, and loading only the
recorded test files later (`cct.holdout`, `cct.data.load(..., test_files=record)`)."""
import csv
import logging
import shutil
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import pack
from cct import holdout, stream
from cct.data import DataError, load
from cct.kinds import detect_kind

COUNTS = {"cat": 10, "dog": 5, "emu": 2}


def make_flat(root, counts=COUNTS, seed=0):
    """root/<class>/<i>.png random images of several sizes, and a stray file that is not an image."""
    rs = np.random.RandomState(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rs.randint(0, 256, (8 + i % 2, 8, 3)).astype(np.uint8)).save(root / cls / f"{i:02d}.png")
    (root / "README.txt").write_text("not a class")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def flat(tmp_path):
    return make_flat(tmp_path / "photos")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _files(ds):
    return ds.split_record["test_files"]


def test_flat_folders_get_a_seeded_stratified_test_split(flat, cache):
    ds = load(flat, img_size=8, cache_dir=cache, progress=False)
    assert ds.classes == ["cat", "dog", "emu"] and len(ds.train) + len(ds.test) == 17
    assert torch.bincount(ds.test.labels).tolist() == [2, 1, 1]  # round(0.2 n), at least 1, at most n - 1
    record = ds.split_record
    assert record["seed"] == 0 and record["fraction"] == 0.2 and record["num_files"] == 17
    assert all(name.split("/")[0] == label for name, label in zip(record["test_files"], record["test_labels"]))
    again = load(flat, img_size=8, cache_dir=cache, progress=False)  # from the cache this time
    assert again.split_record == record and torch.equal(again.test.images, ds.test.images)
    other = load(flat, img_size=8, cache_dir=cache, progress=False, seed=1)
    assert _files(other) != _files(ds) and len(other.test) == 4
    bigger = load(flat, img_size=8, cache_dir=cache, progress=False, test_split=0.5)
    assert torch.bincount(bigger.test.labels).tolist() == [5, 2, 1]  # 2.5 rounds to even
    assert load(flat, img_size=8, cache_dir=cache, progress=False, test_split=0).test is None
    with pytest.raises(DataError, match="--test-split"):
        load(flat, cache_dir=cache, progress=False, test_split=1.0)


def test_choose_test_depends_only_on_the_file_list():
    items = [(c, f"{c}/{i}.png") for c in range(3) for i in range(7)]
    train, test = holdout.choose_test(items, 3, fraction=0.3, seed=5)
    assert sorted(train + test) == sorted(items) and len(test) == 6
    assert holdout.choose_test(list(reversed(items)), 3, fraction=0.3, seed=5) == (train, test)


def test_a_class_of_one_image_is_a_one_line_error(tmp_path, cache):
    root = make_flat(tmp_path / "p", {"cat": 3, "dog": 1})
    with pytest.raises(DataError, match=r"class 'dog' has 1 image\(s\), at least 2") as e:
        load(root, cache_dir=cache, progress=False)
    assert "\n" not in str(e.value)


def test_a_csv_of_paths_and_labels(tmp_path, cache):
    make_flat(tmp_path / "imgs")
    rows = [f"imgs/{c}/{i:02d}.png,{c.upper()}" for c, n in COUNTS.items() for i in range(n)]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(reversed(rows)) + "\n")
    ds = load(tmp_path / "labels.csv", img_size=8, cache_dir=cache, progress=False)
    assert ds.classes == ["CAT", "DOG", "EMU"] and torch.bincount(ds.test.labels).tolist() == [2, 1, 1]
    assert all(name.startswith("imgs/") for name in _files(ds)) and "listed in" in ds.source
    folder = load(tmp_path / "imgs", img_size=8, cache_dir=cache, progress=False)
    assert [n.removeprefix("imgs/") for n in _files(ds)] == _files(folder)  # the same files, drawn the same way
    again = load(tmp_path / "labels.csv", img_size=8, cache_dir=cache, progress=False)
    assert again.split_record == ds.split_record and torch.equal(again.test.images, ds.test.images)
    (tmp_path / "text.csv").write_text("text,label\nhello world,greeting\nbye,farewell\n")
    with pytest.raises(DataError, match="text.csv:2: 'hello world' is not an image file"):
        load(tmp_path / "text.csv", cache_dir=cache, progress=False)
    # label,path columns: the same images and labels
    swapped = [",".join(reversed(r.split(","))) for r in rows]
    (tmp_path / "swapped.csv").write_text("label,path\n" + "\n".join(swapped) + "\n")
    other = load(tmp_path / "swapped.csv", img_size=8, cache_dir=cache, progress=False)
    assert other.classes == ds.classes and sorted(_files(other)) == sorted(_files(ds))
    # Excel's CSV where the decimal mark is a comma, tabs in a .csv, and a .tsv (tabs, whatever else a row holds)
    for name, sep in (("semicolons.csv", ";"), ("tabs.csv", "\t"), ("list.tsv", "\t")):
        (tmp_path / name).write_text(f"path{sep}label\n" + "\n".join(r.replace(",", sep) for r in rows) + "\n")
        other = load(tmp_path / name, img_size=8, cache_dir=cache, progress=False)
        assert other.classes == ds.classes and _files(other) == _files(ds)
    (tmp_path / "commas.tsv").write_text("path\tlabel\n" + "\n".join(r.replace(",", "\t") + ",x" for r in rows) + "\n")
    other = load(tmp_path / "commas.tsv", img_size=8, cache_dir=cache, progress=False)
    assert [c.removesuffix(",x") for c in other.classes] == ds.classes
    # no header, and a comma in every label ("Smith, John"): still the semicolons' or tabs' list, not a text table
    for name, sep in (("people.csv", ";"), ("people_tabs.csv", "\t")):
        (tmp_path / name).write_text("\n".join(r.replace(",", sep) + ", Jr." for r in rows) + "\n")
        assert detect_kind(tmp_path / name) == "image"
        other = load(tmp_path / name, img_size=8, cache_dir=cache, progress=False)
        assert [c.removesuffix(", Jr.") for c in other.classes] == ds.classes
    # errors name the file's line (blank lines counted); a path listed twice is refused, whatever its labels
    (tmp_path / "short.csv").write_text("path,label\n\n" + rows[0] + "\nimgs/cat/01.png\n")
    with pytest.raises(DataError, match=r"short.csv:4: \['imgs/cat/01.png'\] is not path,label"):
        load(tmp_path / "short.csv", cache_dir=cache, progress=False)
    (tmp_path / "twice.csv").write_text("path,label\n" + "\n".join(rows) + "\n" + rows[0].replace("CAT", "DOG") + "\n")
    with pytest.raises(DataError, match=rf"twice.csv:{len(rows) + 2}: 'imgs/cat/00.png' is listed again .first on line 2."):
        load(tmp_path / "twice.csv", cache_dir=cache, progress=False)


def test_a_csv_path_that_starts_with_a_space(tmp_path, cache):
    """Spaces around a cell are stripped ("a.png, cat"), except where the file is named with them: a folder " lead",
    as Python's csv module writes its path."""
    rows = [(f"{c}/{i}.png", c) for c in (" lead", "tin") for i in range(2)]  # paths relative to the CSV's folder
    for name, _ in rows:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    assert "\n lead/0.png, lead\n" in (tmp_path / "list.csv").read_text().replace("\r", "")
    ds = load(tmp_path / "list.csv", img_size=8, cache_dir=cache, progress=False, test_split=0.5)
    assert ds.classes == ["lead", "tin"] and len(ds.train) + len(ds.test) == 4


def test_a_class_folder_without_images_is_reported_not_dropped_unseen(flat, cache, caplog):
    (flat / "fox").mkdir()
    (flat / "gnu").mkdir()
    (flat / "gnu" / "notes.txt").write_text("no images here")
    (flat / ".thumbnails").mkdir()  # hidden: not a class anyone meant
    warning = "2 folder(s) without images left out, so not classes: fox, gnu"
    # once per load: decoded, read back from the cache, or streamed (a load lists the folder more than once)
    for stream in (None, None, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ds = load(flat, img_size=8, cache_dir=cache, progress=False, stream=stream)
        assert ds.classes == ["cat", "dog", "emu"]
        assert caplog.text.count(warning) == 1, (stream, caplog.text)
    # class folders inside a wrapping folder: the empty one beside them is named, the wrapper is not
    wrapped = make_flat(flat.parent / "outer" / "cat")  # the wrapper named like a class, to be awkward
    (wrapped / "gnu").mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load(flat.parent / "outer", img_size=8, cache_dir=cache, progress=False).classes == ["cat", "dog", "emu"]
    assert "1 folder(s) without images left out, so not classes: gnu" in caplog.text, caplog.text


def test_a_class_whose_drawn_test_image_is_unreadable_is_named(flat, cache, caplog):
    """The test split is drawn from the file list; with --skip-bad-images the one image drawn for a small class
    may be unreadable, and the class then has none in the test set: a warning names it (it was silent)."""
    (flat / "emu" / "01.png").write_bytes(b"not a png")
    seen = set()
    for seed in range(10):  # seeds 0-7 draw 01.png for emu, 8 and 9 draw 00.png
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ds = load(flat, img_size=8, cache_dir=cache, progress=False, skip_bad_images=True, seed=seed)
        none = 2 not in ds.test.labels.tolist()  # emu's label
        assert ("so they have none in the test set: emu" in caplog.text) is none, (seed, caplog.text)
        seen.add(none)
    assert seen == {True, False}  # both draws happened


def test_a_zip_of_the_folder_and_the_folder_are_the_same_source(flat, tmp_path, cache, caplog):
    """Trained on a zip of photos/ (names photos/cat/...), evaluated on the extracted folder (cat/...), or the
    reverse: the same recorded test files, not "none of them" and every image (training ones included) scored."""
    zipped = pack(flat, tmp_path / "photos.zip", "photos")
    for trained, evaluated in ((zipped, flat), (flat, zipped)):
        record = load(trained, img_size=8, cache_dir=cache, progress=False).split_record
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = load(evaluated, img_size=8, progress=False, test_files=record)
        assert len(again.test) == len(record["test_files"]) == 4 and not again.source_changed, caplog.text
        assert holdout.same_split(record, load(evaluated, img_size=8, cache_dir=cache, progress=False).split_record)


def test_recorded_test_files_alone_and_a_changed_folder(flat, cache, caplog):
    (flat / "dog" / "99.png").write_bytes(b"not a png")  # skipped as bad: never in the record
    ds = load(flat, img_size=8, cache_dir=cache, progress=False, skip_bad_images=True)
    record = ds.split_record
    assert ds.skipped == 1 and "dog/99.png" not in record["test_files"] and record["num_files"] == 18
    same = load(flat, img_size=8, progress=False, test_files=record)
    assert not same.source_changed and len(same.train) == 0 and same.classes == ds.classes
    assert torch.equal(same.test.images, ds.test.images) and torch.equal(same.test.labels, ds.test.labels)

    removed = record["test_files"][0]
    (flat / removed).unlink()
    (flat / "emu" / "new.png").write_bytes((flat / "emu" / "00.png").read_bytes())
    (flat / "cat" / "09.png").write_bytes(b"broken, but not a test file")
    with caplog.at_level(logging.WARNING):
        changed = load(flat, img_size=8, progress=False, test_files=record)  # a bad file elsewhere: no matter
    assert changed.source_changed and len(changed.test) == len(ds.test) - 1
    assert "changed since its test split was recorded" in caplog.text and "1 of the 4 test files missing" in caplog.text
    assert torch.equal(changed.test.images, ds.test.images[1:])


def test_other_classes_beside_the_recorded_split_are_named(flat, tmp_path, cache, caplog):
    """Other data that reuses the run's file names (00.png, IMG_0001.jpg) is taken for the run's source, changed: its
    classes the run did not have are named in the warning, not left out without a word. Other data that holds none
    of the test files goes to being scored whole even with fewer classes; a class that looks the same but is written
    in another Unicode form (a folder copied from macOS) is shown as it is written."""
    record = load(flat, img_size=8, cache_dir=cache, progress=False).split_record
    make_flat(flat, counts={"owl": 3})
    with caplog.at_level(logging.WARNING):
        changed = load(flat, img_size=8, progress=False, test_files=record)
    assert changed.source_changed and changed.classes == record["classes"]
    assert "also has classes the run did not: owl" in caplog.text
    with pytest.raises(holdout.OtherSource, match="holds none of the 4 test files"):
        load(make_flat(tmp_path / "new", counts={"cat": 2}), img_size=8, progress=False, test_files=record)
    nfd = dict(record, classes=[unicodedata.normalize("NFD", "café") if c == "cat" else c for c in record["classes"]],
               test_labels=[unicodedata.normalize("NFD", "café") if c == "cat" else c for c in record["test_labels"]])
    shutil.rmtree(flat / "owl")
    (flat / "cat").rename(flat / "café")
    with pytest.raises(DataError, match=r"has no class .* of the run's \(and .* it did not have: renamed\?; names "
                                        r"that differ only in Unicode form .*: 'cafe\\u0301', 'caf\\xe9'\)"):
        load(flat, img_size=8, progress=False, test_files=nfd)


def test_class_difference_names_what_differs():
    assert holdout.class_difference(["a", "b", "c"], ["a", "b", "c", "d"]) == "the data has 'd' the run did not"
    assert holdout.class_difference(["a", "b"], ["b", "a"]) == "class 0 is 'a' in the run, 'b' in the data"
    many = holdout.class_difference([str(i) for i in range(9)], [])
    assert many == "the data lacks '0', '1', '2' and 6 more"
    assert "Unicode form" in holdout.class_difference(["cat "], ["cat"])


def test_recorded_split_of_a_csv_and_of_an_archive(tmp_path, cache):
    make_flat(tmp_path / "imgs")
    rows = [f"imgs/{c}/{i:02d}.png,{c}" for c, n in COUNTS.items() for i in range(n)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")  # no header
    ds = load(tmp_path / "labels.csv", img_size=8, cache_dir=cache, progress=False)
    again = load(tmp_path / "labels.csv", img_size=8, progress=False, test_files=ds.split_record)
    assert not again.source_changed and torch.equal(again.test.images, ds.test.images)
    archive = pack(tmp_path / "imgs", tmp_path / "photos.zip", top="photos")  # one folder around the classes
    zipped = load(archive, img_size=8, cache_dir=cache, progress=False)
    assert zipped.classes == ["cat", "dog", "emu"] and len(zipped.test) == 4
    assert not load(archive, img_size=8, progress=False, test_files=zipped.split_record).source_changed


def test_streamed_flat_folders_draw_the_same_split(flat, cache):
    memory = load(flat, img_size=8, cache_dir=cache, progress=False, stream=False)
    streamed = load(flat, img_size=8, cache_dir=cache, progress=False, stream=True, workers=0)
    assert isinstance(streamed.test, stream.StreamImageSet) and streamed.split_record == memory.split_record
    assert torch.equal(streamed.test.images[torch.arange(len(streamed.test))], memory.test.images)
