"""The held-out test split of sources that have none of their own — flat class folders and CSVs.

A seeded, stratified fraction of each class's images is set aside for testing (at least one image
per class, and at least one left for training), before anything is decoded, so the choice depends
only on the file list, the seed and the fraction. The choice is recorded as plain data — the seed,
the fraction, the class names, the test files (relative to the source's root, without the ones
skipped as unreadable) with their classes, and a fingerprint of the file list — so that a run can
store it and `cct eval` can later decode exactly those files (`cct.data.load(..., test_files=record)`).
`check` tells whether the source's file list changed since.
"""
from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import numpy as np

from .decode import decode_images, uniform_images
from .sources import DataError, class_root, from_root, layout, list_fingerprint

log = logging.getLogger(__name__)

RECORD_VERSION = 1


class OtherSource(DataError):
    """The source given is not the one a recorded test split was drawn from (`decode_recorded`)."""


def choose_test(items: list[tuple[int, str]], num_classes: int, *, fraction: float,
                seed: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(train, test) items of (label, name) in (class, name) order: round(fraction × n) random test
    images of each class of n images, clamped to [1, n - 1]; all training when `fraction` is 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--test-split must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(items), []
    rng = np.random.RandomState(seed)  # the legacy generator: its streams never change across numpy versions
    by_class: list[list[tuple[int, str]]] = [[] for _ in range(num_classes)]
    for item in sorted(items, key=lambda x: (x[0], x[1])):
        by_class[item[0]].append(item)
    train, test = [], []
    for members in by_class:
        n = len(members)
        k = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
        picked = set(rng.permutation(n)[:k].tolist())
        for i, item in enumerate(members):
            (test if i in picked else train).append(item)
    return train, test


def make_record(*, seed: int, fraction: float, classes: list[str], items: list[tuple[int, str]],
                test: list[tuple[int, str]], skipped: set[str]) -> dict:
    """The record of a drawn test split (JSON-ready); `items` is every file of the source."""
    kept = [(label, name) for label, name in test if name not in skipped]
    return {"version": RECORD_VERSION, "seed": int(seed), "fraction": float(fraction), "classes": list(classes),
            "test_files": [name for _, name in kept], "test_labels": [classes[label] for label, _ in kept],
            "num_files": len(items), "fingerprint": list_fingerprint(classes, items)}


def same_split(a: dict, b: dict) -> bool:
    """Whether two records drew the same test split from the same files, be the source a folder or an archive of
    it: the fingerprint, else the file count and the test files below their class root."""
    if a.get("fingerprint") == b.get("fingerprint"):
        return True

    def tests(r: dict) -> list[str]:
        root = _record_root(r)
        return sorted(from_root(n, root) for n in r["test_files"])
    return a.get("num_files") == b.get("num_files") and a.get("classes") == b.get("classes") and tests(a) == tests(b)


def _record_root(record: dict) -> str:
    """`cct.sources.class_root` of the files a record names: "photos" for a split drawn from a zip of photos/."""
    index = {c: i for i, c in enumerate(record["classes"])}
    return class_root(record["classes"], [(index[c], n) for n, c in zip(record["test_files"], record["test_labels"])])


def _few(names) -> str:
    """Up to three class names for a message, and how many more."""
    names = list(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _look_alike(run: list[str], data: list[str]) -> str:
    """A hint where a class of the run and one of the data differ only in ways a message cannot show."""
    def plain(name):
        return unicodedata.normalize("NFC", name).strip()
    missing, extra = set(run) - set(data), set(data) - set(run)
    both = {plain(n) for n in missing} & {plain(n) for n in extra}
    alike = sorted(n for n in missing | extra if plain(n) in both)
    if alike:
        return ("; names that differ only in Unicode form (macOS folders write é as e + ´) or in spaces at their "
                "ends: " + ", ".join(map(ascii, alike[:4])))
    return ""


def class_difference(run: list[str], data: list[str]) -> str:
    """What tells the data's classes from a run's, for an error: the classes one has and the other lacks, else the
    first place their orders part."""
    in_run, in_data = set(run), set(data)
    missing, extra = [c for c in run if c not in in_data], [c for c in data if c not in in_run]
    if not missing and not extra:
        i = next(i for i, (a, b) in enumerate(zip(run, data)) if a != b)
        return f"class {i} is {run[i]!r} in the run, {data[i]!r} in the data"
    lacks = f"the data lacks {_few(map(repr, missing))}" if missing else ""
    has = f"the data has {_few(map(repr, extra))} the run did not" if extra else ""
    return "; ".join(filter(None, (lacks, has))) + _look_alike(run, data)


def check(record: dict, classes: list[str], items: list[tuple[int, str]], where: str) -> tuple[bool, str | None]:
    """(changed, message): whether the source's file list differs from the one the record was drawn from."""
    for key in ("test_files", "test_labels", "classes", "fingerprint"):
        if key not in record:
            raise DataError(f"not a recorded test split (no {key!r}); expected the split_record of a run")
    if list_fingerprint(classes, items) == record["fingerprint"]:
        return False, None
    present = {name for _, name in items}
    missing = sum(name not in present for name in record["test_files"])
    return True, (f"{where} changed since its test split was recorded ({record.get('num_files', '?')} files "
                  f"then, {len(items)} now; {missing} of the {len(record['test_files'])} test files missing): "
                  f"evaluating the recorded test files that remain")


def decode_recorded(path: Path, record: dict, *, size: tuple[int, int] | None, in_chans: int | None, skip_bad: bool,
                    progress: bool, resize_mode: str) -> tuple[np.ndarray, np.ndarray, int, bool, Path]:
    """(uint8 images (N, C, H, W), int64 labels, images skipped, changed, root) of only the recorded test
    files of a flat folder or CSV, labelled as recorded. A changed source is a warning (and `changed`);
    the recorded files that remain are decoded, and no other file is read."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data source {path} not found")
    files, classes, items, flat = layout(path.resolve(), min_per_class=0)
    if not flat:
        raise OtherSource(f"{path} has test images of its own (train/ and test/ folders), so it is not the flat "
                          "source the run held its test split out of")
    if not record["test_files"]:
        raise DataError(f"the run held no test images out of {path} (--test-split 0): evaluate it on other data, or "
                        "give --split train to score the images it trained on")
    # names below the class folders' root, so that a folder and a zip of it (photos/cat/1.png) match
    index = {c: i for i, c in enumerate(record["classes"])}
    then, now = _record_root(record), class_root(classes, items["train"])
    present = {from_root(n, now): n for _, n in items["train"]}
    pairs = [(present[from_root(n, then)], index[c]) for n, c in zip(record["test_files"], record["test_labels"])
             if from_root(n, then) in present]
    if not pairs:  # before the classes: other data, which is scored as a whole, may hold fewer of them
        raise OtherSource(f"{path} holds none of the {len(record['test_files'])} test files the run held out, so it "
                          "is another source than the one it trained on")
    gone, new = _few(c for c in record["classes"] if c not in classes), _few(c for c in classes if c not in index)
    if gone:
        raise DataError(f"{path} has no class {gone} of the run's" + (f" (and {new} it did not have: renamed?"
                        f"{_look_alike(record['classes'], classes)})" if new else "")
                        + ": its recorded test split cannot be scored")
    as_then = [(label, "/".join(filter(None, (then, from_root(n, now))))) for label, n in items["train"]]
    changed, message = check(record, classes, as_then, str(path))
    if changed:  # classes it did not have: perhaps other data that reuses the file names (img0.png, IMG_0001.jpg)
        log.warning("%s%s", message, f"; {path} also has classes the run did not: {new}" if new else "")
    arrays = decode_images([files.handle(n) for n, _ in pairs], size=size, channels=in_chans, progress=progress,
                           resize_mode=resize_mode)
    good, bad = [], []
    for (name, label), a in zip(pairs, arrays):
        if isinstance(a, str):
            if not skip_bad:
                raise DataError(f"cannot read image {files.path}/{name}: {a} (--skip-bad-images to skip it)")
            bad.append(name)
        else:
            good.append((label, a))
    if not good:
        raise DataError(f"{path}: no recorded test file is readable")
    good = uniform_images(good, size, in_chans, files.path, resize_mode)
    labels = np.array([label for label, _ in good], dtype=np.int64)
    return np.stack([a for _, a in good]), labels, len(bad), changed, files.path
