"""Planning a run: the config it trains with, the data it reads, and what it starts from.

`plan_run` is the one entry point, and there is one function per kind of start, read from top
to bottom:

- a new run (`plan_new_run`): the config the user passed, with a recipe, resolved against its
  data (vocabulary, validation sets, tokenizer: `lmtools.data.dataset`);
- a new run from trained weights (`plan_init_from_run`, `--init_from`): the same, with the model
  shape and weights of a checkpoint or a Hugging Face folder, whose tokenizer the data must share;
- a resumed run (`plan_resumed_run`): the config stored in its checkpoint, with the flags typed
  this time where a resume can honour them.

Either way the config as passed and the config resolved are two values, and both are recorded
in every checkpoint: `inspect --config` prints the first, the run trains with the second. The
data is resolved once, here (`DataPlan`): nothing after planning reads a meta.json or rewrites a
path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from lmtools.checkpoint import (
    check_checkpoint_file,
    load_state,
    peek_checkpoint,
    read_checkpoint,
    snapshot_base,
    stored_config,
    stored_model_config,
    stored_tokenizer_text,
    stored_user_config,
)
from lmtools.config.recipes import apply_model_size, apply_recipe, model_size_conflict
from lmtools.config.train_config import TrainConfig
from lmtools.data.dataset import (
    DataPlan,
    absolute_paths,
    absolute_spec,
    data_tokenizer_identity,
    default_run_name,
    normalise_specs,
    parse_tokenizer_text,
    plan_data,
    resolve_data,
)
from lmtools.errors import CheckpointError, ConfigError
from lmtools.interop.hf import import_llama
from lmtools.layout import METRICS_FILE
from lmtools.model import MODEL_FIELDS, ModelConfig
from lmtools.runtime.ownership import check_checkpoint_target
from lmtools.training.preflight import check_stored_config
from lmtools.training.schedule import extend_schedule, warmup_warning

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
class InitSource:
    path: str
    kind: str  # "checkpoint" or "Hugging Face folder"
    model_config: dict
    tokenizer_text: str | None
    payload: dict | None = None  # an lmtools checkpoint, read weights-only
    state_dict: dict[str, torch.Tensor] | None = None  # an imported Hugging Face model

    def load_into(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Copy the source's weights (and, if given an optimizer, its optimizer state) into the new run."""
        if self.payload is not None:
            load_state(self.payload, model, optimizer)
            return
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"--init_from {self.path}: its weights do not fit its own model config ({first})"
            ) from None


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


def plan_run(
    cfg: TrainConfig,
    *,
    explicit: frozenset[str],
    lock: Callable[[Path], None],
    resume_from: str | None = None,
    rollback: bool = False,
    log: Callable[[str], None] = print,
) -> RunPlan:
    """What the run `cfg` describes starts from: a resume of `resume_from`, a new run from
    `--init_from`'s weights, or a new run. `explicit` names the flags the user typed; `lock`
    takes the checkpoint path's lock (before anything is read)."""
    if resume_from is not None:
        return plan_resumed_run(cfg, resume_from, explicit, lock, rollback, log)
    # Done already by the CLI; here for callers of train_model.
    cfg, explicit = cfg.with_run_folder(explicit, default_run_name)
    path = Path(cfg.checkpoint_path)
    check_checkpoint_folder(path)
    lock(path)
    check_checkpoint_target(path, cfg.overwrite)
    # The named size's shape is what the user asked for: recorded as passed (`inspect --config`
    # then writes the shape out, and reproduces the run).
    cfg = apply_model_size(cfg, explicit)
    user_config = cfg.to_dict()  # before the recipe: what the user passed
    cfg = apply_recipe(cfg, explicit)
    plan = (plan_init_from_run if cfg.init_from else plan_new_run)(cfg, explicit, user_config)
    plan.config.validate()
    if warning := warmup_warning(plan.config):
        plan.notes.append(warning)
    return plan


# ---- a new run --------------------------------------------------------------------------------


