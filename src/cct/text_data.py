"""Text classification datasets read into memory: texts, integer labels and class names.

Sources accepted by `load_text` (and told from image sources by `cct.kinds.detect_kind`):
- TREC (Li & Roth, 2002) in its original `COARSE:fine question` format: a folder holding
  `train_5500.label` and `TREC_10.label`, or one `.label` file; coarse labels by default, named as written (ABBR, DESC, ...),
  or `label_level="fine"` (`COARSE:fine` names, as "other" occurs under several coarse classes);
- CSV/TSV with a label column and one or more text columns (joined by a space): a file, or a folder with
  `train.csv` and `test.csv` (or `.tsv`). A first row naming a `label` or a `text` column (in any case), or
  both in other words (`LABEL_NAMES`, `TEXT_NAMES`), is a header: the label column is then `label` (else the
  first one a label name calls) and the text column `text` (else those text names call, else every other); without
  one, the first column is the label and the rest the text: AG News's layout (`"class index","title",
  "description"`);
- JSON Lines with `text` and `label` fields (else fields those names call in other words, as a table header's):
  a `.jsonl`, `.ndjson` or `.json` file (a `.json` may also hold one array of objects), or a folder with
  `train.jsonl`/`test.jsonl` (or `.ndjson`, `.json`);
- folders of `.txt` files (any case, or files without an extension), one text each, sub-folders included:
  `root/train/<class>/*.txt`, `root/test/<class>/*.txt` (the IMDb / scikit-learn `load_files` layout).

Classes come from the training split, sorted (numerically when every label is an integer); a test label
not seen in training is an error. Bad input is a one-line `CCTError` naming the file and line.

A source without a test set (one file, or a folder without the test file) gets one from `hold_out_test`:
a seeded, stratified fraction of each class's training texts, as `cct.holdout` draws for image folders,
recorded so that `cct eval` holds out the same texts again (`recorded_test`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from .errors import CCTError
from .holdout import choose_test
from .tables import check_unclosed_quotes, lines_of, table_delimiter

TREC_FILES = ("train_5500.label", "TREC_10.label")
LABEL_LEVELS = ("coarse", "fine")
TABLE_SUFFIXES = (".csv", ".tsv")  # delimiters: `table_delimiter`
# header names, in any case, of a label column and of text columns (SMS Spam's Category/Message, IMDb's review/
# sentiment, AG News's Class Index/Title/Description); `label` and `text` themselves come first
LABEL_NAMES = frozenset({"label", "labels", "class", "class index", "class_index", "category", "sentiment", "target",
                         "intent", "topic"})
TEXT_NAMES = frozenset({"text", "sentence", "review", "message", "content", "question", "comment", "tweet", "body",
                        "document", "title", "description", "headline"})
MAX_FIELD_CHARS = 131_072  # Python's csv default; a longer field is more likely a broken quote than a text


@dataclass
class TextDataset:
    train_texts: list[str]
    train_labels: torch.Tensor  # (N,) int64
    test_texts: list[str] | None
    test_labels: torch.Tensor | None
    classes: list[str]
    source: str  # human-readable description of what was loaded
    skipped: list[str] = field(default_factory=list)  # "file:line: why", lines left out
    reported: list[str] = field(default_factory=list)  # "file:line: what", odd lines kept
    # TREC with coarse labels: each training text's fine label (an index into `fine_classes`; -1 where malformed),
    # for the text recipe's second head (`--fine-aux`)
    train_fine: torch.Tensor | None = None
    fine_classes: list[str] | None = None

    def __post_init__(self):
        assert self.train_labels.dtype == torch.int64 and len(self.train_labels) == len(self.train_texts)
        assert (self.test_texts is None) == (self.test_labels is None)
        assert self.test_texts is None or len(self.test_labels) == len(self.test_texts)
        assert (self.train_fine is None) == (self.fine_classes is None)
        assert self.train_fine is None or (self.train_fine.dtype == torch.int64 and
                                           len(self.train_fine) == len(self.train_texts))

    @property
    def fine_parent(self) -> list[int] | None:
        """Each fine class's coarse class, an index into `classes` (TREC writes its fine labels COARSE:fine)."""
        return None if self.fine_classes is None else [self.classes.index(n.split(":")[0]) for n in self.fine_classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# (text, label name, "file:line") of one example, before labels become integers
_Row = tuple[str, str, str]


def _decode(path: Path) -> str:
    """A file's text (UTF-8, an optional BOM dropped); undecodable bytes are an error naming their line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CCTError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CCTError(f"{path}:{line}: undecodable bytes (the file must be UTF-8 text)") from None


def _label_order(names: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))  # "1" before "01", whatever order the set iterates in
    return sorted(names)


def _dataset(train: list[_Row], test: list[_Row] | None, source: str, *, skipped: list[str] | None = None,
             reported: list[str] | None = None) -> TextDataset:
    if not train:
        raise CCTError(f"{source}: no training examples")
    counts = Counter(label for _, label, _ in train)
    classes = _label_order(set(counts))
    if len(classes) == 1:
        raise CCTError(f"{source}: one class only ({classes[0]!r}); a classifier needs two or more")
    index = {name: i for i, name in enumerate(classes)}
    for _, label, where in test or []:
        if label not in index:
            raise CCTError(f"{where}: unknown label {label!r} (not in the training data)")

    def labels(rows: list[_Row]) -> torch.Tensor:
        return torch.tensor([index[label] for _, label, _ in rows], dtype=torch.int64)

    return TextDataset([t for t, _, _ in train], labels(train), None if test is None else [t for t, _, _ in test],
                       None if test is None else labels(test), classes, source, skipped or [], reported or [])


def _text(value: str, where: str) -> str:
    text = " ".join(value.split())  # one line of single spaces, as the tokenizer will split it anyway
    if not text:
        raise CCTError(f"{where}: empty text")
    return text


# ---------------------------------------------------------------------- TREC
def read_trec(folder: str | Path, *, label_level: str = "coarse") -> TextDataset:
    """TREC question classification from `folder/train_5500.label` and `folder/TREC_10.label`, or from one
    `.label` file of that format (training texts only: `cct train` then holds out a test split).

    A line whose fine label is malformed (not lower-case letters, as `NUM:How` on line 4451 of the
    shared train file) is reported and kept for coarse labels, skipped for fine ones.
    """
    assert label_level in LABEL_LEVELS, f"label_level must be one of {LABEL_LEVELS}, got {label_level!r}"
    folder = Path(folder)
    files = [folder] if folder.is_file() else [folder / TREC_FILES[0]] + \
        [folder / name for name in TREC_FILES[1:] if (folder / name).is_file()]  # no test file: one is held out
    skipped: list[str] = []
    reported: list[str] = []
    splits, fine_names = [], []  # fine_names: the training file's fine labels (None: malformed)
    for path in files:
        rows = []
        for number, line in enumerate(lines_of(_decode(path)), start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            label, _, question = line.partition(" ")
            coarse, colon, fine = label.partition(":")
            if not colon or not re.fullmatch(r"[A-Z]+", coarse):
                raise CCTError(f"{where}: expected 'COARSE:fine question', got {line[:40]!r}")
            text = _text(question, where)
            if not re.fullmatch(r"[a-z]+", fine):
                if label_level == "fine":
                    skipped.append(f"{where}: malformed fine label {label!r}, skipped for fine labels")
                    continue
                reported.append(f"{where}: malformed fine label {label!r}, kept for its coarse label {coarse}")
            rows.append((text, coarse if label_level == "coarse" else label, where))
            if not splits:
                fine_names.append(label if re.fullmatch(r"[a-z]+", fine) else None)
        splits.append(rows)
    ds = _dataset(splits[0], splits[1] if len(splits) > 1 else None, f"TREC {folder} ({label_level} labels)",
                  skipped=skipped, reported=reported)
    if label_level != "coarse":
        return ds
    fine_classes = sorted({name for name in fine_names if name is not None})
    index = {name: i for i, name in enumerate(fine_classes)}
    return replace(ds, train_fine=torch.tensor([index.get(name, -1) for name in fine_names], dtype=torch.int64),
                   fine_classes=fine_classes)


# ---------------------------------------------------------------------- CSV / TSV
def _column(names: list[str], wanted: str | int, where: str) -> int:
    """The index of column `wanted`: an index, or a header name matched without regard to case."""
    if isinstance(wanted, int):
        if not 0 <= wanted < len(names):
            raise CCTError(f"{where}: no column {wanted} ({len(names)} columns)")
        return wanted
    keys = [name.strip().lower() for name in names]
    if wanted.lower() not in keys:
        raise CCTError(f"{where}: missing column {wanted!r} (columns: {', '.join(names)})")
    return keys.index(wanted.lower())


def _label_field(keys: list[str]) -> int | None:
    """Which of a header's (or a JSON record's) lower-cased names is the label: `label`, else the first one a label
    name calls (`LABEL_NAMES`); None when none is."""
    return keys.index("label") if "label" in keys else next((i for i, k in enumerate(keys) if k in LABEL_NAMES), None)


def _text_fields(keys: list[str], label_at: int | None) -> list[int]:
    """Which of those names are the text: `text`, else the ones text names call (`TEXT_NAMES`) but the label's."""
    if "text" in keys:
        return [keys.index("text")]
    return [i for i, k in enumerate(keys) if i != label_at and k in TEXT_NAMES]


