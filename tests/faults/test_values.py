"""Values nobody validated: flags and stored configs held to sane bounds, a pre-flight memory
estimate, and one line instead of a traceback for hostile files and damaged checkpoints."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import FAULT_RUN_FLAGS, PROCESS_ENV, error_line, run_cli, train_config, write_tokens
from lmtools import load_dataset
from lmtools.checkpoint import read_checkpoint
from lmtools.data.loader import BatchLoader
from lmtools.training.trainer import train_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokens):
    ckpt = tmp_path_factory.mktemp("run") / "ckpt.pt"
    cfg = train_config(
        tokens, ckpt, vocab_size=64, batch_size=4, max_iters=2, log_interval=1, eval_interval=100, checkpoint_interval=2
    )
    train_model(cfg, log=lambda _l: None)
    return ckpt


def _damaged(checkpoint, tmp_path, edit) -> str:
    payload = torch.load(checkpoint, weights_only=True)
    edit(payload)
    out = tmp_path / "damaged" / "ckpt.pt"
    out.parent.mkdir()
    torch.save(payload, out)
    return out


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--batch_size", "100000"], ["cannot fit", "activations", "GiB", "--batch_size"]),
        (["--d_model", "65536", "--num_heads", "16"], ["cannot fit", "weights", "optimizer", "--fsdp"]),
        (["--num_layers", "100000"], ["--num_layers 100,000 is beyond the sane bound"]),
        (["--grad_accum_steps", "1000000000"], ["--grad_accum_steps 1,000,000,000 is beyond"]),
        (["--eval_iters", "1000000000"], ["--eval_iters 1,000,000,000 is beyond"]),
    ],
)
def test_absurd_flags_end_in_one_line(tokens, tmp_path, flags, words):
    result = run_cli(
        "train", "--train_data", tokens, "--max_iters", "2", "--checkpoint_path", tmp_path / "c.pt", *flags
    )
    line = error_line(result)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "c.pt").exists() and not os.listdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--grad_accum_steps", "--eval_iters"])
def test_a_float_count_is_a_usage_error_in_one_line(tokens, tmp_path, flag):
    done = subprocess.run(
        [sys.executable, "-m", "lmtools.cli", "train", "--train_data", str(tokens), flag, "1e9"],
        capture_output=True,
        text=True,
        env=PROCESS_ENV,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], done.stderr


def test_the_memory_estimate_is_in_the_header(tokens, tmp_path):
    result = run_cli(
        "train", "--train_data", tokens, *FAULT_RUN_FLAGS, "--max_iters", "1", "--checkpoint_path", tmp_path / "c.pt"
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("memory :"))
    assert "estimated (weights" in line and "optimizer" in line and "activations" in line and "of RAM" in line


@pytest.mark.parametrize("field, value", [("num_layers", 10**6), ("context_length", 10**9), ("d_model", 2**20)])
def test_absurd_stored_configs_are_refused_by_inspect_resume_and_sample(checkpoint, tmp_path, field, value):
    def edit(payload):
        payload["config"][field] = value
        payload["model_config"][field] = value

    damaged = _damaged(checkpoint, tmp_path, edit)
    for command in (["inspect", damaged], ["resume", damaged, "--max_iters", "4"], ["sample", damaged]):
        line = error_line(run_cli(*command))
        assert f"{field} {value:,} is beyond the sane bound" in line and str(damaged) in line, (command, line)


def test_non_finite_weights_are_named_by_sample(checkpoint, tmp_path):
    def edit(payload):
        payload["model_state_dict"]["layers.0.ffn.w1.weight"][0, 0] = float("nan")

    damaged = _damaged(checkpoint, tmp_path, edit)
    line = error_line(run_cli("sample", damaged, "--prompt", "x"))
    assert "non-finite weights (layers.0.ffn.w1.weight)" in line


def test_a_wrong_shaped_tensor_is_named(checkpoint, tmp_path):
    def edit(payload):
        payload["model_state_dict"]["layers.0.ffn.w1.weight"] = torch.zeros(3, 5)

    damaged = _damaged(checkpoint, tmp_path, edit)
    for command in (["resume", damaged, "--max_iters", "4"], ["sample", damaged]):
        line = error_line(run_cli(*command))
        assert "size mismatch for layers.0.ffn.w1.weight" in line, line


@pytest.mark.parametrize(
    "part, damage",
    [
        ("rng", lambda p: p["rng"].update(numpy="garbage")),
        ("rng", lambda p: p["rng"].update(torch=torch.zeros(3, dtype=torch.uint8))),
        ("sampler", lambda p: p["sampler"].update(step=2**70)),
        ("sampler", lambda p: p["sampler"].update(step="two")),
        ("spikes", lambda p: p["spikes"].update(values=["x"])),
    ],
)
def test_a_damaged_run_state_is_one_line(checkpoint, tmp_path, part, damage):
    damaged = _damaged(checkpoint, tmp_path, damage)
    line = error_line(run_cli("resume", damaged, "--max_iters", "4"))
    assert part in line or "run state" in line, line


def test_a_symlink_loop_is_one_line(tmp_path):
    loop = tmp_path / "loop.npy"
    os.symlink(loop, loop)
    line = error_line(
        run_cli(
            "train", "--train_data", loop, *FAULT_RUN_FLAGS, "--max_iters", "1", "--checkpoint_path", tmp_path / "c.pt"
        )
    )
    assert "symlink loop" in line
    assert "symlink loop" in error_line(run_cli("inspect", loop))


@pytest.mark.slow
def test_a_fifo_named_train_npy_is_refused_not_read(tmp_path):
    fifo = tmp_path / "train.npy"
    os.mkfifo(fifo)
    # Real processes with a deadline: opening a FIFO for reading would block forever.
    for args in (
        ["train", "--train_data", fifo, *FAULT_RUN_FLAGS, "--checkpoint_path", tmp_path / "c.pt"],
        ["inspect", fifo],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "lmtools.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=PROCESS_ENV,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "is a FIFO, not a regular file" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(Exception, match="FIFO"):
        load_dataset(fifo)


def test_a_npy_link_to_an_extensionless_blob_is_judged_by_its_name(tmp_path):
    """The Hugging Face cache keeps files as blobs/<hash>, linked from snapshots/<rev>/<name>."""
    blob = write_tokens(tmp_path / "blobs" / "tmp.npy")
    blob = blob.rename(tmp_path / "blobs" / "9f86d081884c7d659a2feaa0c55ad015")
    link = tmp_path / "snapshots" / "main" / "train.npy"
    link.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
    expected = np.load(blob)
    assert np.array_equal(load_dataset(link), expected)
    assert run_cli("inspect", link).exit_code == 0
    result = run_cli(
        "train", "--train_data", link, *FAULT_RUN_FLAGS, "--max_iters", "2", "--checkpoint_path", tmp_path / "c.pt"
    )
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "c.pt")["config"]["train_data"] == [str(link)]


def test_mixture_weights_whose_sum_overflows_are_normalised(tmp_path):
    a = tmp_path / "a.npy"
    b = tmp_path / "b.npy"
    np.save(a, np.zeros(10000, dtype=np.uint16))
    np.save(b, np.ones(10000, dtype=np.uint16))
    with BatchLoader([f"{a}:1e308", f"{b}:1e308"], 64, 8, prefetch=0) as loader:
        assert [s["weight"] for s in loader.describe()["sources"]] == [0.5, 0.5]
        x, _ = loader.batch_at(0)
    share_b = float((x[:, 0] == 1).float().mean())
    assert 0.25 < share_b < 0.75, share_b
