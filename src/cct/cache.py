"""The decoded-dataset cache and `cct cache list|clear`.

`cct.data.load` decodes a source once and keeps its uint8 tensors as one uncompressed ``.npz`` per
(source content, image size, channels, resize mode, test split) in ``<cache dir>/decoded/``; the cache
directory is ``$CCT_DATA``, else ``~/.cache/cct`` (`cct.sources.default_cache_dir`), which also holds
downloaded CIFAR archives. Entries are named ``<source name>-<key>.npz``; the key is a hash of the
content, so a moved source still finds its entry and a changed one never reads a stale entry. Each
entry's "meta" array records the source it was decoded from; a read touches the file, so its
modification time is its last use. Nothing removes entries by itself: `cct cache clear` does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CCTError
from .sources import default_cache_dir

log = logging.getLogger(__name__)

SUBDIR = "decoded"


# ---------------------------------------------------------------------- entries, as cct.data reads and writes them
def entry_path(cache_dir: Path, path: Path, key_parts: dict) -> Path:
    """`<name>-<key>.npz`; the name only helps people, so a moved source finds its entry by the key."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    existing = next((cache_dir / SUBDIR).glob(f"*-{key}.npz"), None)
    return existing or cache_dir / SUBDIR / f"{path.name.split('.')[0] or 'data'}-{key}.npz"


def read_entry(file: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of an entry, None when missing or unreadable (then it is decoded again)."""
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:  # no pickles: a cache file cannot run code
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except Exception as e:  # a truncated or foreign file: decode again
        log.warning("ignoring unreadable cache %s (%s)", file, e)
        return None
    try:
        os.utime(file)  # its modification time is its last use, for `cct cache list|clear`
    except OSError:
        pass  # a read-only shared cache still serves
    return arrays, meta


def write_entry(file: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write an entry atomically (a concurrent or interrupted run never sees half a file); a failure
    is a warning, as the next run just decodes again."""
    arrays = {"meta": np.array(json.dumps(meta)), **arrays}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("could not write the dataset cache %s (%s); the next run decodes again", file, e)


# ---------------------------------------------------------------------- listing and clearing
@dataclass
class CacheEntry:
    path: Path
    source: str  # the path it was decoded from ("?" when unreadable)
    size: int  # bytes
    last_used: float  # seconds since the epoch (the file's modification time)


def _source_of(file: Path) -> str:
    try:
        with np.load(file, allow_pickle=False) as z:  # reads only the small "meta" member of the zip
            return str(json.loads(str(z["meta"])).get("path", "?"))
    except Exception:
        return "?"


def entries(cache_dir: Path | None = None) -> list[CacheEntry]:
    """The decoded entries (and leftovers of interrupted writes) of a cache directory, oldest use first."""
    folder = Path(cache_dir or default_cache_dir()).expanduser() / SUBDIR
    found = []
    for file in sorted(folder.glob("*")) if folder.is_dir() else []:
        if file.is_file() and file.suffix in (".npz", ".tmp"):
            st = file.stat()
            source = _source_of(file) if file.suffix == ".npz" else "(unfinished write)"
            found.append(CacheEntry(file, source, st.st_size, st.st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def _cutoff(older_than_days: float) -> float:
    """The last-use time before which an entry is older than `older_than_days`."""
    if not 0 <= older_than_days < math.inf:
        raise CCTError(f"--older-than must be a number of days, at least 0, got {older_than_days}")
    return time.time() - older_than_days * 86400


def clear(cache_dir: Path | None = None, *, older_than_days: float | None = None) -> list[CacheEntry]:
    """Remove every entry, or those last used more than `older_than_days` ago; returns the removed ones.
    Downloaded CIFAR archives are kept."""
    cutoff = _cutoff(older_than_days) if older_than_days is not None else None
    removed = []
    for entry in entries(cache_dir):
        if cutoff is None or entry.last_used < cutoff:
            try:
                entry.path.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile by another process
            except OSError as e:
                raise CCTError(f"cannot remove {entry.path}: {e.strerror or e}") from None
            removed.append(entry)
    return removed


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _run(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.action == "clear":
        removed = clear(cache_dir, older_than_days=args.older_than)
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
              f"({_size(sum(e.size for e in removed))}) from {cache_dir / SUBDIR}", file=sys.stderr)
        return 0
    found, which = entries(cache_dir), ""
    if args.older_than is not None:  # what `clear --older-than` would remove
        cutoff = _cutoff(args.older_than)
        found, which = [e for e in found if e.last_used < cutoff], f" last used more than {args.older_than:g} days ago"
    print(f"cache: {cache_dir / SUBDIR} ({len(found)} entries{which}, {_size(sum(e.size for e in found))}; "
          f"set CCT_DATA to move it)")
    for e in found:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{_size(e.size):>10}  {used}  {e.path.name}  {e.source}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list or clear the decoded-dataset cache ($CCT_DATA, else ~/.cache/cct)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("list", "clear"), help="list: entries with source, size and last use; "
                   "clear: remove entries (downloaded CIFAR archives are kept)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="only entries last used more than DAYS days ago (list: what clear would remove)")
    p.add_argument("--cache-dir", default=None, help="the cache directory (default: $CCT_DATA, else ~/.cache/cct)")
    p.set_defaults(func=_run)
