"""Durable file operations shared by checkpoints, prepared datasets and exports: directory fsync,
temporary files left by dead writers, a folder put in place in one step, and the regular-file
check for inputs."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
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


def fsync_file(path: str | os.PathLike) -> None:
    """Make a file's data durable before a rename publishes it."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole or not at all: written under a temporary name of this process,
    fsynced, renamed over `path`, and the rename made durable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def disk_full(exc: OSError) -> bool:
    """Whether a failed write ran out of space (or of quota)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


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


# Temporary files named `.NAME.PID.tmp` (files) or `NAME.PID.tmp` (folders), and the old folder
# that `replace_folder` moves aside, `.NAME.old.PID.tmp`.
_TEMP_NAME = re.compile(r"^\.?(?P<name>.+?)(\.old)?\.(?P<pid>\d+)\.tmp$")


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
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def replace_folder(new: Path, target: Path) -> None:
    """Put the folder `new` at `target`, in one step where the kernel can: an existing `target`
    is exchanged with `new` atomically (renameat2 RENAME_EXCHANGE), then removed. Where that is
    unsupported, the old folder is renamed aside first (`.NAME.old.PID.tmp`), so a crash leaves it
    under a temporary name of this process (removed by the next writer, as a dead writer's)."""
    if not target.exists():
        os.replace(new, target)
        return
    if not _exchange(new, target):
        aside = target.with_name(f".{target.name}.old.{os.getpid()}.tmp")
        os.replace(target, aside)
        os.replace(new, target)
        new = aside
    shutil.rmtree(new, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
