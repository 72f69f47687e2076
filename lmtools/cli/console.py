"""Console output that never stops a run.

A closed pipe (`lmtools train ... | head -1`) or a vanished terminal (an ssh session dropped)
makes writes to stdout fail with EPIPE or EIO. Training must go on, and keep writing its
metrics.jsonl and checkpoints: the console is then pointed at /dev/null (at the descriptor
level, so rich's refresh thread and the interpreter's final flush write there too).
"""

from __future__ import annotations

import contextlib
import os
import sys


def detach_stdout() -> None:
    """Send everything written to stdout from now on to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def console_guard():
    """Run a console write; a closed or vanished console detaches stdout instead of raising."""
    try:
        yield
    except OSError:  # BrokenPipeError (EPIPE), EIO from a hung-up terminal
        detach_stdout()