def _read_table_rows(path: Path, *, label_column: str | int | None, text_columns: Sequence[str | int] | None,
                     header: bool | None, delimiter: str | None, max_field_chars: int) -> list[_Row]:
    text = _decode(path)
    delimiter = delimiter or table_delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    old_limit = csv.field_size_limit(max_field_chars)
    rows: list[_Row] = []
    line = 1  # where the record being read starts
    try:
        first = next(reader, None)
        if first is None:
            raise CCTError(f"{path}: empty file")
        keys = [cell.strip().lower() for cell in first]
        if header is None:  # names the label or the text column, or both in words of the field; AG News has none
            header = isinstance(label_column, str) or (label_column is None and bool(
                {"label", "text"} & set(keys) or (LABEL_NAMES & set(keys) and TEXT_NAMES & set(keys))))
        names = first if header else [str(i) for i in range(len(first))]
        where = f"{path}:1"
        if label_column is None and header:
            found = _label_field(keys)
            label_column = names[found] if found is not None else "label"
        label_at = _column(names, label_column if label_column is not None else 0, where)
        if text_columns is None:  # the columns text names call, else every column but the label
            named = _text_fields(keys, label_at) if header else []
            text_at = named or [i for i in range(len(names)) if i != label_at]
        else:
            text_at = [_column(names, c, where) for c in text_columns]
        if not text_at:
            raise CCTError(f"{where}: no text column (only the label column {names[label_at]!r})")
        records = reader if header else _chain_first(first, reader)
        line = reader.line_num + 1 if header else 1
        spanning = []  # (where, lines, record) of records over more than two lines
        for record in records:
            where = f"{path}:{line}"
            if record:
                if len(record) != len(names):
                    raise CCTError(f"{where}: {len(record)} fields, expected {len(names)}")
                label = record[label_at].strip()
                if not label:
                    raise CCTError(f"{where}: empty label")
                rows.append((_text(" ".join(record[i] for i in text_at), where), label, where))
                if reader.line_num - line > 1:
                    spanning.append((where, reader.line_num - line + 1, record))
            line = reader.line_num + 1
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise CCTError(f"{path}:{line}: a field is over {max_field_chars} characters "
                           "(an unclosed quote?)") from None
        raise CCTError(f"{path}:{line}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    finally:
        csv.field_size_limit(old_limit)
    check_unclosed_quotes(spanning, {label for _, label, _ in rows}, delimiter, len(names), label_at)
    counts = Counter(label for _, label, _ in rows)
    once = sum(n == 1 for n in counts.values())
    # texts read as labels: the wrong column, or a header not seen (a file of a few rows may well be all singletons)
    if len(rows) >= 20 and len(counts) > 2 and once > len(counts) / 2:
        shown = ", ".join(map(repr, list(counts)[:3]))
        raise CCTError(f"{path}: {once} of its {len(counts)} labels occur once ({shown}, ...): is the label column "
                       f"right? It is {names[label_at]!r}; a first row naming the 'label' and 'text' columns chooses "
                       "them")
    return rows


def _chain_first(first: list[str], rest):
    yield first
    yield from rest


def read_table(path: str | Path, *, label_column: str | int | None = None,
               text_columns: Sequence[str | int] | None = None, header: bool | None = None,
               delimiter: str | None = None, max_field_chars: int = MAX_FIELD_CHARS) -> TextDataset:
    """A CSV/TSV file (training only) or a folder with `train.csv` and `test.csv` (or `.tsv`).

    Args:
        path: the file or folder.
        label_column: a header name or a 0-based index; None: `label` with a header, else column 0.
        text_columns: names or indices joined into the text; None: `text` if the header has it, else
            every column but the label.
        header: whether the first row names the columns; None: when it holds the label column's name.
        delimiter: None: tab for `.tsv`; for `.csv` a comma, or the semicolon or tab each of its first rows has.
        max_field_chars: a longer field is an error.
    """
    path = Path(path)
    options = dict(label_column=label_column, text_columns=text_columns, header=header, delimiter=delimiter,
                   max_field_chars=max_field_chars)
    if path.is_file():
        return _dataset(_read_table_rows(path, **options), None, f"table {path}")
    for suffix in TABLE_SUFFIXES:
        train, test = path / f"train{suffix}", path / f"test{suffix}"
        if train.is_file():
            return _dataset(_read_table_rows(train, **options),
                            _read_table_rows(test, **options) if test.is_file() else None, f"tables in {path}")
    raise CCTError(f"{path}: neither a CSV/TSV file nor a folder with train.csv or train.tsv")


# ---------------------------------------------------------------------- JSON Lines
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")  # `.json`: JSON Lines (as `datasets`' to_json writes) or one array


def _json_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) for each record: a line of JSON Lines, or an element of a `.json` file's one array."""
    text, dot_json = _decode(path), path.suffix.lower() == ".json"
    if dot_json and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CCTError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        return [(f"{path}: record {i}", r) for i, r in enumerate(records, start=1)]
    records = []
    for number, line in enumerate(lines_of(text), start=1):
        if line.strip():
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                hint = ": a .json file holds JSON Lines or one array of objects" if dot_json else ""
                raise CCTError(f"{path}:{number}: not JSON ({e.msg}){hint}") from None
    return records


