"""An exclusive lock on a folder or file, held by one process at a time.

`fcntl.flock` on a small lock file: the kernel releases it when the holder exits or dies (even
by SIGKILL), so a crash never leaves a stale lock. The holder writes its PID into the file so
that a process refused the lock can name it, and removes the file when it is done.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmtools.errors import DataError


class Busy(DataError):
    """Another process holds the lock."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


@contextmanager
def exclusive(lock_path: Path, what: str, fix: str) -> Iterator[None]:
    """Hold `lock_path` for the body, or raise `Busy` at once ("{what} is in use ...; {fix}")."""
    while True:
        # Close-on-exec: a child process started by the holder must not keep the lock alive.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"PID {pid}" if pid is not None else "its PID not yet written"
            raise Busy(f"{what} is in use by another process ({holder}); {fix}", pid) from None
        # A holder that just finished may have removed the file we opened; lock the new one.
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock_path)  # while still holding it: nobody can lock this inode after us
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_path_for(target: Path) -> Path:
    """The hidden lock file guarding `target` (a file or a folder): `.NAME.lock` beside it."""
    return target.with_name(f".{target.name}.lock")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
