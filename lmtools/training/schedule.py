"""The learning-rate schedule, as pure functions of a run's config: linear warmup, a cosine to
the minimum rate, and the cosines that resumes with a later --max_iters appended.

A resume that moves the schedule's end records an extension in the config
(`schedule_extensions`): from its `start`, a cosine from `from_lr` (the rate there, so the rate
stays continuous) to `to_lr` at `end`. The rates of the steps already taken never change.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmtools.config.train_config import TrainConfig


def run_get_lr_cosine_schedule(
    it: int,
    max_learning_rate: float,
    min_learning_rate: float,
    warmup_iters: int,
    cosine_cycle_iters: int,
) -> float:
    """Linear warmup to max, cosine decay to min at `cosine_cycle_iters`, then min."""
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it > cosine_cycle_iters:
        return min_learning_rate
    span = cosine_cycle_iters - warmup_iters
    progress = (it - warmup_iters) / span if span > 0 else 1.0
    return min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)


def lr_at(cfg: TrainConfig, update: int) -> float:
    """The learning rate of update number `update` (1-based): the loop's and inspect's rule."""
    for ext in reversed(cfg.schedule_extensions):
        if update > ext["start"]:
            progress = min((update - ext["start"]) / (ext["end"] - ext["start"]), 1.0)
            return ext["to_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (ext["from_lr"] - ext["to_lr"])
    return run_get_lr_cosine_schedule(
        update, cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_iters, first_cosine_end(cfg)
    )


def first_cosine_end(cfg: TrainConfig) -> int:
    """Where the run's first cosine ends: before any extension, where it did when the run started."""
    if cfg.cosine_cycle_iters is not None:
        return cfg.cosine_cycle_iters
    return cfg.schedule_extensions[0]["previous_end"] if cfg.schedule_extensions else cfg.max_iters


def extend_schedule(cfg: TrainConfig, new_max_iters: int, iteration: int) -> tuple[TrainConfig, str | None]:
    """A copy of `cfg` that trains to `new_max_iters`, resumed at `iteration`, with the rate kept
    continuous there; and the line that says what the schedule now is, or None when it is
    unchanged (the rates of the steps still to come are the original schedule's)."""
    old_max = cfg.max_iters
    moved = replace(cfg, max_iters=new_max_iters)
    if new_max_iters == old_max or new_max_iters <= iteration or cfg.cosine_cycle_iters is not None:
        return moved, None  # the cosine's end does not move, or no step is left
    if not cfg.schedule_extensions and iteration <= cfg.warmup_iters:
        # Still warming up: the rates so far do not depend on where the cosine ends.
        return moved, (
            f"Schedule: max_iters {old_max} -> {new_max_iters}; warmup to iter {cfg.warmup_iters}, "
            f"then cosine to {cfg.min_learning_rate:.2e} at iter {new_max_iters}"
        )
    rate = lr_at(cfg, iteration)  # the rate of the schedule as it was
    extension = {
        "start": iteration,
        "end": new_max_iters,
        "from_lr": rate,
        "to_lr": cfg.min_learning_rate,
        "previous_end": old_max,
    }
    moved = replace(moved, schedule_extensions=[*cfg.schedule_extensions, extension])
    if math.isclose(rate, cfg.min_learning_rate, rel_tol=1e-9, abs_tol=0.0):
        return moved, (
            f"Schedule: max_iters {old_max} -> {new_max_iters}; the rate had decayed to its minimum and "
            f"stays at {rate:.2e} (to decay from a higher rate, start a new run with --init_from)"
        )
    return moved, (
        f"Schedule: max_iters {old_max} -> {new_max_iters}; cosine from {rate:.2e} (the rate at iter "
        f"{iteration}) to {cfg.min_learning_rate:.2e} at iter {new_max_iters}"
    )


def describe_schedule(cfg: TrainConfig) -> str:
    """The schedule in words, extensions included (for inspect)."""
    text = (
        f"warmup to {cfg.learning_rate:.2e} over {cfg.warmup_iters} iters, "
        f"cosine to {cfg.min_learning_rate:.2e} at iter {first_cosine_end(cfg)}"
    )
    if cfg.cosine_cycle_iters is not None and cfg.cosine_cycle_iters < cfg.max_iters:
        text += f", then constant until iter {cfg.max_iters}"
    for ext in cfg.schedule_extensions:
        text += (
            f"; extended at iter {ext['start']}: cosine from {ext['from_lr']:.2e} "
            f"to {ext['to_lr']:.2e} at iter {ext['end']}"
        )
    return text


def warmup_warning(cfg: TrainConfig) -> str | None:
    """One line when warmup is not shorter than the run (the rate never reaches its peak)."""
    if cfg.warmup_iters < cfg.max_iters:
        return None
    peak = lr_at(cfg, cfg.max_iters)
    return (
        f"Warning: --warmup_iters {cfg.warmup_iters} is not shorter than --max_iters {cfg.max_iters}: "
        f"the learning rate only reaches {peak:.2e}, never --learning_rate {cfg.learning_rate:.2e}; "
        f"pass --warmup_iters {cfg.max_iters // 10} (a tenth of the run)"
    )