def _read_jsonl_rows(path: Path) -> list[_Row]:
    """Fields `text` and `label`, else those the first record's keys name in other words, as a table header's."""
    rows, label_key, text_keys = [], "label", ["text"]
    for where, record in _json_records(path):
        if not isinstance(record, dict):
            raise CCTError(f"{where}: expected an object with 'text' and 'label'")
        if not rows:  # the fields, chosen as a table header's columns are
            fields = list(record)
            keys = [str(k).lower() for k in fields]
            found = _label_field(keys)
            label_key = fields[found] if found is not None else "label"
            text_keys = [fields[i] for i in _text_fields(keys, found)] or ["text"]
        for key in (label_key, *text_keys):
            if key not in record:
                raise CCTError(f"{where}: missing field {key!r}")
        texts, label = [record[k] for k in text_keys], record[label_key]
        if not all(isinstance(t, str) for t in texts):
            raise CCTError(f"{where}: {text_keys[0]!r} is not a string")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise CCTError(f"{where}: {label_key!r} must be a non-empty string or an integer")
        rows.append((_text(" ".join(texts), where), str(label).strip(), where))
    return rows


def json_split(folder: Path, split: str) -> Path | None:
    return next((folder / f"{split}{s}" for s in JSON_SUFFIXES if (folder / f"{split}{s}").is_file()), None)


