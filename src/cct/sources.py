"""The files of a data source — a folder, or a tar/zip archive read without extracting it — and the
image-folder tree layout found among them.

An archive is read into memory, never written to disk, after every member passed the checks a safe
extraction makes (no absolute or `..` paths, no links or devices, no truncation): one bad member
refuses the whole archive, so a hostile download cannot write outside a folder or point at other files.

Three layouts name the images and their classes, each with the sorted class names as class order:
- a tree, torchvision's ImageFolder layout once per split: ``root/train/<class>/*``,
  ``root/test/<class>/*``, optionally ``root/val/<class>/*`` (split names in any case, ``valid`` for
  val), with or without a top-level folder around it (`tree_items`); only split folders hold images
  there, so class folders one of which is named train are flat classes;
- flat class folders, ``root/<class>/*`` (ImageFolder, Keras' ``image_dataset_from_directory``),
  taken when there is no train/ folder (`flat_items`); files are images by their extension;
- a CSV of ``path,label`` rows, paths relative to the CSV (Kaggle's usual layout), optionally with a
  header row (`csv_items`).
Flat folders and CSVs have no test split of their own: `cct.holdout` draws and records one.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

from .errors import CCTError
from .tables import table_delimiter

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "val")
# what Pillow reads and people store photos as (torchvision's IMG_EXTENSIONS, plus a few)
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".jpe", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".gif",
                              ".tif", ".tiff", ".webp", ".jfif"))


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class DataError(CCTError, ValueError):
    """A data source that cannot be found, read or trusted; the message is one line naming it."""


def default_cache_dir() -> Path:
    """Where CIFAR archives and decoded datasets live: `$CCT_DATA`, else ~/.cache/cct."""
    return Path(os.environ.get("CCT_DATA") or Path.home() / ".cache" / "cct").expanduser()


def folder_files(root: Path) -> list[Path]:
    """The regular files below `root`, through symlinked folders too (a class folder that links to photos
    kept elsewhere, which `Path.rglob` skips before Python 3.13); a link back to a folder it sits in
    (a cycle) is not entered, and a folder reached twice (a class linked to a sibling) is read twice, with a warning."""
    found, real_of, first = [], {}, {}

    def unreadable(e: OSError) -> None:  # os.walk skips a folder it cannot list: its images would vanish unsaid
        raise DataError(f"cannot read folder {e.filename}: {e.strerror or e}")

    for folder, subfolders, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = real_of[folder] = os.path.realpath(folder)
        ancestors, parent = set(), os.path.dirname(folder)
        while parent in real_of:
            ancestors.add(real_of[parent])
            parent = os.path.dirname(parent)
        if real in ancestors:
            subfolders.clear()
            continue
        if real in first and files:
            one, other = sorted(os.path.relpath(f, root) for f in (folder, first[real]))
            _warn_once(f"{os.path.realpath(root)}\0{real}", "%s and %s are the same folder (a link): its %d file(s) "
                       "are read under both names, so they count twice", one, other, len(files))
        first.setdefault(real, folder)
        found.extend(p for p in (Path(folder) / name for name in files) if p.is_file())
    return found


class Files:
    """The regular files of a folder or an archive, as sorted relative posix `names` and their bytes."""

    def __init__(self, path: Path, names: list[str] | None = None):
        """`names`: the files of folder `path` when already known (a CSV's rows), so it is not listed."""
        self.path = path
        self._blobs: dict[str, bytes] | None = None
        if names is not None:
            self.kind, self.names = "folder", sorted(names)
        elif path.is_dir():
            self.kind = "folder"
            self.names = sorted(p.relative_to(path).as_posix() for p in folder_files(path))
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
                if _unsafe_name(_zip_name(info)):
                    raise DataError(f"{path}: refused, member {info.filename!r} would land outside the "
                                    "extraction folder")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"{path}: refused, member {info.filename!r} is a link")
            return {posixpath.normpath(_zip_name(i)): zf.read(i) for i in infos if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: cannot read archive ({e})") from None


def _zip_name(info: zipfile.ZipInfo) -> str:
    """A member's name as its creator wrote it: Info-ZIP's `zip` (Linux's, and so most scripts') stores UTF-8 bytes
    without the UTF-8 flag, which Python then reads as cp437 ("café" as "caf├⌐"), so such bytes that are valid UTF-8
    are read as UTF-8, as `unzip` and the desktop tools do."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:  # a real cp437 name (an old DOS archive)
        return info.filename


def fingerprint(path: Path) -> str:
    """The content key of a source: the bytes of a file, or the names, sizes, times and inodes of a folder's files
    (the change time and inode too: `mv` and `cp -p` keep a file's mtime, so swapping two files would keep it)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(folder_files(path)):
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\t"
                     f"{st.st_ino}\n".encode("utf-8", "surrogateescape"))
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Image-folder trees


def _visible(names: list[str]) -> list[str]:
    return [n for n in names if not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/"))]


def split_name(folder: str) -> str | None:
    """The split a tree's folder name means, in any case: train, test, or val (also "valid", Roboflow's)."""
    name = folder.lower()
    return "val" if name == "valid" else name if name in SPLITS else None


def _tree_prefixes(names: list[str]) -> set[str]:
    """The folders (relative, "" for the root) that hold a train/ folder of class folders of images, beside another
    split folder or only split folders: `root/train/<class>/*` is a tree, and so is `root/{train,test,docs}/...`,
    but `root/{bus,car,train}/*` are three flat classes, one of them named train."""
    children: dict[str, set[str]] = {}
    for parts in (n.split("/") for n in names if is_image_name(n)):
        for i in range(len(parts) - 2):
            children.setdefault("/".join(parts[:i]), set()).add(parts[i])
    trees = set()
    for prefix, folders in children.items():
        splits = [split_name(f) for f in folders]
        if "train" in splits and (all(splits) or len(set(splits) - {None}) >= 2):
            trees.add(prefix)
    return trees


def is_tree(files: Files) -> bool:
    """Whether the files hold a train/<class>/<image> tree (else they are read as flat class folders)."""
    return bool(_tree_prefixes(_visible(files.names)))


def _tree_entries(files: Files) -> dict[str, list[tuple[str, str]]]:
    """{split: [(class, name), ...]} of `<prefix>/<split>/<class>/...` files; the prefix is the one
    closest to the root, so an archive may or may not wrap the tree in a top-level folder."""
    names = _visible(files.names)
    prefixes = _tree_prefixes(names)
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
        if len(parts) >= 3 and split_name(parts[0]) and is_image_name(n):
            entries.setdefault(split_name(parts[0]), []).append((parts[1], n))
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


# ---------------------------------------------------------------------------------------------------
# Flat class folders and CSVs: (class names, [(label, name), ...]) in (class, name) order


def _labelled(pairs: list[tuple[str, str]], where: str, min_per_class: int) -> tuple[list[str], list[tuple[int, str]]]:
    """Sorted class names and [(label, name)] of (class, name) pairs; every class needs `min_per_class`
    images (2 to draw a test split: one to train, one to test)."""
    if not pairs:
        raise DataError(f"{where}: no images found")
    counts: dict[str, int] = {}
    for c, _ in pairs:
        counts[c] = counts.get(c, 0) + 1
    small = sorted(c for c, n in counts.items() if n < min_per_class)
    if small:
        raise DataError(f"{where}: class {small[0]!r} has {counts[small[0]]} image(s), at least {min_per_class} are "
                        f"needed (one to train, one to test; --test-split 0 needs one)"
                        f"{f'; {len(small) - 1} more such classes' if len(small) > 1 else ''}")
    if len(counts) < 2 and min_per_class > 0:  # to train on: a wrapping folder or a folder of images, not classes
        raise DataError(f"{where}: one class only ({next(iter(counts))!r}); a classifier needs two or more: class "
                        "folders root/<class>/*, or a CSV of path,label rows as --data")
    classes = sorted(counts)
    index = {c: i for i, c in enumerate(classes)}
    return classes, [(index[c], n) for c, n in sorted(pairs)]


def flat_items(files: Files, *, min_per_class: int = 2) -> tuple[list[str], list[tuple[int, str]]]:
    """Class names and [(label, name)] of flat class folders, ``root/<class>/**/<image>``: the class
    is the first folder below the root; files outside a class folder or without an image extension
    are ignored. A folder or archive holding one folder around the class folders is looked into."""
    names = [n for n in _visible(files.names) if is_image_name(n)]
    prefix = ""
    while names and all(n.startswith(prefix) for n in names):
        tops = {n[len(prefix):].split("/")[0] for n in names}
        if len(tops) != 1 or not all(n[len(prefix):].count("/") >= 2 for n in names):
            break
        prefix += tops.pop() + "/"
    pairs = [(n[len(prefix):].split("/")[0], n) for n in names if n[len(prefix):].count("/") >= 1]
    if not pairs:
        raise DataError(f"{files.path}: no image files in class folders (expected root/<class>/<image>, or "
                        f"root/train/<class>/* and root/test/<class>/*)")
    return _labelled(pairs, str(files.path), min_per_class)


def class_root(classes: list[str], items: list[tuple[int, str]]) -> str:
    """Where a flat source's class folders are, relative to it: "" for the source itself, or the folder wrapping
    them, e.g. "photos" in a zip of a photos/ folder (the one prefix every class's files agree on, should the
    wrapper be named like a class)."""
    roots = None
    for label, name in {int(label): name for label, name in items}.items():  # one file a class
        parts = name.split("/")
        found = {"/".join(parts[:i]) for i, part in enumerate(parts[:-1]) if part == classes[label]}
        roots = found if roots is None else roots & found
    return min(roots or {""}, key=len)


def from_root(name: str, root: str) -> str:
    """A file's name below the class root (`class_root`): the same for a folder and for an archive of it."""
    return name[len(root) + 1:] if root and name.startswith(root + "/") else name


def warn_empty_classes(path: Path, classes: list[str], items: list[tuple[int, str]]) -> None:
    """Say which folders beside a flat source's class folders hold no image, so are no class (rather than drop them
    unseen); a load calls it once, whether it decoded the folder or read it from the cache."""
    if not path.is_dir():
        return
    root = path / class_root(classes, items)
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in classes
                   and not d.name.startswith((".", "__")) and not split_name(d.name))  # train/ of a tree
    if empty:
        log.warning("%s: %d folder(s) without images left out, so not classes: %s", path, len(empty),
                    ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))


