"""Delimited text tables, for image lists and text data alike: their lines, their delimiter, and the unclosed quote
that would swallow their rows."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from .errors import CCTError


def lines_of(text: str) -> list[str]:
    """`text`'s lines, broken at \\n, \\r\\n or \\r only: `str.splitlines` also breaks at U+2028, U+0085 and other
    characters that JSON strings and texts may hold as they are."""
    return _LINE_BREAK.split(_LAST_BREAK.sub("", text)) if text else []


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LAST_BREAK = re.compile(r"(\r\n|\r|\n)\Z")


def check_unclosed_quotes(spanning: list[tuple[str, int, list[str]]], labels: set[str], delimiter: str,
                          columns: int, label_at: int) -> None:
    """An error for a record whose quoted field has swallowed rows: two or more of its inner lines read as rows of
    the file (as many fields, a label the file has). csv reads an unclosed quote up to the next quote or the end."""
    for where, lines, record in spanning:
        inner = [ln for field in record for ln in lines_of(field)[1:]]
        rows = [r for r in csv.reader(inner, delimiter=delimiter) if len(r) == columns]
        # with one label in the file (all the others swallowed), any short label cell counts
        swallowed = [r for r in rows if r[label_at].strip() in labels or len(labels) == 1 and
                     0 < len(r[label_at].strip()) <= 40]
        if len(swallowed) >= 2:
            raise CCTError(f"{where}: a quoted field runs over {lines} lines, {len(swallowed)} of which read as rows "
                           f"of this file ({delimiter.join(swallowed[0])[:40]!r}): an unclosed quote?")


def csv_delimiter(text: str) -> str:
    """"," unless the first rows have none and do have ";" (Excel's CSV where the decimal mark is a comma) or a tab."""
    head = [line for line in lines_of(text)[:6] if line.strip()]
    for delimiter in (",", ";", "\t"):
        if head and all(delimiter in line for line in head):
            return delimiter
    return ","


def table_delimiter(path: Path, text: str) -> str:
    """A tab for `.tsv`; for `.csv` a comma, or the semicolon or tab that every one of its first rows has instead."""
    return "\t" if path.suffix.lower() == ".tsv" else csv_delimiter(text)
