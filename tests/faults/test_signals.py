"""Runs lost to ordinary events: every stop signal, a second signal inside a long native call,
stop requests inside evaluation and accumulation, a closed console, a damaged metrics log,
temporary files of killed writers. Real processes, real signals."""

import json
import os
import signal
import time
from functools import partial

import pytest

from helpers import FAULT_RUN, dead_pid, run_cli, train_config, train_process, wait_for, wait_for_line, write_tokens
from lmtools.checkpoint import read_checkpoint
from lmtools.training.trainer import train_model


def _stopped_at(out: str) -> int:
    assert "Stopped by signal at iter" in out, out
    return int(out.split("Stopped by signal at iter")[1].split(";")[0])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_each_stop_signal_writes_a_checkpoint_and_exits_0(tokens, tmp_path, sig):
    ckpt = tmp_path / "ckpt.pt"
    proc = train_process(tokens, ckpt, "--checkpoint_interval", "1000000")
    wait_for_line(proc, "Iter      3")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped_at = _stopped_at(out)
    payload = read_checkpoint(ckpt)
    assert payload["iteration"] == stopped_at >= 3 and payload["sampler"]["step"] == stopped_at


# Inside the run's stop handling, one native call of seconds (three 4096^3 matmuls on one thread).
LONG_NATIVE_CALL = """
import torch
from lmtools.runtime.signals import StopSignal
torch.set_num_threads(1)
a = torch.randn(4096, 4096)
with StopSignal() as stop:
    print("inside", flush=True)
    torch.linalg.multi_dot([a, a, a, a])
    print("returned", stop.requested, flush=True)
"""


@pytest.mark.slow
def test_a_second_signal_ends_a_long_native_call_at_once(tmp_path):
    """The first signal asks the run to stop at its next chance; none comes inside one long
    native call (a step's passes check at every module, so a training step itself gives one
    soon: see tests/training/test_first_hour.py). The second ends the process there: the kernel's
    default action, restored by the first handler (-SIGTERM), or the watcher thread when the
    handler has not run yet (128 + SIGTERM)."""
    import subprocess
    import sys

    from helpers import PROCESS_ENV

    proc = subprocess.Popen(
        [sys.executable, "-c", LONG_NATIVE_CALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=PROCESS_ENV,
    )
    wait_for_line(proc, "inside")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), (proc.returncode, out, err)
    assert "returned" not in out and "Traceback" not in err


@pytest.mark.slow
def test_a_signal_ends_a_long_evaluation_between_batches(tokens, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    val = write_tokens(tmp_path / "val.npy", seed=1)
    proc = train_process(
        tokens,
        ckpt,
        "--val_data",
        val,
        "--eval_interval",
        "1",
        "--eval_iters",
        "100000",
        "--batch_size",
        "64",
        "--checkpoint_interval",
        "1000000",
    )
    wait_for_line(proc, "memory :")
    time.sleep(2.0)  # iter 0's validation before step 1, 100000 batches, would take minutes
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _stopped_at(out) == 0  # no step begins after the signal
    assert read_checkpoint(ckpt)["iteration"] == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["iter"] == 0 and record.get("val_loss") is None  # no partial value reported


@pytest.mark.slow
def test_a_signal_ends_a_long_accumulation_between_micro_batches(tokens, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    proc = train_process(tokens, ckpt, "--grad_accum_steps", "100000", "--checkpoint_interval", "1000000")
    wait_for_line(proc, "memory :")
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _stopped_at(out) == 0
    payload = read_checkpoint(ckpt)
    # The unfinished step is dropped whole: the loader is back at its first micro-batch.
    assert payload["iteration"] == 0 and payload["sampler"]["step"] == 0 and payload["sampler"]["micro"] == 0
    assert all(not s for s in payload["optimizer_state_dict"]["state"].values())


@pytest.mark.slow
def test_a_closed_stdout_pipe_does_not_stop_training(tokens, tmp_path):
    """`lmtools train ... | head -1`: the reader goes away, training and its files go on."""
    ckpt = tmp_path / "ckpt.pt"
    proc = train_process(tokens, ckpt, "--checkpoint_interval", "5")
    wait_for_line(proc, "Iter      2")
    proc.stdout.close()
    metrics = tmp_path / "metrics.jsonl"

    def last_iter() -> int:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["iter"] if lines else 0

    wait_for(lambda: last_iter() >= 30, what="training to go on after the pipe closed")
    assert proc.poll() is None
    wait_for(lambda: read_checkpoint(ckpt)["iteration"] >= 30 if ckpt.exists() else False, what="checkpoints")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert read_checkpoint(ckpt)["iteration"] >= last_iter() - 1


# Four steps, checkpointed every two, never evaluated.
_config = partial(train_config, **FAULT_RUN, max_iters=4, eval_interval=1000, checkpoint_interval=2)


def test_damaged_metrics_lines_are_skipped_with_a_warning_on_resume_and_plot(tokens, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train_model(_config(tokens, ckpt), log=lambda _l: None)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(b"[1]\n")
        f.write(b'{"iter": "5", "loss": 1.0}\n')
        f.write(b'{"iter": 3, "loss": \xff}\n')
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        f.write(b'{"iter": 2, "loss": NaN, "val_loss": Infinity}\n')
        f.write(b'{"iter": 9, "lo')  # torn
    plot = run_cli("plot", tmp_path, "--out", tmp_path / "loss.png")
    assert plot.exit_code == 0, plot.output
    assert "skipped 5 damaged line(s)" in plot.stderr
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"

    lines = []
    train_model(
        _config(tokens, ckpt, max_iters=6), resume_from=str(ckpt), explicit=frozenset({"max_iters"}), log=lines.append
    )
    assert any("skipped 5 damaged line(s)" in line for line in lines), lines
    iters = [json.loads(x)["iter"] for x in metrics.read_text().splitlines()]
    assert iters == [0, 1, 2, 3, 4, 2, 5, 6]  # the NaN record of iter 2 is a record; the rest is gone


def test_temp_files_of_dead_writers_are_removed_by_the_next_run(tokens, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    gone = dead_pid()
    stale = [
        tmp_path / f".ckpt.pt.{gone}.tmp",
        tmp_path / f".ckpt-00000002.pt.{gone}.tmp",
        tmp_path / f".metrics.jsonl.{gone}.tmp",
    ]
    live = tmp_path / f".other.pt.{os.getpid()}.tmp"  # a live writer's: never touched
    for path in (*stale, live):
        path.write_bytes(b"\0" * 1000)
    train_model(_config(tokens, ckpt), log=lambda _l: None)
    assert not any(p.exists() for p in stale)
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", "metrics.jsonl", live.name])