def is_csv(path: Path) -> bool:
    """Whether `path` is a table of image paths and labels, comma- (or semicolon-) or tab-separated."""
    return path.suffix.lower() in (".csv", ".tsv") and path.is_file()


def image_table_delimiter(path: Path, text: str) -> str | None:
    """The delimiter under which a table is the own-data `path,label` (or `label,path`) layout, or None (a text
    table): one of its first two columns names image files in at least half of its first rows, past a header if any
    (a text that mentions a file name is still text; an image list with a stray row is still one, and its loader
    names the row). `table_delimiter`'s pick is tried first, then the others, so a `;`- or tab-separated list whose
    labels or paths hold commas ("Smith, John") is still read by its own delimiter."""
    first = table_delimiter(path, text)
    others = [] if path.suffix.lower() == ".tsv" else [",", ";", "\t"]
    for delimiter in dict.fromkeys([first, *others]):
        try:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            head = [[cell.strip() for cell in row[:2]] for _, row in zip(range(6), reader) if any(map(str.strip, row))]
        except csv.Error:
            continue
        if delimiter != first and any(len(row) < 2 for row in head):  # another delimiter must split every row
            continue
        for col, names in ((0, is_image_name), (1, _path_like)):  # a label first: its path must look like one
            cells = [row[col] if len(row) > col else "" for row in head]
            cells = cells[1:] if cells and not names(cells[0]) else cells  # past a header
            if cells and 2 * sum(map(names, cells)) >= len(cells):
                return delimiter
    return None


