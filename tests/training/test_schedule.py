"""The learning-rate schedule when a run is extended past its end, and warmup that swallows a run."""

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from helpers import SMALLEST_MODEL, flags, learnable_stream, run_cli
from lmtools.checkpoint import read_checkpoint
from lmtools.config.train_config import TrainConfig
from lmtools.inspection import inspect_path
from lmtools.training.schedule import extend_schedule, lr_at, run_get_lr_cosine_schedule

# A small model logged at every step, so the schedule of each iteration shows.
TINY_SCHEDULE_RUN = [
    *flags(SMALLEST_MODEL, vocab_size=64, context_length=16, batch_size=4, eval_interval=1000, log_interval=1),
    *flags(learning_rate=1e-3, min_learning_rate=1e-5),
]


def train(tmp_path, **options):
    """`lmtools train` of TINY_SCHEDULE_RUN on tmp_path/train.npy with these further options."""
    return run_cli("train", "--train_data", tmp_path / "train.npy", *TINY_SCHEDULE_RUN, *flags(**options))


@settings(max_examples=100, deadline=None)
@given(
    warmup=st.integers(0, 50),
    max_iters=st.integers(1, 300),
    stop=st.floats(0, 1),
    new=st.integers(1, 800),
    lr=st.floats(1e-5, 1e-1),
    min_share=st.floats(0, 1),
    second=st.integers(0, 300),
    grow=st.integers(1, 300),
)
def test_moving_the_end_keeps_the_rate_continuous_and_ends_at_the_minimum(
    warmup, max_iters, stop, new, lr, min_share, second, grow
):
    """Resumed at any point with a longer (or shorter) run: the rates already used stay, the
    next ones go on from the current rate without a jump, and the run ends at the minimum."""
    resumed_at = round(stop * max_iters)
    assume(warmup < min(max_iters, new) and new != max_iters and new > resumed_at)  # (all-warmup runs are warned)
    cfg = TrainConfig(learning_rate=lr, min_learning_rate=lr * min_share, warmup_iters=warmup, max_iters=max_iters)
    before = [lr_at(cfg, u) for u in range(0, resumed_at + 1)]
    cfg, note = extend_schedule(cfg, new, resumed_at)
    assert note is not None and note.startswith(f"Schedule: max_iters {max_iters} -> {new}")
    assert [lr_at(cfg, u) for u in range(0, resumed_at + 1)] == before
    after = [lr_at(cfg, u) for u in range(resumed_at, new + 1)]
    step = max(abs(b - a) for a, b in zip(after, after[1:]))
    # No jump: every step moves the rate by a small share of the range it spans.
    assert step <= max(lr / max(warmup, 1), math.pi / 2 * lr / (new - max(resumed_at, warmup))) * (1 + 1e-9) + 1e-15
    if resumed_at > warmup:
        assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))  # decays from there, no new warmup
    assert lr_at(cfg, new) == pytest.approx(cfg.min_learning_rate, rel=1e-9, abs=1e-18)
    # A second extension chains on the first; what was already used stays.
    later = min(resumed_at + second, new)
    used = [lr_at(cfg, u) for u in range(0, later + 1)]
    cfg, _note = extend_schedule(cfg, new + grow, later)
    assert [lr_at(cfg, u) for u in range(0, later + 1)] == used
    assert lr_at(cfg, cfg.max_iters) == pytest.approx(cfg.min_learning_rate, rel=1e-9, abs=1e-18)


