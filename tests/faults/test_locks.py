"""Data destroyed: a checkpoint path guarded by a lock, --overwrite only over checkpoints,
fresh metrics for a new run, and rollbacks only on request. Real second processes."""

import json
import os
import signal
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

from helpers import (
    FAULT_RUN,
    FAULT_RUN_FLAGS,
    error_line,
    run_cli,
    spawn,
    train_config,
    train_process,
    wait_for_line,
    write_tokens,
)
from lmtools.checkpoint import read_checkpoint, snapshot_path
from lmtools.runtime.lock import Busy, exclusive, lock_path_for
from lmtools.training.trainer import train_model

# Checkpointed every two steps, never evaluated.
tiny_config = partial(
    train_config, **FAULT_RUN, learning_rate=1e-3, max_iters=10, eval_interval=1000, checkpoint_interval=2
)


def test_overwrite_never_replaces_a_token_file(tmp_path):
    data = write_tokens(tmp_path / "data" / "train.npy")
    before = data.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = run_cli(
            "train", "--train_data", data, *FAULT_RUN_FLAGS, "--max_iters", "2", "--checkpoint_path", data, *extra
        )
        line = error_line(result)
        assert "not an lmtools checkpoint" in line and str(data) in line
        assert "--overwrite" not in line  # never suggested for a file that is not a checkpoint
    assert data.read_bytes() == before
    assert np.load(data).shape == (50000,)


def test_overwrite_replaces_a_checkpoint_and_starts_fresh_metrics(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy")
    ckpt = tmp_path / "run" / "ckpt.pt"
    train_model(tiny_config(tokens, ckpt, max_iters=6), log=lambda _l: None)
    refused = run_cli("train", "--train_data", tokens, *FAULT_RUN_FLAGS, "--max_iters", "4", "--checkpoint_path", ckpt)
    assert "--overwrite" in error_line(refused)
    lines = []
    train_model(tiny_config(tokens, ckpt, max_iters=4, overwrite=True, seed=7), log=lines.append)
    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 1, 2, 3, 4]  # the new run only (from its first-step record)
    moved = [p for p in ckpt.parent.glob("metrics-*.jsonl")]
    assert len(moved) == 1 and [json.loads(x)["iter"] for x in moved[0].read_text().splitlines()] == list(range(0, 7))
    assert any("moved to " + moved[0].name in line for line in lines)
    assert read_checkpoint(ckpt)["iteration"] == 4


def test_the_lock_names_the_holder_and_the_kernel_releases_it(tmp_path):
    lock_file = lock_path_for(tmp_path / "ckpt.pt")
    # A real second process holds the lock; then it is killed with SIGKILL (no clean-up runs).
    code = (
        "import sys, time; from pathlib import Path; from lmtools.runtime.lock import exclusive; "
        "ctx = exclusive(Path(sys.argv[1]), 'x', 'y'); ctx.__enter__(); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(Busy) as info:
        with exclusive(lock_file, "the checkpoint", "wait"):
            pass
    assert info.value.pid == proc.pid and f"PID {proc.pid}" in str(info.value)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_file.exists()  # left behind by the kill ...
    with exclusive(lock_file, "the checkpoint", "wait"):  # ... but no longer held by anyone
        assert int(lock_file.read_text()) == os.getpid()
    assert not lock_file.exists()


@pytest.mark.slow
def test_a_second_run_or_resume_on_a_busy_checkpoint_fails_at_once_naming_the_holder(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy")
    ckpt = tmp_path / "run" / "ckpt.pt"
    first = train_process(tokens, ckpt, "--checkpoint_interval", "2")
    try:
        wait_for_line(first, "Saved checkpoint at iter 2")
        for args in (
            [
                "train",
                "--train_data",
                tokens,
                *FAULT_RUN_FLAGS,
                "--max_iters",
                "5",
                "--checkpoint_path",
                ckpt,
                "--overwrite",
            ],
            ["train", "--train_data", tokens, *FAULT_RUN_FLAGS, "--checkpoint_path", ckpt, "--resume"],
            ["resume", ckpt],
        ):
            second = spawn(*args)
            out, err = second.communicate(timeout=120)
            assert second.returncode == 2, (args, out, err)
            assert f"the checkpoint {ckpt} is in use by another process (PID {first.pid})" in err, err
            assert "Traceback" not in err
        assert first.poll() is None  # the first run is untouched and still training
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The holder died without releasing: the kernel did, so the run can be resumed now.
    resumed = spawn("resume", ckpt, "--max_iters", str(read_checkpoint(ckpt)["iteration"] + 2))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "Training finished" in out
    assert not lock_path_for(ckpt).exists()


def test_rollback_to_an_older_snapshot_is_explicit_announced_and_keeps_its_source(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy")
    ckpt = tmp_path / "run" / "ckpt.pt"
    train_model(tiny_config(tokens, ckpt, max_iters=10, keep_last=3), log=lambda _l: None)
    old = snapshot_path(ckpt, 6)
    assert sorted(p.name for p in ckpt.parent.glob("ckpt-*.pt")) == [
        "ckpt-00000006.pt",
        "ckpt-00000008.pt",
        "ckpt-00000010.pt",
    ]

    refused = run_cli("resume", old, "--max_iters", "14")
    line = error_line(refused)
    assert "reached iter 10" in line and "--rollback" in line and "7..10" in line
    assert read_checkpoint(ckpt)["iteration"] == 10  # nothing changed

    result = run_cli("resume", old, "--max_iters", "14", "--rollback")
    assert result.exit_code == 0, result.output
    assert "Rolling back to iter 6: iters 7..10 are discarded" in result.stdout
    assert read_checkpoint(ckpt)["iteration"] == 14
    assert old.exists()  # the file the run started from is never pruned
    iters = [json.loads(x)["iter"] for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert iters == list(range(0, 15))  # the discarded records 7..10 are gone, each step logged once


def test_resume_past_max_iters_says_so(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy")
    ckpt = tmp_path / "ckpt.pt"
    train_model(tiny_config(tokens, ckpt, max_iters=4), log=lambda _l: None)
    line = error_line(run_cli("resume", ckpt))
    assert "at iter 4, at or past --max_iters 4" in line and "--max_iters above 4" in line
    line = error_line(run_cli("resume", ckpt, "--max_iters", "3"))
    assert "nothing left to train" in line