def _path_like(cell: str) -> bool:
    """An image file's name as a second column holds one: no spaces, or a folder in it ("what is in cat.jpg" is a
    question)."""
    return is_image_name(cell) and (" " not in cell or "/" in cell)


def csv_items(path: Path, *, min_per_class: int = 2) -> tuple[Files, list[str], list[tuple[int, str]]]:
    """The files (relative to the CSV's folder), class names and [(label, name)] of a CSV of
    ``path,label`` (or ``label,path``) rows naming image files, separated by commas, semicolons or tabs; a first row
    whose path is not an image name is a header. Errors name the file's line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read CSV ({getattr(e, 'strerror', None) or e})") from None
    delimiter = image_table_delimiter(path, text) or table_delimiter(path, text)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    rows = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]
    # the path column: the one naming image files in more of the first rows (header or not)
    votes = [sum(len(r) > col and is_image_name(r[col].strip()) for _, r in rows[:6]) for col in (0, 1)]
    path_col = 1 if votes[1] > votes[0] else 0
    if rows and not (len(rows[0][1]) > path_col and is_image_name(rows[0][1][path_col].strip())):
        rows = rows[1:]  # a header, e.g. path,label
    pairs, seen = [], {}
    for line, row in rows:
        if len(row) < 2 or not row[1 - path_col].strip():
            raise DataError(f"{path}:{line}: {row!r} is not {'label,path' if path_col else 'path,label'}")
        cell = row[path_col].replace("\\", "/")
        name = posixpath.normpath(cell.strip())  # "a.png, cat": the space after a comma is no part of a name
        if cell != cell.strip() and (path.parent / posixpath.normpath(cell)).is_file():
            name = posixpath.normpath(cell)  # unless the file is named with it (a folder " lead", written by csv)
        if not is_image_name(name):
            raise DataError(f"{path}:{line}: {name!r} is not an image file (expected rows of image path,label)")
        if name in seen:  # twice in one split, or in two classes: which label, and which split, is a guess
            raise DataError(f"{path}:{line}: {name!r} is listed again (first on line {seen[name]})")
        seen[name] = line
        pairs.append((row[1 - path_col].strip(), name))
    classes, items = _labelled(pairs, str(path), min_per_class)
    return Files(path.parent, [n for _, n in items]), classes, items


def list_fingerprint(classes: list[str], items: list[tuple[int, str]]) -> str:
    """A key of which files a layout names and their classes (not their content): what a recorded
    test split depends on."""
    h = hashlib.sha256()
    for label, name in sorted(items, key=lambda x: x[1]):
        h.update(f"{classes[label]}\t{name}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def warn_unread_images(files: Files) -> None:
    """A warning for files Pillow could open whose extension is not one of IMAGE_EXTENSIONS (.tga, .ico, .avif, ...):
    left out of the data, which would otherwise pass without a word."""
    if str(files.path) in _WARNED:  # before the scan: its result is known
        return
    readable = _pillow_only_extensions()
    left = [n for n in _visible(files.names) if posixpath.splitext(n)[1].lower() in readable]
    if left:
        kinds = sorted({posixpath.splitext(n)[1].lower() for n in left})
        _warn_once(str(files.path), "%s: %d file(s) of %s left out, first %s: cct reads .jpg, .png, .bmp, .gif, .tif, "
                   ".webp and the like; convert them (or rename them: Pillow tells formats by content) to use them",
                   files.path, len(left), ", ".join(kinds), left[0])


_WARNED: set[str] = set()  # warnings given in this process, by key (a run lists its source more than once)


def _warn_once(key: str, message: str, *args) -> None:
    """`log.warning(message, *args)`, unless this process gave the warning of `key` already."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


