"""Stop requests: the signals that end a run cleanly, and the one that ends it at once.

SIGTERM (a scheduler's or `timeout`'s stop), SIGINT (Ctrl-C), SIGHUP (the terminal closed, an
ssh session dropped), SIGQUIT (Ctrl-\\) and SIGUSR1 (what Slurm's `--signal` sends before a time
limit) all ask the run to write a checkpoint and exit 0. The first one restores every one of
them to its default action at the C level: Python handlers run only between bytecodes, so a
second signal during a long native call (a huge matmul, a slow evaluation batch) would
otherwise wait for it to end. With the default restored, the kernel ends the process at once;
checkpoints are written by atomic rename, so that loses nothing already saved.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1") if hasattr(signal, name)
)


_active: "StopSignal | None" = None


def stop_requested() -> bool:
    """Whether a stop signal has arrived during the current run (checked between batches)."""
    return _active is not None and _active.requested


class StopSignal:
    """While entered, the stop signals set `requested` instead of killing the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignal":
        global _active
        _active = self
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Two signals arrived before Python ran this handler for the first: end now.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)

    @property
    def requested(self) -> bool:
        return self.signum is not None
