"""The config a run trains with, and what it starts from.

A new run resolves the config the user passed against its data (vocabulary, validation sets,
tokenizer), a recipe and, with --init_from, the model it starts from. A resumed run takes the
config stored in its checkpoint, with the flags typed this time where a resume can honour them.
Either way the config as passed and the config resolved are two values, and both are recorded
in every checkpoint: `inspect --config` prints the first, the run trains with the second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lmtools.checkpoint import read_checkpoint, snapshot_base
from lmtools.config.recipes import apply_recipe
from lmtools.config.train_config import TrainConfig
from lmtools.data.dataset import (
    DataPlan,
    absolute_paths,
    absolute_spec,
    data_tokenizer_identity,
    normalise_specs,
    plan_data,
    resolve_data,
)
from lmtools.errors import ConfigError
from lmtools.model import MODEL_FIELDS, ModelConfig
from lmtools.runtime.ownership import check_checkpoint_target
from lmtools.runtime.run_lock import check_rollback
from lmtools.training.preflight import check_stored_config
from lmtools.training.schedule import extend_schedule, warmup_warning

if TYPE_CHECKING:
    from lmtools.training.init_source import InitSource

# Flags a resumed run cannot honour: its data, batches and starting point are the checkpoint's.
RESUME_FIXED = (
    "train_data",
    "val_data",
    "data_dtype",
    "seed",
    "batch_size",
    "grad_accum_steps",
    "init_from",
    "init_optimizer",
)


@dataclass
class RunPlan:
    """What a run starts from."""

    config: TrainConfig  # resolved: what the run trains with (its data paths absolute)
    user_config: dict  # as passed: what `inspect --config` reproduces
    data: DataPlan  # what it reads, resolved from the data's meta.json once
    payload: dict | None = None  # the checkpoint a resumed run continues
    init: InitSource | None = None  # the weights a new run starts from (--init_from)
    notes: list[str] = field(default_factory=list)  # lines for the run's header
    started_from: Path | None = None  # the file resumed from: never pruned as a snapshot


def plan_new_run(cfg: TrainConfig, explicit: frozenset[str], lock: Callable[[Path], None]) -> RunPlan:
    """A new run: its checkpoint folder checked and locked, its config resolved from a copy of `cfg`."""
    check_checkpoint_folder(Path(cfg.checkpoint_path))
    lock(Path(cfg.checkpoint_path))
    check_checkpoint_target(Path(cfg.checkpoint_path), cfg.overwrite)
    resolved, data, init = resolve_new_run(apply_recipe(cfg, explicit), explicit)
    resolved.validate()
    warning = warmup_warning(resolved)
    return RunPlan(resolved, cfg.to_dict(), data, init=init, notes=[warning] if warning else [])


def plan_resumed_run(
    cfg: TrainConfig,
    resume_from: str,
    explicit: frozenset[str],
    lock: Callable[[Path], None],
    rollback: bool,
    log: Callable[[str], None],
) -> RunPlan:
    """A resumed run: the checkpoint read and checked, the stored config with the typed overrides."""
    from lmtools.inspection import check_checkpoint_file

    # Locked before reading: a second run or resume on this path fails at once.
    lock(Path(cfg.checkpoint_path if "checkpoint_path" in explicit else snapshot_base(resume_from)))
    check_checkpoint_file(Path(resume_from), "resume")
    payload = read_checkpoint(resume_from)
    check_stored_config(payload.get("config") if isinstance(payload.get("config"), dict) else {}, resume_from)
    resolved, note = merge_resume_config(payload, cfg, explicit, resume_from)
    resolved = absolute_paths(resolved)  # as a new run's are (a checkpoint written by hand may hold others)
    lock(Path(resolved.checkpoint_path))
    check_resume_point(payload, resolved, Path(resume_from), rollback, log)
    resolved.validate()
    return RunPlan(
        resolved,
        resumed_user_config(payload, cfg, explicit),
        plan_data(resolved),
        payload=payload,
        notes=[note] if note else [],
        started_from=Path(resume_from),
    )


def resolve_new_run(cfg: TrainConfig, explicit: frozenset[str]) -> tuple[TrainConfig, DataPlan, InitSource | None]:
    """A fresh run's data, vocabulary and, with --init_from, the model it starts from (on a copy)."""
    if not cfg.init_from:
        if cfg.init_optimizer:
            raise ConfigError("--init_optimizer takes the optimizer state of --init_from CHECKPOINT; add that flag")
        return *resolve_data(cfg, explicit_vocab="vocab_size" in explicit), None
    from lmtools.training.init_source import apply_model_shape, check_init_flags, check_vocabulary, read_init_source

    if cfg.fsdp:
        raise ConfigError("--init_from does not work with --fsdp yet; start the run without --fsdp")
    init = read_init_source(cfg.init_from)
    # Every architecture option spelled out, so the source's model overrides a recipe's.
    init.model_config = asdict(ModelConfig.from_dict(init.model_config))
    cfg = replace(cfg, init_from=init.path)
    check_init_flags(cfg, init)
    cfg, data = resolve_data(apply_model_shape(cfg, init, explicit), explicit_vocab=False)
    check_vocabulary(cfg, init, data_tokenizer_identity(cfg))
    return cfg, data, init


