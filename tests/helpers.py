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


def torchrun(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m lmtools.cli ARGS` on the CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmtools.cli", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
