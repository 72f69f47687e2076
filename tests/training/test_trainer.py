"""The training core and the `train` / `resume` commands, end to end on a learnable stream."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL, VOCAB, flags, learnable_stream, one_line_error, read_terminal, train_config
from lmtools.checkpoint import read_checkpoint
from lmtools.config.train_config import TrainConfig
from lmtools.training.schedule import lr_at
from lmtools.training.trainer import train_model


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    np.save(folder / "train.npy", learnable_stream(20000, 0))
    np.save(folder / "val.npy", learnable_stream(4000, 1))
    return folder


# A model small enough for seconds on a CPU and big enough to learn the learnable stream.
TINY_LEARNER = flags(TINY_MODEL, vocab_size=VOCAB, num_layers=2, batch_size=16)
# The runs in process: smaller batches, a validation loss every five steps.
LEARNER_RUN = dict(vocab_size=VOCAB, num_layers=2, batch_size=8, learning_rate=3e-3, min_learning_rate=3e-4)


def tiny_config(folder: Path, tmp_path: Path, **kw) -> TrainConfig:
    schedule = dict(
        warmup_iters=5, max_iters=20, eval_interval=5, eval_iters=2, log_interval=1, checkpoint_interval=1000
    )
    run = LEARNER_RUN | schedule | dict(val_data=str(folder / "val.npy")) | kw
    return train_config(folder / "train.npy", tmp_path / "ckpt.pt", **run)


@pytest.mark.slow
def test_cli_learns_then_resumes(stream_files, tmp_path, run_cli):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    result = run_cli(
        "train",
        "--train_data",
        stream_files / "train.npy",
        "--val-data",
        stream_files / "val.npy",
        *TINY_LEARNER,
        *flags(
            learning_rate=1e-2,
            min_learning_rate=1e-3,
            warmup_iters=10,
            max_iters=150,
            eval_interval=50,
            log_interval=25,
            checkpoint_interval=100,
            checkpoint_path=ckpt,
            seed=1,
        ),
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "train.npy" in out and "20,000 tokens" in out and "uint16" in out and "memory-mapped" in out
    assert "2 layers" in out and "device : cpu" in out and "16 x context 16" in out
    iters = [line for line in out.splitlines() if line.startswith("Iter ")]
    # Iter 0: the initial loss, about ln(64) = 4.16, and the validation loss before training.
    assert [int(line.split("|")[0].split()[1]) for line in iters] == [0, 25, 50, 75, 100, 125, 150]
    val = [float(line.split("Val Loss:")[1].split("|")[0]) for line in iters if "Val Loss" in line]
    assert len(val) == 4 and abs(val[0] - math.log(64)) < 0.5
    last_loss = float(iters[-1].split("Loss:")[1].split("|")[0])
    # ln(64) = 4.16; the chain's entropy is about 0.3 nats.
    assert last_loss < 1.2 and val[-1] < 1.2, out
    assert "Saved checkpoint at iter 100" in out and "Saved checkpoint at iter 150" in out
    assert f"Final checkpoint: {ckpt}" in out

    metrics = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics] == [0, 25, 50, 75, 100, 125, 150]
    assert all(m["tokens_per_s"] > 0 and 0 <= m["data_wait"] < 1 for m in metrics[1:])
    assert "val_loss" in metrics[0] and "val_loss" in metrics[2] and "val_loss" not in metrics[1]

    result = run_cli("resume", ckpt, "--max_iters", "175")
    assert result.exit_code == 0, result.output
    assert "Resumed from" in result.output and "at iter 150" in result.output
    iters = [line for line in result.output.splitlines() if line.startswith("Iter ")]
    assert [int(line.split("|")[0].split()[1]) for line in iters] == [175]
    payload = read_checkpoint(ckpt)
    assert payload["iteration"] == 175 and payload["config"]["max_iters"] == 175
    assert payload["sampler"]["step"] == 175


def _losses_and_weights(cfg):
    result = train_model(cfg, log=lambda _line: None)
    return result.losses, read_checkpoint(cfg.checkpoint_path)["model_state_dict"]


@pytest.mark.parametrize("accum", [1, 3])
def test_exact_resume_bit_for_bit(stream_files, tmp_path, accum):
    straight = tiny_config(stream_files, tmp_path / "a", max_iters=12, cosine_cycle_iters=12, grad_accum_steps=accum)
    (tmp_path / "a").mkdir()
    losses_straight, weights_straight = _losses_and_weights(straight)

    (tmp_path / "b").mkdir()
    # The same schedule as the straight run, stopped half way.
    first = tiny_config(stream_files, tmp_path / "b", max_iters=6, cosine_cycle_iters=12, grad_accum_steps=accum)
    losses_first, _ = _losses_and_weights(first)
    second = TrainConfig(max_iters=12, checkpoint_path=first.checkpoint_path)
    result = train_model(
        second,
        resume_from=first.checkpoint_path,
        explicit=frozenset({"max_iters", "checkpoint_path"}),
        log=lambda _line: None,
    )
    assert losses_first + result.losses == losses_straight  # exact float equality
    weights = read_checkpoint(first.checkpoint_path)["model_state_dict"]
    for key, value in weights_straight.items():
        assert torch.equal(value, weights[key]), key


def test_validation_windows_are_fixed(stream_files, tmp_path):
    from lmtools.data.loader import BatchLoader

    loader = BatchLoader([str(stream_files / "val.npy")], 4, 16, "cpu", seed=5, prefetch=0)
    a = [loader.batch_at(i)[0] for i in range(3)]
    b = [loader.batch_at(i)[0] for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_both_flag_spellings(stream_files, tmp_path, run_cli):
    kebab = [a.replace("_", "-") if a.startswith("--") else a for a in TINY_LEARNER]
    result = run_cli(
        "train",
        "--train-data",
        stream_files / "train.npy",
        *kebab,
        "--max-iters",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "100",
        "--checkpoint-path",
        tmp_path / "k.pt",
        "--warmup-iters",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "k.pt")["config"]["d_model"] == 32


def test_help_lists_every_documented_flag(run_cli):
    result = run_cli("train", "--help")
    documented = (
        "train_data val_data vocab_size context_length d_model num_layers num_heads d_ff rope_theta batch_size "
        "learning_rate min_learning_rate weight_decay warmup_iters max_iters gradient_clip_val eval_interval "
        "log_interval checkpoint_interval checkpoint_path resume device seed"
    ).split()
    text = result.output.replace("\n", " ")
    for flag in documented:
        assert f"--{flag}" in text or f"--{flag}"[:20] in text, flag


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--device", "cuda"], "no usable CUDA GPU"),
        (["--device", "tpu"], "device"),
        (["--num_heads", "5"], "does not divide"),
        (["--batch_size", "0"], "--batch_size must be a positive integer"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
        (["--vocab_size", "10"], "token id"),
        (["--context_length", "40000"], "a window needs"),
    ],
)
def test_bad_flags_exit_2_with_one_line(stream_files, tmp_path, extra, needle, run_cli):
    args = TINY_LEARNER + ["--max_iters", "1", "--checkpoint_path", str(tmp_path / "c.pt")]
    for flag, value in zip(extra[::2], extra[1::2]):
        i = args.index(flag) if flag in args else None
        if i is not None:
            args[i + 1] = value
        else:
            args += [flag, value]
    one_line_error(run_cli("train", "--train_data", stream_files / "train.npy", *args), needle)
    assert not (tmp_path / "c.pt").exists()


def test_resume_contradicting_model_flag(stream_files, tmp_path, run_cli):
    cfg = tiny_config(stream_files, tmp_path, max_iters=2)
    train_model(cfg, log=lambda _l: None)
    result = run_cli(
        "train",
        "--resume",
        *flags(checkpoint_path=cfg.checkpoint_path, train_data=stream_files / "train.npy", d_model=64),
    )
    assert result.exit_code == 2 and "contradicts the checkpoint" in result.stderr
    result = run_cli("resume", tmp_path / "missing.pt")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_vocab_from_meta_json(stream_files, tmp_path, run_cli):
    folder = tmp_path / "prepared"
    folder.mkdir()
    np.save(folder / "train.npy", np.load(stream_files / "train.npy"))
    np.save(folder / "val.npy", np.load(stream_files / "val.npy"))
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 70, "bytes_per_token": 2.0}))
    two_steps = dict(batch_size=4, max_iters=2, warmup_iters=1, eval_interval=2, eval_iters=1, log_interval=1)
    cfg = train_config(folder / "train.npy", tmp_path / "c.pt", **two_steps)
    train_model(cfg, log=lambda _l: None)
    payload = read_checkpoint(tmp_path / "c.pt")
    assert payload["model_config"]["vocab_size"] == 70
    assert payload["config"]["val_data"].endswith("val.npy")
    assert math.isfinite(payload["metrics"]["val_loss"])
    result = run_cli(
        "train",
        *flags(train_data=folder / "train.npy", vocab_size=64, max_iters=1, checkpoint_path=tmp_path / "d.pt"),
    )
    assert result.exit_code == 2 and "contradicts" in result.stderr


def test_max_minutes_stops_with_a_checkpoint(stream_files, tmp_path):
    cfg = tiny_config(stream_files, tmp_path, max_iters=10**6, max_minutes=0.02, val_data=None)
    lines = []
    result = train_model(cfg, log=lines.append)
    assert result.stopped_by_time and not result.stopped_by_signal
    assert 0 < result.iteration < 10**6
    assert read_checkpoint(cfg.checkpoint_path)["iteration"] == result.iteration
    assert lines[-1] == f"Saved checkpoint at iter {result.iteration} to {cfg.checkpoint_path}"


def test_tensorboard_logs_when_installed_else_clear_error(stream_files, tmp_path, run_cli):
    import importlib.util

    args = [
        "train",
        "--train_data",
        stream_files / "train.npy",
        *TINY_LEARNER,
        *flags(max_iters=2, log_interval=1, checkpoint_path=tmp_path / "c.pt", tensorboard=tmp_path / "tb"),
    ]
    result = run_cli(*args)
    if importlib.util.find_spec("tensorboard") is None:
        assert result.exit_code == 2 and "pip install tensorboard" in result.stderr
    else:
        assert result.exit_code == 0, result.output
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_mixture_with_weights_from_the_cli(stream_files, tmp_path, run_cli):
    np.save(tmp_path / "other.npy", np.full(5000, 7, dtype=np.uint16))
    result = run_cli(
        "train",
        "--train_data",
        f"{stream_files / 'train.npy'}:0.7",
        "--train-data",
        f"{tmp_path / 'other.npy'}:0.3",
        *TINY_LEARNER,
        *flags(max_iters=2, log_interval=1, checkpoint_path=tmp_path / "c.pt"),
    )
    assert result.exit_code == 0, result.output
    assert "weight 0.7" in result.output and "weight 0.3" in result.output
    stored = read_checkpoint(tmp_path / "c.pt")["config"]["train_data"]
    assert [s.rsplit(":", 1)[1] for s in stored] == ["0.7", "0.3"]


def test_too_short_prepared_val_is_left_out(stream_files, tmp_path):
    from lmtools.data.dataset import resolve_data

    folder = tmp_path / "prepared"
    folder.mkdir()
    np.save(folder / "train.npy", np.load(stream_files / "train.npy"))
    np.save(folder / "val.npy", np.zeros(0, dtype=np.uint16))
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 64, "val_tokens": 0}))
    cfg, _data = resolve_data(TrainConfig(train_data=[str(folder)], context_length=16), explicit_vocab=False)
    assert cfg.train_data == [str(folder / "train.npy")] and cfg.val_data is None and cfg.vocab_size == 64


def test_terminal_gets_a_live_progress_bar_and_pipes_get_plain_lines(stream_files, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    args = [
        sys.executable,
        "-m",
        "lmtools.cli",
        "train",
        "--train_data",
        str(stream_files / "train.npy"),
        *TINY_LEARNER,
        *flags(max_iters=30, log_interval=10, eval_interval=1000, warmup_iters=1),
    ]
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        args + ["--checkpoint_path", str(tmp_path / "a.pt")], stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    tty_out = read_terminal(primary).decode("utf-8", "replace")
    assert proc.wait(timeout=120) == 0
    assert "━" in tty_out and "30/30" in tty_out and "Iter     30 | Loss:" in tty_out

    piped = subprocess.run(
        args + ["--checkpoint_path", str(tmp_path / "b.pt")], capture_output=True, text=True, env=env, timeout=120
    )
    assert piped.returncode == 0
    assert "━" not in piped.stdout and "\x1b[" not in piped.stdout
    piped_iters = [line for line in piped.stdout.splitlines() if line.startswith("Iter")]
    assert [line.split("|")[0].strip() for line in piped_iters] == [
        "Iter      0",
        "Iter     10",
        "Iter     20",
        "Iter     30",
    ]
    # Without a progress bar, each step's line carries the elapsed time and an estimate of the time left.
    assert all(" | elapsed: 0:0" in line and " | left: 0:0" in line for line in piped_iters[1:]), piped.stdout
    assert "elapsed:" not in tty_out


def test_resume_takes_a_new_time_budget(stream_files, tmp_path, run_cli):
    cfg = tiny_config(stream_files, tmp_path, max_iters=50, val_data=None, max_minutes=0.0001)
    first = train_model(cfg, log=lambda _l: None)
    assert first.stopped_by_time and first.iteration < 50
    result = run_cli("resume", cfg.checkpoint_path, "--max_minutes", "10")
    assert result.exit_code == 0, result.output
    assert "Training finished at iter 50" in result.output


def test_inspect_reports_the_loops_learning_rate(stream_files, tmp_path):
    from lmtools.inspection import inspect_path

    cfg = tiny_config(stream_files, tmp_path, max_iters=6, cosine_cycle_iters=12, val_data=None)
    train_model(cfg, log=lambda _l: None)
    payload = read_checkpoint(cfg.checkpoint_path)
    assert inspect_path(cfg.checkpoint_path)["schedule"]["lr"] == payload["metrics"]["lr"] == lr_at(cfg, 6)


def test_losses_are_read_from_the_device_only_at_log_points_and_checkpoints(stream_files, tmp_path):
    """Between reads the host does not wait for the device; every step's loss still arrives, in order."""
    seen = []
    cfg = tiny_config(stream_files, tmp_path, log_interval=5, eval_interval=10, checkpoint_interval=7, max_iters=12)
    result = train_model(cfg, log=lambda _l: None, on_step=lambda it, total, loss, lr: seen.append((it, loss)))
    assert [it for it, _ in seen] == list(range(1, 13))
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    # Read at logs (5, 10), checkpoints (7) and the end (12); in between, the newest read value shows.
    reads = [5, 7, 10, 12]
    for it, shown in seen:
        newest = max((r for r in reads if r <= it), default=None)
        assert shown == (None if newest is None else result.losses[newest - 1]), (it, shown)

    # The same run read at every step gives identical losses.
    every = tiny_config(stream_files, tmp_path / "every", log_interval=1, eval_interval=10, max_iters=12)
    assert train_model(every, log=lambda _l: None).losses == result.losses


def test_losses_are_read_at_least_every_256_steps(stream_files, tmp_path):
    from lmtools.training.numerics import MAX_PENDING_STEPS

    seen = {}
    cfg = tiny_config(
        stream_files,
        tmp_path,
        val_data=None,
        d_model=16,
        num_layers=1,
        batch_size=2,
        log_interval=10**6,
        checkpoint_interval=10**6,
        max_iters=MAX_PENDING_STEPS + 5,
    )
    result = train_model(cfg, log=lambda _l: None, on_step=lambda it, total, loss, lr: seen.__setitem__(it, loss))
    assert seen[MAX_PENDING_STEPS - 1] is None
    assert seen[MAX_PENDING_STEPS] == seen[MAX_PENDING_STEPS + 4] == result.losses[MAX_PENDING_STEPS - 1]
    assert len(result.losses) == MAX_PENDING_STEPS + 5
