"""One training run per output folder: an advisory lock on ``<out>/.lock`` for a run's whole life.

`hold_run_lock(out)` takes an exclusive, non-blocking lock on ``out/.lock`` and writes its PID there.
A second `cct train` on the same folder gets a one-line `CCTError` naming that PID (the CLI exits 2).
The lock belongs to the open file, so the operating system drops it when the process ends in any way:
a run killed with SIGKILL leaves a ``.lock`` file behind, but no lock, and the next ``--resume`` takes it.

The processes of one run share the lock of the process that took it; they must not take it again
(flock locks are per open file, so a second take in a child would fail against its own parent):
- Processes started by the holder (the workers ``--procs`` starts) inherit ``CCT_RUN_LOCK_HELD``,
  which the holder sets to the folder for its lifetime: `hold_run_lock` on that same folder in such
  a process checks that the lock is still held and returns without taking it.
- torchrun ranks have no cct parent: only the process of global rank 0 takes the lock; the training
  code passes ``rank`` (the ``RANK`` torchrun sets), and other ranks get a no-op.
So the training code wraps a run as ``with hold_run_lock(cfg.out, rank=rank): ...`` around
everything that writes into the folder (a resumed run included), before any file is written.

Locking uses `fcntl.flock` (Linux, macOS, BSD; on NFS it is emulated with POSIX locks by Linux).
Where `fcntl` is missing (Windows) it falls back to `msvcrt.locking` on the first byte of the file, with
the same semantics (released by the system when the process dies) and the PID written after that byte.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import CCTError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

ENV = "CCT_RUN_LOCK_HELD"
LOCK_NAME = ".lock"
_PID_OFFSET = 16  # where the fallback writes the PID: the locked first byte cannot be read by others


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:  # BlockingIOError (flock) or PermissionError (msvcrt): held by another process
        return False


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(fd: int) -> str:
    """The PID written by the holder, "unknown" when unreadable."""
    try:
        os.lseek(fd, _PID_OFFSET if fcntl is None else 0, os.SEEK_SET)
        text = os.read(fd, 64).strip(b"\0 \n").decode(errors="replace")
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _in_use(out: Path, fd: int) -> CCTError:
    return CCTError(f"{out} is in use by another cct train (PID {_holder(fd)}); wait for it, or choose another --out")


@contextlib.contextmanager
def hold_run_lock(out: str | Path, *, rank: int = 0) -> Iterator[None]:
    """Hold the advisory lock of run folder `out` (created if missing) for the `with` block.

    Args:
        out: the run folder.
        rank: the process's global rank; only rank 0 takes the lock (torchrun ranks share it).

    Raises:
        CCTError: "<out> is in use by another cct train (PID n)" when another process holds it.
    """
    out = Path(out).expanduser().absolute()
    if rank != 0:
        yield
        return
    created = not out.exists()  # a run that fails before writing anything leaves no folder behind
    if out.exists() and not out.is_dir():
        raise CCTError(f"--out {out} is a file, not a folder")
    if out.is_symlink() and not out.exists():  # mkdir would say "File exists"
        raise CCTError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CCTError(f"cannot lock {out}: {e.strerror or e}") from None
    try:
        if not _try_lock(fd):
            if os.environ.get(ENV) == str(out):  # started by the holder (a --procs worker): share its lock
                yield
                return
            raise _in_use(out, fd)
        try:  # held by this process from here (also when an inherited ENV names a holder that is gone)
            os.ftruncate(fd, 0)
            os.lseek(fd, _PID_OFFSET if fcntl is None else 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            previous = os.environ.get(ENV)
            os.environ[ENV] = str(out)  # inherited by the processes this one starts
            try:
                yield
            finally:
                if previous is None:
                    os.environ.pop(ENV, None)
                else:
                    os.environ[ENV] = previous
        finally:
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:  # nothing written: undo the folder
                (out / LOCK_NAME).unlink()
                out.rmdir()
            _unlock(fd)
    finally:
        os.close(fd)
