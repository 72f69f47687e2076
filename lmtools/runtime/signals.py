"""Stop requests: the signals that end a run cleanly, and the one that ends it at once.

SIGTERM (a scheduler's or `timeout`'s stop), SIGINT (Ctrl-C), SIGHUP (the terminal closed, an
ssh session dropped), SIGQUIT (Ctrl-\\) and SIGUSR1 (what Slurm's `--signal` sends before a time
limit) all ask the run to write a checkpoint and exit 0.

A Python handler runs only when the main thread returns to the interpreter, so a run inside a
long native call (a huge matmul, a collective waiting for a peer that died) would not even see
a signal. Two things make stopping certain. The first handler call restores every stop signal
to its default action at the C level, so the kernel ends the process on the next one. And a
watcher thread reads the signals as they arrive (`signal.set_wakeup_fd`), whatever the main
thread is doing: a second signal ends the process at once, and in a distributed run, where a
lost peer can block a collective for good, a first signal not honoured within
`DISTRIBUTED_STOP_GRACE_S` ends it too (torchrun stops the workers of a failed node this way).
Checkpoints are written by atomic rename, so ending mid-write loses nothing already saved.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1") if hasattr(signal, name)
)
DISTRIBUTED_STOP_GRACE_S = 30.0

_active: StopSignal | None = None


def stop_requested() -> bool:
    """Whether a stop signal has arrived during the current run (checked between batches)."""
    return _active is not None and _active.requested


class StopSignal:
    """While entered, the stop signals set `requested` instead of killing the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._grace: threading.Timer | None = None

    def __enter__(self) -> StopSignal:
        global _active
        _active = self
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._start_watcher()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._grace is not None:
            self._grace.cancel()  # the run stopped in time
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._pipe[1])  # ends the watcher's read
            self._pipe = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Two signals arrived before Python ran this handler for the first: end now.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)

    def _start_watcher(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        threading.Thread(target=self._watch, args=(read_fd, distributed), name="lmtools-signals", daemon=True).start()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _watch(self, read_fd: int, distributed: bool) -> None:
        """Runs beside the main thread: sees each stop signal the moment the C handler records it."""
        seen = 0
        try:
            while True:
                data = os.read(read_fd, 64)
                if not data:
                    return  # the run ended
                for signum in data:
                    if signum not in STOP_SIGNALS:
                        continue
                    seen += 1
                    if seen >= 2:
                        os._exit(128 + signum)
                    if distributed:
                        self._grace = threading.Timer(DISTRIBUTED_STOP_GRACE_S, os._exit, args=(128 + signum,))
                        self._grace.daemon = True
                        self._grace.start()
        finally:
            os.close(read_fd)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TerminateAsInterrupt:
    """While entered, SIGTERM and SIGHUP end a command as Ctrl-C does: as an exception in the main
    thread, so that what the command was writing is removed on the way out (the default action
    would end the process on the spot and leave its temporary files). The first one restores
    the defaults: a second signal ends the process at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __enter__(self) -> TerminateAsInterrupt:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._raise) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _raise(self, signum, frame) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        raise Terminated(signum)
