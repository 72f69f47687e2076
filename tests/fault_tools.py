"""Shared by the fault tests: a tiny model, real `lmtools` processes, and their output."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from lmtools.cli import app

TINY = [
    "--vocab_size",
    "64",
    "--context_length",
    "16",
    "--d_model",
    "32",
    "--num_layers",
    "1",
    "--num_heads",
    "4",
    "--d_ff",
    "64",
    "--batch_size",
    "4",
    "--warmup_iters",
    "2",
    "--learning_rate",
    "1e-3",
    "--eval_interval",
    "1000000",
    "--log_interval",
    "1",
]

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def write_tokens(path: Path, n: int = 50000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).integers(0, 64, n).astype(np.uint16))
    return path


def cli(*args) -> "object":
    """The CLI in this process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one `error:` line of a failed command (asserting there is exactly one, and no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def spawn(*args, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`lmtools ARGS` as a real process."""
    cmd = [sys.executable, "-m", "lmtools.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV)


def train_process(tokens: Path, ckpt: Path, *extra) -> subprocess.Popen:
    return spawn("train", "--train_data", tokens, *TINY, "--max_iters", "1000000", "--checkpoint_path", ckpt, *extra)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    proc.kill()
    raise AssertionError(f"no line starting with {prefix!r}: {''.join(lines)} {proc.stderr.read()}")


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
