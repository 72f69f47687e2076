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
TORCHRUN_MODEL = [
    "--vocab_size",
    "64",
    "--context_length",
    "16",
    "--d_model",
    "32",
    "--num_heads",
    "4",
    "--d_ff",
    "64",
    "--batch_size",
    "8",
    "--learning_rate",
    "1e-2",
    "--min_learning_rate",
    "1e-3",
    "--warmup_iters",
    "5",
]


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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def logged_losses(output: str) -> list[float]:
    """The `Loss:` values of a training log's `Iter` lines."""
    return [float(line.split("Loss:")[1].split("|")[0]) for line in output.splitlines() if line.startswith("Iter")]


# Prose, code and non-ASCII text, as the documents of a jsonl corpus.
_WORDS = (
    "the cat sat on a mat and the dog ran to the café über naïve Straße 東京 日本語 "
    "once upon a time there was a small model"
).split()
_CODE = ("def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n", "if a == b:\n    c = {'k': [1, 2]}\n")


def mixed_documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        prose = " ".join(rng.choice(_WORDS, int(rng.integers(20, 60))))
        docs.append(prose + "\n" + _CODE[int(rng.integers(len(_CODE)))] if rng.random() < 0.4 else prose)
    return docs


# A tiny model the CLI trains in seconds on a prepared mixed corpus (context 64: room for a
# prompt and 50 generated tokens).
TINY_MODEL = [
    "--context_length",
    "64",
    "--d_model",
    "32",
    "--num_layers",
    "2",
    "--num_heads",
    "4",
    "--d_ff",
    "64",
    "--batch_size",
    "8",
    "--warmup_iters",
    "2",
    "--learning_rate",
    "3e-3",
    "--eval_iters",
    "2",
]


def prepare_mixed(root, n_docs: int = 300) -> "os.PathLike":
    """`lmtools prepare` on a jsonl corpus of mixed documents; returns the prepared folder."""
    import json

    from typer.testing import CliRunner

    from lmtools.cli import app

    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in mixed_documents(n_docs):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    data = root / "data"
    result = CliRunner().invoke(
        app, ["prepare", str(corpus), "--out", str(data), "--vocab_size", "400", "--val_fraction", "0.1"]
    )
    assert result.exit_code == 0, result.output
    return data


def one_line_error(result, needle: str) -> None:
    """A CLI result (click's) that failed as a user error: exit 2, one line on stderr naming `needle`."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