def resumed_user_config(payload: dict, cfg: TrainConfig, explicit: frozenset[str]) -> dict:
    """The config the user passed for a resumed run: the first invocation's (older checkpoints
    hold only the resolved one) with the values typed this time."""
    stored = payload.get("user_config") or payload.get("config") or {}
    return {**stored, **{name: getattr(cfg, name) for name in explicit if hasattr(cfg, name)}}


def merge_resume_config(
    payload: dict, cfg: TrainConfig, explicit: frozenset[str], source: str = "CHECKPOINT"
) -> tuple[TrainConfig, str | None]:
    """The stored run config with the typed overrides applied, and the line that says how the
    schedule changed (when --max_iters moves its end), or None."""
    stored = payload.get("config")
    if not isinstance(stored, dict):
        raise ConfigError("the checkpoint holds no run config; it was not written by lmtools train")
    resumed = TrainConfig.from_dict(stored)
    note = None
    for name in sorted(explicit):
        ours, theirs = getattr(cfg, name, None), getattr(resumed, name, None)
        if name in MODEL_FIELDS and ours != theirs:
            raise ConfigError(
                f"--{name} {ours} contradicts the checkpoint, which was trained with {name}={theirs}; "
                f"drop the flag to resume"
            )
        if name in RESUME_FIXED:
            check_resume_keeps(name, ours, theirs, source)
        elif name == "max_iters":
            resumed, note = extend_schedule(resumed, ours, int(payload.get("iteration", 0)))
        elif name not in MODEL_FIELDS and name != "resume":
            setattr(resumed, name, ours)
    return resumed, note


def check_resume_keeps(name: str, ours, theirs, source: str) -> None:
    """A resumed run keeps what fixes its batches; asking for another is an error naming the way."""
    if name == "train_data":
        ours, theirs = normalise_specs(list(ours)), list(theirs or [])
    elif name == "val_data" and ours is not None:
        ours = absolute_spec(ours)
    if ours == theirs or (name == "init_optimizer" and not ours):
        return
    if name in ("init_from", "init_optimizer"):
        raise ConfigError(f"--{name} starts a new run and --resume continues one; drop one of them")
    shown = " ".join(ours) if isinstance(ours, list) else ours
    raise ConfigError(
        f"--{name} {shown}: a resumed run keeps its checkpoint's {name} ({theirs}); to train these weights "
        f"with it, start a new run: lmtools train --init_from {source} --{name} ... --checkpoint_path NEW.pt"
    )


def check_resume_point(payload: dict, cfg: TrainConfig, resume_from: Path, rollback: bool, log) -> None:
    """A resume must have steps left, and may go back past newer checkpoints only when asked."""
    iteration = int(payload.get("iteration", 0))
    if iteration >= cfg.max_iters:
        raise ConfigError(
            f"{resume_from} is at iter {iteration}, at or past --max_iters {cfg.max_iters}: nothing left to train; "
            f"pass --max_iters above {iteration} to continue"
        )
    check_rollback(resume_from, Path(cfg.checkpoint_path), iteration, rollback, log)


def check_checkpoint_folder(path: Path) -> None:
    """Fail early, without creating anything, when the checkpoint folder cannot be made or written."""
    import os

    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"cannot create the checkpoint folder {folder}: {existing} is a file; choose another --checkpoint_path"
        )
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"checkpoint folder {folder} is not writable; choose another --checkpoint_path")
