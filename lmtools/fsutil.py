"""Durable file operations shared by checkpoints and prepared datasets: directory fsync,
exclusive locks on paths, stale temporary files, and the regular-file check for inputs."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames inside `folder` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(Path(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockHeld(OSError):
    """Another live process holds the lock; `pid` is the holder's (None if it wrote none yet)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(errno.EWOULDBLOCK, f"{path} is locked by process {pid}")
        self.path, self.pid = path, pid


def lock_path_for(target: str | os.PathLike) -> Path:
    """The lock file guarding `target` (a file or a folder): the hidden `.NAME.lock` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


class PathLock:
    """An exclusive, non-blocking lock guarding a path, held by this process until `release`.

    The lock is `flock` on a file beside the target that holds the holder's PID: the kernel
    drops it when the holder dies in any way (kill -9 included), so a stale lock file never
    blocks anyone. A second process fails at once with `LockHeld` naming the holder's PID.
    The file is removed on release; a process that locked a file just removed re-opens the
    path, so two holders can never each hold a different inode.
    """

    def __init__(self, target: str | os.PathLike):
        self.path = lock_path_for(target)
        self._fd: int | None = None

    def acquire(self) -> "PathLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise LockHeld(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder released and removed it between our open and flock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "PathLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Temporary files named `.NAME.PID.tmp` (files) or `NAME.PID.tmp` (folders).
_TEMP_NAME = re.compile(r"^\.?(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def remove_stale_temp_files(folder: str | os.PathLike, names: set[str] | None = None) -> list[Path]:
    """Remove `.NAME.PID.tmp` files in `folder` whose writer PID is no longer alive
    (left by a kill or a crash mid-write); `names` limits it to those target names.
    Returns what was removed. Files of live processes are never touched."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or (names is not None and m["name"] not in names) or pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                import shutil

                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a data file, or None when it is a regular file (through
    symlinks). A FIFO or device would block or never end a read, and a symlink loop or a
    dangling link has no file behind it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno == errno.ENOENT:
            return "is a dangling symlink" if path.is_symlink() else "file not found"
        return exc.strerror or str(exc)
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        return f"is {kind}, not a regular file"
    return None
