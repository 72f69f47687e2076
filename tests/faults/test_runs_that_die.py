"""Runs that die: signals, kill -9 at random moments, non-finite losses. Real processes, real signals."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import FAULT_RUN, spawn, train_config, train_process, wait_for_line
from lmtools.checkpoint import read_checkpoint
from lmtools.config.train_config import TrainConfig
from lmtools.training.numerics import TrainingDiverged
from lmtools.training.trainer import train_model

pytestmark = pytest.mark.slow


def test_second_signal_exits_at_once_and_damages_nothing(tokens, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    proc = train_process(tokens, ckpt, "--checkpoint_interval", "2")
    wait_for_line(proc, "Saved checkpoint at iter 4")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
    assert read_checkpoint(ckpt)["iteration"] >= 4


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tokens, tmp_path):
    """Checkpoint every step (so kills land mid-write often), kill -9 at random times, reload."""
    ckpt = tmp_path / "ckpt.pt"
    rng = random.Random(1234)
    last = 0
    resume = False
    for _attempt in range(10):
        extra = ["--checkpoint_interval", "1"]
        proc = (
            spawn("resume", ckpt, "--max_iters", "1000000")
            if resume
            else train_process(tokens, ckpt, *extra, "--d_model", "128", "--d_ff", "512")
        )
        wait_for_line(proc, "Saved checkpoint")
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        payload = read_checkpoint(ckpt)  # raises if torn
        assert payload["iteration"] >= last
        last = payload["iteration"]
        resume = True
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ckpt.pt", "metrics.jsonl")]
    # A kill mid-write may leave a temp file, and the lock files of the killed run (no longer
    # held: the kernel released them); neither ever replaces the checkpoint.
    assert all(name.endswith((".tmp", ".lock")) for name in leftovers), leftovers
    # The next run takes the released locks and removes the dead writers' temp files.
    done = subprocess.run(
        [sys.executable, "-m", "lmtools.cli", "resume", str(ckpt), "--max_iters", str(last + 2)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "metrics.jsonl"]


# A learning rate of 1e30 sends the weights past float32's range after one update.
EXPLODING_RUN = FAULT_RUN | dict(learning_rate=1e30, min_learning_rate=1e30, warmup_iters=0, max_iters=6)


def _exploding_config(tokens: Path, tmp_path: Path, **kw) -> TrainConfig:
    run = EXPLODING_RUN | dict(eval_interval=100, checkpoint_interval=1, gradient_clip_val=1e30) | kw
    return train_config(tokens, tmp_path / "ckpt.pt", **run)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tokens, tmp_path):
    with pytest.raises(TrainingDiverged, match="non-finite") as info:
        train_model(_exploding_config(tokens, tmp_path), log=lambda _l: None)
    bad_iter = int(str(info.value).split("at iter ")[1].split(";")[0])
    payload = read_checkpoint(tmp_path / "ckpt.pt")
    assert payload["iteration"] == bad_iter - 1


def test_skip_nonfinite_counts_skipped_steps(tokens, tmp_path):
    lines = []
    result = train_model(_exploding_config(tokens, tmp_path, skip_nonfinite=True), log=lines.append)
    assert result.iteration == 6 and result.skipped_steps >= 1
    assert any(line.startswith("Skipped update at iter") for line in lines)
    assert read_checkpoint(tmp_path / "ckpt.pt")["skipped_steps"] == result.skipped_steps


@pytest.mark.parametrize("skip", [False, True])
def test_loss_spike_is_logged_and_skipped_on_request(tokens, tmp_path, skip):
    """A stream that switches from a memorised pattern to noise makes the loss jump."""
    easy = np.tile(np.arange(16, dtype=np.uint16), 4000)
    path = tmp_path / "easy.npy"
    np.save(path, easy)
    cfg = _exploding_config(
        path,
        tmp_path,
        learning_rate=1e-2,
        min_learning_rate=1e-2,
        max_iters=60,
        gradient_clip_val=1.0,
        checkpoint_interval=1000,
    )
    train_model(cfg, log=lambda _l: None)
    before = read_checkpoint(cfg.checkpoint_path)["model_state_dict"]
    np.save(path, np.random.default_rng(0).integers(0, 64, len(easy)).astype(np.uint16))
    lines = []
    result = train_model(
        TrainConfig(max_iters=61, checkpoint_path=cfg.checkpoint_path, skip_spikes=skip),
        resume_from=cfg.checkpoint_path,
        explicit=frozenset({"max_iters", "checkpoint_path", "skip_spikes"}),
        log=lines.append,
        allow_data_change=True,  # the switch to noise is the point
    )
    assert any(line.startswith("Loss spike at iter 61") for line in lines), lines
    after = read_checkpoint(cfg.checkpoint_path)["model_state_dict"]
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    if skip:
        assert "Skipped update at iter 61: loss spike (1 skipped so far)" in lines
        assert result.skipped_steps == 1 and unchanged
    else:
        assert result.skipped_steps == 0 and not unchanged


def test_nonfinite_loss_found_at_a_later_read_names_its_step_and_saves_nothing_after_it(tokens, tmp_path):
    """Losses are read at log points and checkpoints; the first bad step is still the one reported."""
    cfg = _exploding_config(tokens, tmp_path, max_iters=12, log_interval=5, checkpoint_interval=5)
    lines = []
    with pytest.raises(TrainingDiverged, match="non-finite") as info:
        train_model(cfg, log=lines.append)
    bad_iter = int(str(info.value).split("at iter ")[1].split(";")[0])
    assert bad_iter < 5  # the first update already sends the weights past float32's range
    assert not (tmp_path / "ckpt.pt").exists()
    # Only the line before training (iter 0, the initial weights' loss) was logged.
    assert [line.split("|")[0] for line in lines if line.startswith(("Iter", "Saved"))] == ["Iter      0 "], lines


@pytest.mark.parametrize("read_every", [1, 4])
def test_nonfinite_updates_are_skipped_on_the_device_between_reads(tokens, tmp_path, read_every):
    """With --skip_nonfinite the skip needs no wait for the host: read every step or every
    fourth, the same steps are skipped, counted and named, and the weights stay finite."""
    cfg = _exploding_config(
        tokens, tmp_path, skip_nonfinite=True, max_iters=8, log_interval=read_every, checkpoint_interval=read_every
    )
    lines = []
    result = train_model(cfg, log=lines.append)
    skipped_at = [int(line.split("at iter ")[1].split(":")[0]) for line in lines if line.startswith("Skipped update")]
    # The first update sends the weights near float32's limit; every later step overflows.
    assert skipped_at == list(range(2, 9)) and result.skipped_steps == 7
    assert "non-finite" in next(line for line in lines if line.startswith("Skipped update"))
    payload = read_checkpoint(tmp_path / "ckpt.pt")
    assert payload["skipped_steps"] == 7
    assert all(torch.isfinite(v).all() for v in payload["model_state_dict"].values())
    # Skipped updates leave the optimizer's step count alone too.
    steps = {int(s["step"]) for s in payload["optimizer_state_dict"]["state"].values()}
    assert steps == {1}