def read_jsonl(path: str | Path) -> TextDataset:
    """A JSON Lines file (training only) or a folder with `train.jsonl` and `test.jsonl` (or .ndjson, .json)."""
    path = Path(path)
    if path.is_file():
        return _dataset(_read_jsonl_rows(path), None, f"JSON Lines {path}")
    train, test = json_split(path, "train"), json_split(path, "test")
    if train is None:
        raise CCTError(f"{path}: neither a .jsonl file nor a folder with train.jsonl")
    return _dataset(_read_jsonl_rows(train), _read_jsonl_rows(test) if test else None, f"JSON Lines in {path}")


# ---------------------------------------------------------------------- folders of .txt files
def is_text_file(name: str) -> bool:
    """A text of a class folder: `.txt` in any case, or no extension at all (scikit-learn's `load_files` layout, as
    20 Newsgroups has it); hidden files (`.DS_Store`) are not."""
    suffix = Path(name).suffix
    return not name.startswith(".") and (suffix.lower() == ".txt" or not suffix)


def _read_folder_rows(split: Path, skipped: list[str]) -> list[_Row]:
    """The texts under each class folder of `split`, sub-folders included; other files are noted in `skipped`."""
    rows = []
    for class_dir in sorted(p for p in split.iterdir() if p.is_dir()):
        for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if is_text_file(file.name):
                rows.append((_text(_decode(file), f"{file}:1"), class_dir.name, f"{file}:1"))
            elif not file.name.startswith("."):
                skipped.append(f"{file}: not a .txt file, left out")
    return rows