def plan_new_run(cfg: TrainConfig, explicit: frozenset[str], user_config: dict) -> RunPlan:
    """A fresh run's data and vocabulary, resolved on a copy of `cfg`."""
    if cfg.init_optimizer:
        raise ConfigError("--init_optimizer takes the optimizer state of --init_from CHECKPOINT; add that flag")
    resolved, data = resolve_data(cfg, explicit_vocab="vocab_size" in explicit)
    return RunPlan(resolved, user_config, data)


def check_checkpoint_folder(path: Path) -> None:
    """Fail early, without creating anything, when the checkpoint folder cannot be made or written."""
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


# ---- a new run from trained weights (--init_from) -------------------------------------------------


def plan_init_from_run(cfg: TrainConfig, explicit: frozenset[str], user_config: dict) -> RunPlan:
    """A new run that takes the model shape and weights of a checkpoint or a Hugging Face folder,
    and nothing else: its schedule starts at iteration 0, its optimizer is fresh (unless
    --init_optimizer), it writes its own checkpoint, and its data is tokenized as the source's was."""
    if cfg.fsdp:
        raise ConfigError("--init_from does not work with --fsdp yet; start the run without --fsdp")
    init = read_init_source(cfg.init_from)
    # Every architecture option spelled out, so the source's model overrides a recipe's.
    init.model_config = asdict(ModelConfig.from_dict(init.model_config))
    if differ := model_size_conflict(cfg.model_size, init.model_config, explicit):
        raise ConfigError(
            f"--model_size {cfg.model_size} contradicts --init_from {init.path}, whose model has {differ}; "
            f"drop --model_size (the model's shape comes from --init_from)"
        )
    cfg = replace(cfg, init_from=init.path)
    check_init_flags(cfg, init)
    resolved, data = resolve_data(apply_model_shape(cfg, init, explicit), explicit_vocab=False)
    check_vocabulary(resolved, init, data_tokenizer_identity(resolved))
    return RunPlan(resolved, user_config, data, init=init)


