"""Durable file operations shared by checkpoints and prepared datasets."""

from __future__ import annotations

import os
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