def read_text_folders(root: str | Path) -> TextDataset:
    """`root/train/<class>/**/*.txt` and, when present, `root/test/<class>/**/*.txt`: one text a file (`.txt` in any
    case, or files without an extension)."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise CCTError(f"{root}: no train/<class>/*.txt folders")
    test = root / "test"
    skipped: list[str] = []
    train_rows = _read_folder_rows(root / "train", skipped)
    test_rows = _read_folder_rows(test, skipped) if test.is_dir() else None
    return _dataset(train_rows, test_rows, f"text folders {root}", skipped=skipped)


# ---------------------------------------------------------------------- a held-out test split
def _fingerprint(ds: TextDataset) -> str:
    """A key of the training texts and their labels, in order: what a recorded test split depends on."""
    h = hashlib.sha256()
    for text, label in zip(ds.train_texts, ds.train_labels.tolist()):
        h.update(f"{ds.classes[label]}\t{text}\n".encode())
    return h.hexdigest()


def _with_test(ds: TextDataset, rows: list[int]) -> TextDataset:
    test = set(rows)
    keep = [i for i in range(len(ds.train_texts)) if i not in test]
    return replace(ds, train_texts=[ds.train_texts[i] for i in keep], train_labels=ds.train_labels[keep],
                   test_texts=[ds.train_texts[i] for i in rows], test_labels=ds.train_labels[rows],
                   train_fine=None if ds.train_fine is None else ds.train_fine[keep])


def hold_out_test(ds: TextDataset, *, fraction: float, seed: int) -> tuple[TextDataset, dict | None]:
    """`ds` with round(fraction × n) of each class's n training texts moved to its test set (seeded,
    stratified, at least one a class of two or more: `cct.holdout.choose_test`), and the record of the choice;
    `ds` itself and None when it has a test set or `fraction` is 0."""
    if ds.test_texts is not None or fraction == 0:
        return ds, None
    items = [(label, f"{i:010d}") for i, label in enumerate(ds.train_labels.tolist())]
    _, test = choose_test(items, ds.num_classes, fraction=fraction, seed=seed)
    rows = sorted(int(name) for _, name in test)
    record = {"version": 1, "kind": "text", "seed": int(seed), "fraction": float(fraction), "num_texts": len(items),
              "classes": list(ds.classes), "fingerprint": _fingerprint(ds), "test_rows": rows}
    return _with_test(ds, rows), record


def recorded_test(ds: TextDataset, record: dict, where: str, *, hint: str = "") -> TextDataset:
    """`ds` split again as `hold_out_test` recorded it, when `ds` has no test set of its own (one that has
    is another source, evaluated on its own test set). A source that differs from the recorded one is a
    one-line error (`hint` ends it): its held-out rows would be other texts."""
    if ds.test_texts is not None:
        return ds
    if record.get("kind") != "text" or "test_rows" not in record or "fingerprint" not in record:
        raise CCTError(f"{where}: the checkpoint's recorded test split is not one of text rows")
    if _fingerprint(ds) != record["fingerprint"] or list(ds.classes) != record.get("classes", ds.classes):
        raise CCTError(f"{where} is not the source the run held its {len(record['test_rows'])} test texts out of, "
                       f"or it changed since ({record.get('num_texts', '?')} texts then, {len(ds.train_texts)} now)"
                       + hint)
    return _with_test(ds, [int(i) for i in record["test_rows"]])


def load_text(source: str | Path, *, label_level: str = "coarse", label_column: str | int | None = None,
              text_columns: Sequence[str | int] | None = None, max_field_chars: int = MAX_FIELD_CHARS) -> TextDataset:
    """Read any text source listed in the module docstring, chosen by what `source` holds.

    Args:
        source: a TREC folder, a CSV/TSV/JSON Lines file or folder, or a folder of `.txt` folders.
        label_level: TREC only: "coarse" (6 classes) or "fine" (50).
        label_column, text_columns, max_field_chars: CSV/TSV only, as for `read_table`.
    """
    path = Path(source)
    if (path.is_dir() and any((path / name).is_file() for name in TREC_FILES)) or \
            (path.is_file() and path.suffix.lower() == ".label"):
        return read_trec(path, label_level=label_level)
    if label_level != "coarse":  # other sources have one label a text: a level would be silently ignored
        raise CCTError(f"--label-level {label_level} is for TREC's COARSE:fine labels; {source} is not a TREC source")
    if path.suffix.lower() in JSON_SUFFIXES or (path.is_dir() and json_split(path, "train")):
        return read_jsonl(path)
    if path.suffix.lower() in TABLE_SUFFIXES or (path.is_dir() and any(
            (path / f"train{s}").is_file() for s in TABLE_SUFFIXES)):
        return read_table(path, label_column=label_column, text_columns=text_columns, max_field_chars=max_field_chars)
    if path.is_dir() and (path / "train").is_dir():
        return read_text_folders(path)
    raise CCTError(f"{source}: not a text dataset (TREC folder, CSV/TSV, JSON Lines or train/<class>/*.txt)"
                   if path.exists() else f"data not found: {source}")
