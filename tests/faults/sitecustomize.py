"""Fault injection for tests/test_faults.py, inside a real `python -m cct ...` process.

Python imports `sitecustomize` at start-up from the first folder on its path that has one, so a
test puts this folder on the subprocess's PYTHONPATH and says in `CCT_FAULTS` where the process
is to fail. Nothing here is part of cct: it wraps the operating-system calls that
`cct.checkpoint.atomic_write` makes (temporary file, write, fsync, rename) and, for signals, the
optimiser's step.

CCT_FAULTS is a `;`-separated list of rules `OP:NAME:N:ACTION`, each firing once, at the N-th
(1-based) matching event of the process:
  create    tempfile.mkstemp of NAME's temporary file (`.NAME.*.tmp`)
  write     the first write() into the N-th temporary file of NAME; half the bytes are written first,
            so a kill leaves a partial temporary file and a full disk a short one
  fsync     os.fsync of NAME's temporary file (written in full, not yet renamed)
  replace   os.replace(tmp, NAME), before the rename
  replaced  os.replace(tmp, NAME), just after the rename
  step      the N-th optimiser step of the run (NAME is ignored); the step then runs as usual
ACTION is one of
  kill      SIGKILL this process (nothing of Python runs afterwards)
  term, int send SIGTERM / SIGINT to this process and carry on
  enospc    raise OSError(ENOSPC), as a full disk does
  erofs     raise OSError(EROFS), as a read-only file system does
"""
import errno
import os
import signal
import tempfile

_RULES = []
for _text in filter(None, os.environ.get("CCT_FAULTS", "").split(";")):
    _op, _name, _n, _action = _text.split(":")
    _RULES.append({"op": _op, "name": _name, "n": int(_n), "action": _action, "seen": 0})


def _fire(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
    elif action in ("enospc", "erofs"):
        code = errno.ENOSPC if action == "enospc" else errno.EROFS
        raise OSError(code, os.strerror(code))
    else:
        raise ValueError(f"unknown fault action {action!r}")


def _due(op: str, name: str | None) -> list:
    """The rules for this event whose count it reaches (counting every matching event)."""
    due = []
    for rule in _RULES:
        if rule["op"] == op and (op == "step" or rule["name"] == name):
            rule["seen"] += 1
            if rule["seen"] == rule["n"]:
                due.append(rule)
    return due


def _temporary_of(path: str) -> str | None:
    """NAME when `path` is atomic_write's temporary file `.NAME.<random>.tmp`, else None."""
    base = os.path.basename(path)
    if not (base.startswith(".") and base.endswith(".tmp")):
        return None
    return base[1:].rsplit(".", 2)[0]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


if _RULES:
    _mkstemp, _fdopen, _fsync, _replace = tempfile.mkstemp, os.fdopen, os.fsync, os.replace

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if prefix and prefix.startswith(".") and suffix == ".tmp":
            for rule in _due("create", prefix[1:-1]):
                _fire(rule["action"])
        return _mkstemp(suffix, prefix, dir, text)

    class _FaultyFile:
        """A binary file whose first write() fires the rule after writing half its bytes."""

        def __init__(self, file, rule):
            self._file, self._rule = file, rule

        def write(self, data):
            if self._rule is not None:
                rule, self._rule = self._rule, None
                view = memoryview(data).cast("B")
                self._file.write(view[:len(view) // 2])
                self._file.flush()
                _fire(rule["action"])
            return self._file.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()
            return False

        def __getattr__(self, name):
            return getattr(self._file, name)

    def fdopen(fd, *args, **kwargs):
        file = _fdopen(fd, *args, **kwargs)
        name = _temporary_of(_fd_path(fd))
        due = _due("write", name) if name else []
        return _FaultyFile(file, due[0]) if due else file

    def fsync(fd):
        name = _temporary_of(_fd_path(fd))
        for rule in _due("fsync", name) if name else []:
            _fire(rule["action"])
        return _fsync(fd)

    def replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst))
        due = _due("replace", name) + _due("replaced", name)
        for rule in due:
            if rule["op"] == "replace":
                _fire(rule["action"])
        result = _replace(src, dst, *args, **kwargs)
        for rule in due:
            if rule["op"] == "replaced":
                _fire(rule["action"])
        return result

    tempfile.mkstemp, os.fdopen, os.fsync, os.replace = mkstemp, fdopen, fsync, replace

    if any(rule["op"] == "step" for rule in _RULES):
        import torch

        _step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            for rule in _due("step", None):
                _fire(rule["action"])
            return _step(self, *args, **kwargs)

        torch.optim.AdamW.step = step