def read_init_source(path: str) -> InitSource:
    """The checkpoint or Hugging Face folder that `--init_from` names."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"--init_from {p} is a folder without config.json; pass a checkpoint written by lmtools train "
                f"or a Hugging Face model folder"
            )
        model_config, state_dict, tokenizer_text = import_llama(p)
        return InitSource(
            str(p.resolve()), "Hugging Face folder", dict(model_config), tokenizer_text, state_dict=state_dict
        )
    check_checkpoint_file(p, "--init_from")
    payload = read_checkpoint(p)
    model_config = stored_model_config(payload)
    if "vocab_size" not in model_config:
        raise CheckpointError(f"--init_from {p} records no model config; it was not written by lmtools train")
    tokenizer_text = stored_tokenizer_text(payload, p)
    return InitSource(str(p.resolve()), "checkpoint", dict(model_config), tokenizer_text, payload=payload)


def apply_model_shape(cfg: TrainConfig, source: InitSource, explicit: frozenset[str]) -> TrainConfig:
    """A copy of `cfg` whose model is the source's: its shape flags come from it; a typed flag
    that contradicts it is an error."""
    known = {f.name for f in fields(TrainConfig)}
    shape = {key: theirs for key, theirs in source.model_config.items() if key in known}
    for key, theirs in shape.items():
        ours = getattr(cfg, key)
        if key in explicit and ours != theirs:
            raise ConfigError(
                f"--{key} {ours} contradicts --init_from {source.path}, whose model has {key}={theirs}; "
                f"drop the flag (the model's shape comes from --init_from)"
            )
    return replace(cfg, **shape)


def check_vocabulary(cfg: TrainConfig, source: InitSource, data_tokenizer: Any) -> None:
    """The new data must be tokenized as the source was: same vocabulary size, same tokenizer."""
    theirs = int(source.model_config["vocab_size"])
    if cfg.vocab_size != theirs:
        raise ConfigError(
            f"--init_from {source.path} has a vocabulary of {theirs:,} ids but --train_data's has "
            f"{cfg.vocab_size:,}: tokenize the new corpus with the model's tokenizer "
            f"(lmtools prepare CORPUS --tokenizer ITS_TOKENIZER.json)"
        )
    if source.tokenizer_text is None or data_tokenizer is None:
        return
    if parse_tokenizer_text(source.tokenizer_text, f"--init_from {source.path}") != data_tokenizer:
        raise ConfigError(
            f"--init_from {source.path} was trained with another tokenizer than --train_data's ({cfg.tokenizer}), "
            f"of the same size: tokenize the new corpus with the model's tokenizer "
            f"(lmtools prepare CORPUS --tokenizer ITS_TOKENIZER.json)"
        )


def check_init_flags(cfg: TrainConfig, source: InitSource) -> None:
    """A run started from weights writes a checkpoint of its own, and takes an optimizer state
    only from a checkpoint that holds one."""
    if Path(cfg.checkpoint_path).resolve() == Path(source.path):
        raise ConfigError(
            f"--init_from and --checkpoint_path are the same file ({cfg.checkpoint_path}); a new run needs its own "
            f"--checkpoint_path (to continue that run instead: lmtools resume {cfg.checkpoint_path})"
        )
    if cfg.init_optimizer and source.payload is None:
        raise ConfigError(
            f"--init_optimizer: {source.path} is a {source.kind}, which holds no optimizer state; drop the flag"
        )


# ---- a resumed run ------------------------------------------------------------------------------


def plan_resumed_run(
    cfg: TrainConfig,
    resume_from: str,
    explicit: frozenset[str],
    lock: Callable[[Path], None],
    rollback: bool,
    log: Callable[[str], None],
) -> RunPlan:
    """A resumed run: the checkpoint read and checked, the stored config with the typed overrides."""
    # Locked before reading: a second run or resume on this path fails at once.
    lock(Path(cfg.checkpoint_path if "checkpoint_path" in explicit else snapshot_base(resume_from)))
    check_checkpoint_file(Path(resume_from), "resume")
    payload = read_checkpoint(resume_from)
    check_stored_config(stored_config(payload), resume_from)
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


def resumed_user_config(payload: dict, cfg: TrainConfig, explicit: frozenset[str]) -> dict:
    """The config the user passed for a resumed run: the first invocation's (older checkpoints
    hold only the resolved one) with the values typed this time."""
    return {**stored_user_config(payload), **{name: getattr(cfg, name) for name in explicit if hasattr(cfg, name)}}


def merge_resume_config(
    payload: dict, cfg: TrainConfig, explicit: frozenset[str], source: str = "CHECKPOINT"
) -> tuple[TrainConfig, str | None]:
    """The stored run config with the typed overrides applied, and the line that says how the
    schedule changed (when --max_iters moves its end), or None."""
    stored = stored_config(payload)
    if not stored:
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
        if name == "model_size" and (differ := model_size_conflict(ours, stored, explicit)):
            raise ConfigError(
                f"--model_size {ours} contradicts the checkpoint, whose model has {differ}; drop the flag to resume"
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


def check_rollback(
    resume_from: Path, ckpt_path: Path, iteration: int, rollback: bool, log: Callable[[str], None]
) -> None:
    """Resuming from an older snapshot than the run's newest checkpoint discards steps: that
    must be asked for (--rollback), and is announced."""
    if not ckpt_path.is_file() or os.path.abspath(resume_from) == os.path.abspath(ckpt_path):
        return
    newest = peek_checkpoint(ckpt_path)
    reached = int(newest["iteration"]) if newest is not None else None
    if reached is None or reached <= iteration:
        return
    what = f"iters {iteration + 1}..{reached}"
    if not rollback:
        raise CheckpointError(
            f"{resume_from} is at iter {iteration} but the run reached iter {reached} in {ckpt_path}; "
            f"resuming from it discards {what}: resume {ckpt_path} instead, or pass --rollback to discard them"
        )
    log(
        f"Rolling back to iter {iteration}: {what} are discarded ({ckpt_path} is replaced at the next checkpoint, "
        f"{METRICS_FILE} loses its records past iter {iteration}; {resume_from.name} is kept)"
    )
