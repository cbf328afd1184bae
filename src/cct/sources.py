"""The files of a data source — a folder, or a tar/zip archive read without extracting it — and the
image-folder tree layout found among them.

An archive is read into memory, never written to disk, after every member passed the checks a safe
extraction makes (no absolute or `..` paths, no links or devices, no truncation): one bad member
refuses the whole archive, so a hostile download cannot write outside a folder or point at other files.

A tree is torchvision's ImageFolder layout, one per split: ``root/train/<class>/*``,
``root/test/<class>/*``, optionally ``root/val/<class>/*``, with or without one top-level folder
around it in an archive; class order is the sorted folder names of train/.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path

from .errors import CCTError

SPLITS = ("train", "test", "val")


class DataError(CCTError, ValueError):
    """A data source that cannot be found, read or trusted; the message is one line naming it."""


def default_cache_dir() -> Path:
    """Where CIFAR archives and decoded datasets live: `$CCT_DATA`, else ~/.cache/cct."""
    return Path(os.environ.get("CCT_DATA") or Path.home() / ".cache" / "cct").expanduser()


class Files:
    """The regular files of a folder or an archive, as sorted relative posix `names` and their bytes."""

    def __init__(self, path: Path):
        self.path = path
        self._blobs: dict[str, bytes] | None = None
        if path.is_dir():
            self.kind = "folder"
            self.names = sorted(str(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file())
        elif tarfile.is_tarfile(path):
            self.kind = "tar"
            self._blobs = _read_tar(path)
            self.names = sorted(self._blobs)
        elif zipfile.is_zipfile(path):
            self.kind = "zip"
            self._blobs = _read_zip(path)
            self.names = sorted(self._blobs)
        else:
            raise DataError(f"{path}: not a folder, .tar, .tar.gz or .zip")

    def read(self, name: str) -> bytes:
        return self._blobs[name] if self._blobs is not None else (self.path / name).read_bytes()

    def handle(self, name: str) -> bytes | str:
        """What a decoding worker needs: the bytes, or for a folder the path (workers read it)."""
        return self._blobs[name] if self._blobs is not None else str(self.path / name)


def _unsafe_name(name: str) -> bool:
    name = name.replace("\\", "/")
    parts = posixpath.normpath(name).split("/")
    return name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts


def _read_tar(path: Path) -> dict[str, bytes]:
    try:
        blobs = {}
        with tarfile.open(path) as tf:
            for m in tf:  # one streaming pass; nothing is written, so refusing midway leaves no trace
                if _unsafe_name(m.name):
                    raise DataError(f"{path}: refused, member {m.name!r} would land outside the extraction folder")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{path}: refused, member {m.name!r} is a link or special file")
                if m.isfile():
                    blobs[posixpath.normpath(m.name)] = tf.extractfile(m).read()
            tf.fileobj.seek(tf.offset)  # tarfile ends quietly at a cut header: only zero blocks may follow
            if tf.fileobj.read(1 << 16).strip(b"\0"):
                raise DataError(f"{path}: cannot read archive (truncated or corrupt after {len(blobs)} files)")
        return blobs
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read archive ({e})") from None


def _read_zip(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                if _unsafe_name(info.filename):
                    raise DataError(f"{path}: refused, member {info.filename!r} would land outside the "
                                    "extraction folder")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"{path}: refused, member {info.filename!r} is a link")
            return {posixpath.normpath(i.filename): zf.read(i) for i in infos if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: cannot read archive ({e})") from None


def fingerprint(path: Path) -> str:
    """The content key of a source: the bytes of a file, or names, sizes and mtimes of a folder's files."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Image-folder trees


def _tree_entries(files: Files) -> dict[str, list[tuple[str, str]]]:
    """{split: [(class, name), ...]} of `<prefix>/<split>/<class>/...` files; the prefix is the one
    closest to the root, so an archive may or may not wrap the tree in a top-level folder."""
    names = [n for n in files.names if not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/"))]
    prefixes = {"/".join(parts[:i]) for parts in (n.split("/") for n in names)
                for i in range(len(parts) - 2) if parts[i] == "train"}
    if not prefixes:
        raise DataError(f"{files.path}: no train/<class>/<image> files (expected root/train/<class>/*, "
                        f"root/test/<class>/*, optional root/val/<class>/*)")
    prefix = min(prefixes, key=lambda p: (p.count("/") + bool(p), p))
    entries: dict[str, list[tuple[str, str]]] = {}
    for n in names:
        rel = n[len(prefix) + 1:] if prefix else n
        if prefix and not n.startswith(prefix + "/"):
            continue
        parts = rel.split("/")
        if len(parts) >= 3 and parts[0] in SPLITS:
            entries.setdefault(parts[0], []).append((parts[1], n))
    return entries


def tree_items(files: Files) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """The classes (sorted folder names of train/) and {split: [(label, name), ...]} of a tree, each
    split in (class, name) order; a class of test/ or val/ missing from train/ is an error."""
    entries = _tree_entries(files)
    classes = sorted({c for c, _ in entries.get("train", [])})
    index = {c: i for i, c in enumerate(classes)}
    items = {}
    for split in SPLITS:
        pairs = sorted(entries.get(split, []))
        unknown = sorted({c for c, _ in pairs} - set(index))
        if unknown:
            raise DataError(f"{files.path}: {split}/{unknown[0]} is not a class of train/ ({len(classes)} classes)")
        if pairs:
            items[split] = [(index[c], n) for c, n in pairs]
    return classes, items
