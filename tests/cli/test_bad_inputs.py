"""The bad-input matrix: user mistakes across all commands.

Each case ends with exit code 2, one line on stderr naming the problem, no traceback, and every
file that existed before (a previous checkpoint among them) byte for byte unchanged.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SMALLEST_MODEL, flags, one_line_error, run_cli, tmpfs
from lmtools import TransformerLM, save_checkpoint
from lmtools.training.optim import make_optimizer

# The smallest run that trains, evaluates and checkpoints: two steps, evaluated at each.
TINY_TWO_STEP_RUN = dict(SMALLEST_MODEL, vocab_size=64, context_length=8, batch_size=2, max_iters=2, warmup_iters=1)
TINY_TWO_STEP_RUN |= dict(eval_interval=1, log_interval=1, eval_iters=1)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def build_world(root: Path) -> None:
    """Files every case may refer to, plus a previous run that must survive every mistake."""
    rng = np.random.default_rng(0)
    np.save(root / "good.npy", rng.integers(0, 64, 2000).astype(np.uint16))
    (root / "empty.npy").write_bytes(b"")
    good = (root / "good.npy").read_bytes()
    (root / "truncated.npy").write_bytes(good[: len(good) // 2])
    (root / "text.npy").write_text("this is not a token file\n" * 20)
    np.save(root / "float.npy", rng.random(2000).astype(np.float32))
    np.save(root / "twod.npy", rng.integers(0, 64, (40, 50)).astype(np.uint16))
    np.save(root / "short.npy", np.arange(5, dtype=np.uint16))
    np.save(root / "negative.npy", np.concatenate([np.arange(100), [-1]]).astype(np.int32))
    rng.integers(0, 64, 2000).astype(np.uint16).tofile(root / "raw.bin")
    (root / "not_a_folder").write_text("a file")
    (root / "corpus.txt").write_text("hello world, " * 200)
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 40)
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=64, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    cfg = {
        "train_data": [str(root / "good.npy")],
        "vocab_size": 64,
        "context_length": 8,
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "d_ff": 32,
        "batch_size": 2,
        "max_iters": 2,
        "checkpoint_path": str(run / "ckpt.pt"),
    }
    save_checkpoint(
        model,
        make_optimizer(model, 1e-3, 0.01, torch.device("cpu")),
        1,
        run / "ckpt.pt",
        config=cfg,
        model_config=model.config.to_dict(),
    )
    (root / "corrupt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:300])
    torch.save({"model_state_dict": {}, "iteration": 1, "x": Evil()}, root / "evil.pt")


# (name, argv with {r} for the world folder, a word the error line must contain)
CASES = [
    ("train: missing file", "train --train_data {r}/missing.npy", "missing.npy"),
    ("train: empty file", "train --train_data {r}/empty.npy", "empty.npy"),
    ("train: truncated npy", "train --train_data {r}/truncated.npy", "truncated.npy"),
    ("train: text named .npy", "train --train_data {r}/text.npy", "text.npy"),
    ("train: float tokens", "train --train_data {r}/float.npy", "float"),
    ("train: 2-D tokens", "train --train_data {r}/twod.npy", "twod.npy"),
    ("train: too short for the context", "train --train_data {r}/short.npy", "short.npy"),
    ("train: token id beyond vocab", "train --train_data {r}/good.npy --vocab_size 10", "--vocab_size"),
    ("train: negative token id", "train --train_data {r}/negative.npy", "negative"),
    ("train: .bin without dtype", "train --train_data {r}/raw.bin", "dtype"),
    ("train: missing val file", "train --train_data {r}/good.npy --val_data {r}/nope.npy", "nope.npy"),
    ("train: heads do not divide width", "train --train_data {r}/good.npy --num_heads 3", "num_heads"),
    ("train: zero batch size", "train --train_data {r}/good.npy --batch_size 0", "batch_size"),
    ("train: negative context", "train --train_data {r}/good.npy --context_length -4", "context_length"),
    ("train: zero layers", "train --train_data {r}/good.npy --num_layers 0", "num_layers"),
    ("train: negative learning rate", "train --train_data {r}/good.npy --learning_rate -0.1", "learning_rate"),
    ("train: min lr above max", "train --train_data {r}/good.npy --min_learning_rate 1", "min_learning_rate"),
    ("train: zero log interval", "train --train_data {r}/good.npy --log_interval 0", "log_interval"),
    ("train: zero eval interval", "train --train_data {r}/good.npy --eval_interval 0", "eval_interval"),
    (
        "train: zero checkpoint interval",
        "train --train_data {r}/good.npy --checkpoint_interval 0",
        "checkpoint_interval",
    ),
    ("train: negative warmup", "train --train_data {r}/good.npy --warmup_iters -1", "warmup_iters"),
    ("train: zero max iters", "train --train_data {r}/good.npy --max_iters 0", "max_iters"),
    ("train: negative clip", "train --train_data {r}/good.npy --gradient_clip_val -1", "gradient_clip_val"),
    ("train: unknown dtype", "train --train_data {r}/good.npy --dtype float8", "dtype"),
    ("train: unknown device", "train --train_data {r}/good.npy --device tpu", "device"),
    ("train: cuda without a GPU", "train --train_data {r}/good.npy --device cuda", "CUDA"),
    ("train: bad mixture weight", "train --train_data {r}/good.npy:-1", "weight"),
    (
        "train: checkpoint folder is a file",
        "train --train_data {r}/good.npy --checkpoint_path {r}/not_a_folder/c.pt",
        "not_a_folder",
    ),
    ("train: would overwrite a run", "train --train_data {r}/good.npy --checkpoint_path {r}/run/ckpt.pt", "--resume"),
    (
        "train --resume: missing checkpoint",
        "train --resume --train_data {r}/good.npy --checkpoint_path {r}/absent.pt",
        "absent.pt",
    ),
    (
        "train --resume: contradicting model",
        "train --resume --train_data {r}/good.npy --checkpoint_path {r}/run/ckpt.pt --d_model 32",
        "contradicts",
    ),
    (
        "train --resume: hostile checkpoint",
        "train --resume --train_data {r}/good.npy --checkpoint_path {r}/evil.pt",
        "refusing",
    ),
    ("resume: missing checkpoint", "resume {r}/absent.pt", "absent.pt"),
    ("resume: corrupted checkpoint", "resume {r}/corrupt.pt", "corrupt"),
    ("resume: hostile checkpoint", "resume {r}/evil.pt", "refusing"),
    ("resume: a token file", "resume {r}/good.npy", "good.npy"),
    ("sample: missing checkpoint", "sample {r}/absent.pt --prompt hi", "absent.pt"),
    ("sample: hostile checkpoint", "sample {r}/evil.pt --prompt hi", "refusing"),
    ("sample: no tokenizer", "sample {r}/run/ckpt.pt --prompt hi", "tokenizer"),
    ("sample: zero new tokens", "sample {r}/run/ckpt.pt --max_new_tokens 0", "max_new_tokens"),
    ("inspect: hostile checkpoint", "inspect {r}/evil.pt", "evil.pt"),
    ("inspect: missing path", "inspect {r}/absent.pt", "absent.pt"),
    ("inspect: text named .npy", "inspect {r}/text.npy", "text.npy"),
    ("prepare: missing input", "prepare {r}/missing.txt --out {r}/data1", "missing.txt"),
    ("prepare: empty input", "prepare {r}/empty.txt --out {r}/data2", "empty"),
    ("prepare: binary input", "prepare {r}/binary.txt --out {r}/data3", "binary"),
    ("prepare: vocab too small", "prepare {r}/corpus.txt --out {r}/data4 --vocab_size 100", "vocab"),
]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world(root)
    return root


@pytest.mark.parametrize("name, argv, word", CASES, ids=[c[0] for c in CASES])
def test_mistake_exits_2_with_one_line(world, tmp_path, name, argv, word, monkeypatch):
    root = tmp_path / "w"
    shutil.copytree(world, root)
    monkeypatch.chdir(tmp_path)
    before = _digest(root)
    args = argv.format(r=root).split()
    if args[0] == "train":
        if "--resume" not in args:
            # The tiny model's flags, except those the case sets itself.
            args += flags({name: value for name, value in TINY_TWO_STEP_RUN.items() if f"--{name}" not in args})
        if "--checkpoint_path" not in args:
            args += ["--checkpoint_path", str(tmp_path / "new" / "ckpt.pt")]
    result = run_cli(*args)
    assert result.exit_code == 2, (name, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # One error line, last; before it at most progress lines of a command that had started.
    assert len(errors) == 1 and lines[-1] == errors[0], (name, result.stderr)
    assert word.lower() in errors[0].lower(), (name, errors[0])
    assert "Traceback" not in result.output
    assert _digest(root) == before, name
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_disk_full_during_checkpoint_keeps_previous(world, tmp_path):
    """A 64 KiB tmpfs holds the previous checkpoint; the next write runs out of space."""
    with tmpfs(tmp_path / "small", "size=160k") as mnt:
        shutil.copy(world / "run" / "ckpt.pt", mnt / "ckpt.pt")
        # Fill the rest so that a second copy of the checkpoint cannot fit.
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 4096))
        before = (mnt / "ckpt.pt").read_bytes()
        one_line_error(run_cli("resume", mnt / "ckpt.pt", "--max_iters", "2"), "No space left")
        assert (mnt / "ckpt.pt").read_bytes() == before
        assert not [p for p in mnt.iterdir() if p.name.endswith(".tmp")]


def test_matrix_is_wide():
    assert len(CASES) >= 30
    assert {c[1].split()[0] for c in CASES} == {"train", "resume", "sample", "inspect", "prepare"}


@pytest.mark.parametrize(
    "argv, word",
    [
        (["train", "--train_data", "x.npy", "--batch_size", "abc"], "--batch_size"),
        (["train", "--bogus", "1"], "--bogus"),
        (["sample"], "checkpoint"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_usage_mistakes_through_the_console_script_are_one_line(argv, word, tmp_path):
    """Mistakes click itself catches (types, unknown flags, missing arguments), as a user sees them."""
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lmtools", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], result.stderr
    assert result.stdout == ""
