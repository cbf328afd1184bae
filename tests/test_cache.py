"""cct.cache: where decoded datasets are kept, listing them with source, size and last use, clearing them."""
import argparse
import os
import time

import pytest

from data_fixtures import make_tree
from cct import cache, data
from cct.errors import CCTError


def _cli(argv) -> int:
    """`cct cache ...` through the subcommand's own parser (as cct.cli registers it)."""
    parser = argparse.ArgumentParser()
    cache.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def two_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("CCT_DATA", str(tmp_path / "cct-data"))  # the default cache directory
    counts = {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    first, second = make_tree(tmp_path / "first", counts), make_tree(tmp_path / "second", counts, seed=1)
    data.load(first, progress=False)
    data.load(second, progress=False)
    return first, second


def test_list_shows_source_size_and_last_use(two_entries, tmp_path, capsys):
    first, second = two_entries
    found = cache.entries()
    assert [e.source for e in sorted(found, key=lambda e: e.source)] == [str(first), str(second)]
    assert all(e.path.parent == tmp_path / "cct-data" / "decoded" and e.size == e.path.stat().st_size for e in found)
    assert _cli(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cct-data" / "decoded") in out and "2 entries" in out
    assert str(first) in out and str(second) in out


def test_a_read_is_a_use(two_entries):
    first, _ = two_entries
    entry = next(e for e in cache.entries() if e.source == str(first))
    os.utime(entry.path, (time.time() - 5 * 86400,) * 2)
    assert cache.entries()[0].path == entry.path  # the oldest use first
    data.load(first, progress=False)  # served from the cache
    assert time.time() - entry.path.stat().st_mtime < 60


class _Marker:
    """Unpickling it would create a file: the proof that a cache file ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_cache_file_cannot_run_code(two_entries, tmp_path, caplog):
    """An entry holding a pickled object (a planted or foreign file) is ignored and decoded again, never unpickled."""
    import numpy as np
    first, _ = two_entries
    entry = next(e for e in cache.entries() if e.source == str(first))
    with np.load(entry.path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    marker = tmp_path / "code-ran"
    arrays["train_labels"] = np.array([_Marker(marker)], dtype=object)
    with open(entry.path, "wb") as f:
        np.savez(f, **arrays)
    ds = data.load(first, progress=False)
    assert not marker.exists() and "ignoring unreadable cache" in caplog.text
    assert ds.train.labels.tolist() == [0, 0, 1, 1]  # decoded again


def test_clear_older_than_and_all(two_entries, capsys):
    first, second = two_entries
    old = next(e for e in cache.entries() if e.source == str(first))
    os.utime(old.path, (time.time() - 3 * 86400,) * 2)
    assert _cli(["cache", "list", "--older-than", "2"]) == 0  # what the clear below removes (it listed all)
    out = capsys.readouterr().out
    assert "1 entries last used more than 2 days ago" in out and str(first) in out and str(second) not in out
    assert _cli(["cache", "clear", "--older-than", "2"]) == 0
    assert [e.source for e in cache.entries()] == [str(second)] and not old.path.exists()
    assert "removed 1 entry" in capsys.readouterr().err
    (old.path.parent / "x-123.tmp").write_bytes(b"half a file")  # an interrupted write
    assert len(cache.entries()) == 2
    assert len(cache.clear()) == 2 and cache.entries() == []
    with pytest.raises(CCTError, match="--older-than"):
        cache.clear(older_than_days=-1)
    assert cache.entries(os.environ["CCT_DATA"] + "/nowhere") == []
