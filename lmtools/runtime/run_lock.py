"""What guards a checkpoint path while a run writes it.

One run writes a checkpoint path at a time: it holds a kernel-released lock beside the
checkpoint (and one beside its metrics.jsonl) from before it reads anything until it exits, so
a second run or resume on the same path fails at once, naming the holder's PID. A new run
replaces only an lmtools checkpoint, and only with --overwrite (lmtools.runtime.ownership); it starts a fresh
metrics.jsonl (the previous one is moved aside, not mixed in). Resuming from a snapshot older
than the run's newest checkpoint discards the steps after it, so it needs --rollback. Temporary
files that killed writers left in the folder are removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from lmtools.errors import ConfigError
from lmtools.layout import METRICS_FILE
from lmtools.runtime.fsutil import remove_stale_temp_files
from lmtools.runtime.lock import exclusive, lock_path_for


class RunGuard:
    """The locks a run holds on its checkpoint path and metrics file, released by `release`
    (or by the kernel when the process dies)."""

    def __init__(self):
        self._locks = contextlib.ExitStack()
        self._held: set[Path] = set()
        self._created: list[Path] = []  # folders made for the locks: removed again if left empty

    def lock(self, ckpt_path: Path, *, metrics: bool = True) -> None:
        ckpt_path = Path(os.path.abspath(ckpt_path))
        if ckpt_path in self._held:
            return
        folder = ckpt_path.parent
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the checkpoint folder {folder}: {exc.strerror or exc}") from None
        self._created += missing
        targets = [(ckpt_path, f"the checkpoint {ckpt_path}")]
        if metrics:
            targets.append((folder / METRICS_FILE, f"the metrics file {folder / METRICS_FILE}"))
        fix = "wait for that run to finish, stop it, or choose another --checkpoint_path"
        for target, what in targets:
            if target in self._held:
                continue
            try:
                self._locks.enter_context(exclusive(lock_path_for(target), what, fix))
            except OSError as exc:
                raise ConfigError(
                    f"cannot lock {target}: {exc.strerror or exc}; choose a writable --checkpoint_path"
                ) from None
            self._held.add(target)
        remove_stale_temp_files(folder)

    def release(self) -> None:
        self._locks.close()
        self._held.clear()
        for folder in self._created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break  # the run wrote something there: keep it
        self._created.clear()


def start_fresh_metrics(ckpt_path: Path, log: Callable[[str], None]) -> None:
    """A new run's metrics.jsonl starts empty: a previous run's file is moved aside, not mixed in."""
    path = Path(ckpt_path).with_name(METRICS_FILE)
    if not path.is_file():
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    aside = path.with_name(f"metrics-{stamp}.jsonl")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"metrics-{stamp}-{n}.jsonl")
    os.replace(path, aside)
    log(f"The previous run's {path.name} was moved to {aside.name}")
