"""Shared by the tests: a token stream a tiny model can learn, and a two-process torchrun."""

import os
import subprocess
import sys

import numpy as np

VOCAB = 64


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


# A tiny model and schedule for the two-process runs (learns learnable_stream in tens of steps).
TORCHRUN_MODEL = ["--vocab_size", "64", "--context_length", "16", "--d_model", "32", "--num_heads", "4",
                  "--d_ff", "64", "--batch_size", "8", "--learning_rate", "1e-2", "--min_learning_rate", "1e-3",
                  "--warmup_iters", "5"]


def torchrun(*args, script=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m lmtools.cli ARGS` on the CPU (gloo), or
    the Python file `script` instead of the CLI."""
    target = [str(script)] if script is not None else ["-m", "lmtools.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *target, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def logged_losses(output: str) -> list[float]:
    """The `Loss:` values of a training log's `Iter` lines."""
    return [float(line.split("Loss:")[1].split("|")[0]) for line in output.splitlines() if line.startswith("Iter")]
