"""Shared by the tests: tiny models as configs and as flags, the CLI in this process and as real
processes, a token stream a tiny model can learn, and the checks on a failed command's output."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lmtools.cli import app
from lmtools.config.train_config import TrainConfig

VOCAB = 64

# A model a CPU trains in seconds (one layer of width 32); a test adds the vocabulary, batch and
# schedule its assertions rest on, and overrides any of these.
TINY_MODEL = dict(context_length=16, d_model=32, num_layers=1, num_heads=4, d_ff=64)
# Smaller still, for runs whose learning no test looks at.
SMALLEST_MODEL = dict(d_model=16, num_layers=1, num_heads=2, d_ff=32)

REPO = Path(__file__).resolve().parent.parent  # the repository: its benchmarks/ and fixtures


def flags(*presets: dict, **options) -> list[str]:
    """`--name value` for each option of the presets and then of `options` (a later one wins)."""
    merged = {}
    for preset in (*presets, options):
        merged.update(preset)
    return [arg for name, value in merged.items() for arg in (f"--{name}", str(value))]


def train_config(train_data, checkpoint_path, **options) -> TrainConfig:
    """A run of TINY_MODEL on one token file or prepared folder, saved to `checkpoint_path`;
    `options` add to or override the model's fields."""
    fields = {**TINY_MODEL, **options}
    return TrainConfig(train_data=[str(train_data)], checkpoint_path=str(checkpoint_path), **fields)


# The runs the fault tests stop and resume: random tokens of VOCAB ids, a log line every step.
FAULT_RUN = dict(vocab_size=VOCAB, batch_size=4, warmup_iters=2, log_interval=1)
FAULT_RUN_FLAGS = flags(TINY_MODEL, FAULT_RUN, learning_rate=1e-3, eval_interval=10**6)
# The two-process runs (learn learnable_stream in tens of steps); each test sets the layers.
TORCHRUN_RUN = dict(
    TINY_MODEL, vocab_size=VOCAB, batch_size=8, learning_rate=1e-2, min_learning_rate=1e-3, warmup_iters=5
)
# Two layers on a prepared mixed corpus (corpora.prepare_mixed); context 64: room for a prompt
# and 50 generated tokens.
MIXED_CORPUS_RUN = flags(
    TINY_MODEL, context_length=64, num_layers=2, batch_size=8, warmup_iters=2, learning_rate=3e-3, eval_iters=2
)


def learnable_stream(n: int, seed: int = 0) -> np.ndarray:
    """A Markov chain that is almost deterministic: next = (5 * prev + 3) % VOCAB, 5% noise."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.uint16)
    tok = 1
    noise = rng.random(n) < 0.05
    rand = rng.integers(0, VOCAB, n)
    for i in range(n):
        tok = rand[i] if noise[i] else (5 * tok + 3) % VOCAB
        out[i] = tok
    return out


def write_tokens(path: Path, n: int = 50000, seed: int = 0) -> Path:
    """`n` uniformly random token ids below VOCAB, saved as a .npy file (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint16))
    return path


def logged_losses(output: str) -> list[float]:
    """The `Loss:` values of a training log's `Iter` lines."""
    return [float(line.split("Loss:")[1].split("|")[0]) for line in output.splitlines() if line.startswith("Iter")]


# The CLI in this process.


def run_cli(*args, **kwargs):
    """`lmtools ARGS` in this process (arguments may be paths or numbers; `kwargs` go to click's
    runner); returns click's Result (exit_code, output, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def cli_output(*args, code: int = 0) -> str:
    """The output of `lmtools ARGS` in this process, which must end with exit code `code`."""
    result = run_cli(*args)
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result.output


def one_line_error(result, needle: str = "") -> str:
    """A CLI result (click's, or a finished process's) that failed as a user error: exit 2, one
    `error:` line on stderr naming `needle`, no traceback. Returns the line."""
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def error_line(result) -> str:
    """The one `error:` line of a failed command, the last on stderr (warnings may come before);
    asserts exit code 2, exactly one such line and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


# The CLI as real processes.

PROCESS_ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def spawn(*args, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`lmtools ARGS` as a real process."""
    cmd = [sys.executable, "-m", "lmtools.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=PROCESS_ENV)


def train_process(tokens: Path, ckpt: Path, *extra) -> subprocess.Popen:
    """A FAULT_RUN training without end (until a test stops it), as a real process."""
    return spawn(
        "train", "--train_data", tokens, *FAULT_RUN_FLAGS, "--max_iters", "1000000", "--checkpoint_path", ckpt, *extra
    )


def torchrun(*args, script=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m lmtools.cli ARGS` on the CPU (gloo), or
    the Python file `script` instead of the CLI."""
    target = [str(script)] if script is not None else ["-m", "lmtools.cli"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *target,
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=PROCESS_ENV)


def torchrun_training(tmp_path: Path, *extra, num_layers: int = 1) -> tuple[subprocess.CompletedProcess, Path]:
    """80 steps of TORCHRUN_RUN on two processes over learnable_stream(30000), logged every 20,
    checkpointed every 40 to tmp_path/run/ckpt.pt, with the `extra` flags; asserts it succeeded."""
    np.save(tmp_path / "train.npy", learnable_stream(30000))
    ckpt = tmp_path / "run" / "ckpt.pt"
    run_flags = flags(TORCHRUN_RUN, num_layers=num_layers, log_interval=20, eval_interval=1000, checkpoint_interval=40)
    run = torchrun(
        "train",
        "--train_data",
        tmp_path / "train.npy",
        *run_flags,
        *flags(checkpoint_path=ckpt),
        *extra,
        "--max_iters",
        80,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run, ckpt


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    """The lines `proc` printed up to the first that starts with `prefix` (killing it if none comes)."""
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


def read_terminal(primary: int) -> bytes:
    """All a child wrote to the pseudo-terminal whose primary side is `primary`, until it closed."""
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` (made here) with these mount options, unmounted after; the test
    is skipped where mounting is not allowed (it needs root)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