@given(max_iters=st.integers(1, 300), stop=st.floats(0, 1), new=st.integers(1, 600), cycle=st.integers(1, 400))
def test_within_the_original_schedule_nothing_changes(max_iters, stop, new, cycle):
    """The same max_iters, an explicit cosine end, or no step left: the rates are the original schedule's."""
    resumed_at = round(stop * max_iters)
    cases = [(None, max_iters), (cycle, new)] + ([(None, min(new, resumed_at))] if resumed_at else [])
    for cosine_cycle_iters, new_max in cases:
        cfg = TrainConfig(
            learning_rate=1e-3,
            min_learning_rate=1e-4,
            warmup_iters=10,
            max_iters=max_iters,
            cosine_cycle_iters=cosine_cycle_iters,
        )
        cfg, note = extend_schedule(cfg, new_max, resumed_at)
        assert note is None
        assert cfg.schedule_extensions == [] and cfg.max_iters == new_max
        end = cosine_cycle_iters or new_max
        assert all(lr_at(cfg, u) == run_get_lr_cosine_schedule(u, 1e-3, 1e-4, 10, end) for u in range(0, new_max + 1))


def test_a_finished_run_extended_stays_at_its_minimum_rate(tmp_path):
    """The trap: a finished run at 1e-5, resumed to twice its length, jumped back to 1.7e-4."""
    np.save(tmp_path / "train.npy", learnable_stream(5000))
    ckpt = tmp_path / "run" / "ckpt.pt"
    result = train(tmp_path, warmup_iters=2, max_iters=10, checkpoint_path=ckpt)
    assert result.exit_code == 0, result.output
    result = run_cli("resume", ckpt, "--max_iters", "20")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("Schedule:")]
    assert notes == [
        "Schedule: max_iters 10 -> 20; the rate had decayed to its minimum and stays at 1.00e-05 "
        "(to decay from a higher rate, start a new run with --init_from)"
    ]
    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["iter"] > 10] == [pytest.approx(1e-5, rel=1e-12)] * 10
    config = read_checkpoint(ckpt)["config"]
    assert config["max_iters"] == 20 and config["schedule_extensions"][0]["start"] == 10


def test_a_stopped_run_extended_decays_from_its_current_rate_and_inspect_says_so(tmp_path):
    np.save(tmp_path / "train.npy", learnable_stream(5000))
    ckpt = tmp_path / "run" / "ckpt.pt"
    result = train(tmp_path, warmup_iters=0, max_iters=20, max_minutes=0.000001, checkpoint_path=ckpt)
    assert result.exit_code == 0, result.output
    stopped = read_checkpoint(ckpt)["iteration"]
    rate = lr_at(TrainConfig(learning_rate=1e-3, min_learning_rate=1e-5, warmup_iters=0, max_iters=20), stopped)
    result = run_cli("resume", ckpt, "--max_iters", "40", "--max_minutes", "10")
    assert result.exit_code == 0, result.output
    assert (
        f"Schedule: max_iters 20 -> 40; cosine from {rate:.2e} (the rate at iter {stopped}) to 1.00e-05 at iter 40"
        in result.output
    )
    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["iter"] > stopped]
    assert lrs[0] < rate and lrs[0] > 0.99 * rate and lrs[-1] == pytest.approx(1e-5)
    schedule = inspect_path(ckpt)["schedule"]
    assert schedule["phase"] == "finished" and schedule["lr"] == pytest.approx(1e-5)
    assert f"extended at iter {stopped}: cosine from {rate:.2e} to 1.00e-05 at iter 40" in schedule["description"]
    result = run_cli("inspect", ckpt)
    assert result.exit_code == 0 and "extended at iter" in result.output


def test_warmup_longer_than_the_run_is_said_at_start(tmp_path):
    np.save(tmp_path / "train.npy", learnable_stream(5000))
    result = train(tmp_path, max_iters=300, max_minutes=0.000001, checkpoint_path=tmp_path / "c.pt")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        "Warning: --warmup_iters 2000 is not shorter than --max_iters 300: the learning rate only reaches 1.50e-04, "
        "never --learning_rate 1.00e-03; pass --warmup_iters 30 (a tenth of the run)"
    ]
    result = train(tmp_path, max_iters=2, warmup_iters=1, checkpoint_path=tmp_path / "d.pt")
    assert result.exit_code == 0 and "Warning:" not in result.output