@functools.cache
def _pillow_only_extensions() -> frozenset[str]:
    """Extensions of the formats Pillow opens that are not IMAGE_EXTENSIONS."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN) - IMAGE_EXTENSIONS


def layout(path: Path, files: Files | None = None, *, min_per_class: int = 2):
    """(files, classes, items, flat) of a source: {split: [(label, name)]} of a tree (flat False), or
    {"train": every image} of flat class folders, a CSV or a tree of train/ alone (flat True: the test split is
    still to draw)."""
    if is_csv(path):
        files, classes, items = csv_items(path, min_per_class=min_per_class)
        return files, classes, {"train": items}, True
    files = files or Files(path)
    warn_unread_images(files)
    if is_tree(files):
        classes, split_items = tree_items(files)
        _warn_unlabelled(files, split_items)
        if set(split_items) == {"train"}:  # train/ alone: a test split is drawn from it, as from class folders
            _labelled([(classes[label], n) for label, n in split_items["train"]], str(files.path), min_per_class)
            return files, classes, split_items, True
        return files, classes, split_items, False
    classes, items = flat_items(files, min_per_class=min_per_class)
    _warn_unlabelled(files, {"train": items})
    return files, classes, {"train": items}, True


def _warn_unlabelled(files: Files, items: dict[str, list[tuple[int, str]]]) -> None:
    """A warning for images outside every class folder (a preview beside them, Kaggle's unlabelled test/*.jpg): they
    have no label, so the layout leaves them out, which would otherwise pass without a word."""
    used = {name for split in items.values() for _, name in split}
    left = [n for n in _visible(files.names) if is_image_name(n) and n not in used]
    if left:
        _warn_once(f"{files.path}\0unlabelled", "%s: %d image(s) outside the class folders left out (no label to "
                   "learn), first %s", files.path, len(left), left[0])


def content_key(path: Path) -> str:
    """`fingerprint` of a source; for a CSV, of its bytes and the names, sizes, times and inodes of its images."""
    if not is_csv(path):
        return fingerprint(path)
    files, _, _ = csv_items(path, min_per_class=0)
    h = hashlib.sha256(fingerprint(path).encode())
    for name in files.names:
        try:
            st = (files.path / name).stat()
            h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\t{st.st_ino}\n"
                     .encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{name}\tmissing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
