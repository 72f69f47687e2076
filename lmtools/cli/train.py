"""`lmtools train` and `lmtools resume`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

import typer

from lmtools.cli.app import Command, app, user_errors
from lmtools.cli.console import console_guard
from lmtools.config.train_config import PANEL_OF, TrainConfig


def _explicit(ctx: typer.Context) -> frozenset[str]:
    """The parameters the user typed (as opposed to defaults)."""
    return frozenset(
        # By name: typer may bundle its own click, whose enum is not click.core's.
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    )


class _Reporter:
    """Plain log lines when piped; on a terminal, the same lines above a live progress bar."""

    def __init__(self):
        import sys

        self.progress = None
        self.task = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} | lr {task.fields[lr]:.2e} | {task.fields[speed]}"),
                TimeRemainingColumn(),
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            with console_guard():
                self.progress.stop()

    def log(self, line: str) -> None:
        with console_guard():
            if self.progress is not None:
                self.progress.console.print(line, markup=False, highlight=False)
            else:
                typer.echo(line)

    def step(self, iteration: int, total: int, loss: float | None, lr: float) -> None:
        """`loss` is the newest one read from the device (they are read at log points)."""
        if self.progress is None:
            return
        import time

        now = time.perf_counter()
        loss = "-" if loss is None else f"{loss:.4f}"
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, completed=iteration, loss=loss, lr=lr, speed="")
            self._mark = (now, iteration)
        mark_t, mark_i = self._mark
        speed = f"{(iteration - mark_i) / (now - mark_t):.2f} it/s" if now > mark_t and iteration > mark_i else ""
        self.progress.update(self.task, completed=iteration, total=total, loss=loss, lr=lr, speed=speed)


def _run(cfg, **kw):
    from lmtools.training.trainer import train_model

    with _Reporter() as reporter:
        # Without a progress bar (a pipe, a file), the log lines carry the elapsed and remaining time.
        result = train_model(cfg, log=reporter.log, on_step=reporter.step, log_times=reporter.progress is None, **kw)
    _finish(result)


# Options of `train` that steer the invocation rather than describe the run (not TrainConfig fields).
_TRAIN_ONLY = {
    "config": (
        Optional[Path],
        None,
        ("--config",),
        "TOML run config whose keys are these flags' names; flags typed here win.",
        "Recipe",
    ),
    "resume": (
        bool,
        False,
        ("--resume",),
        "Continue from --checkpoint_path (by default in the run folder) with the config stored in it.",
        "Checkpoints",
    ),
    "auto_resume": (
        bool,
        False,
        ("--auto_resume", "--auto-resume"),
        "Resume when --checkpoint_path exists, else start a new run (safe under torchrun restarts).",
        "Checkpoints",
    ),
}
# What a resume (train --resume, or resume) may accept that it would otherwise refuse.
_RESUME_CHOICES = {
    "rollback": (
        bool,
        False,
        ("--rollback",),
        "Allow resuming from a snapshot older than the run's newest checkpoint (the later steps are discarded).",
        "Checkpoints",
    ),
    "allow_data_change": (
        bool,
        False,
        ("--allow_data_change", "--allow-data-change"),
        "Resume although the data or tokenizer differ from the checkpoint's fingerprint.",
        "Checkpoints",
    ),
}
# The TrainConfig fields `resume` may override; None keeps the checkpoint's value.
_RESUME_FIELDS = ("max_iters", "device", "max_minutes")


def _flags(name: str, aliases: tuple[str, ...] = ()) -> tuple[str, ...]:
    """--snake_case (as the specification spells it) and --kebab-case, of the name and its aliases."""
    out = []
    for each in (name, *aliases):
        snake = f"--{each}"
        out += [snake, snake.replace("_", "-")] if "_" in each else [snake]
    return tuple(out)


def _field_options(names=None, *, keep_defaults: bool = True) -> list[inspect.Parameter]:
    """Typer parameters generated from TrainConfig's fields (all flag fields, or `names`)."""
    from lmtools.config.toml import field_types, flag_fields

    params = []
    for f in flag_fields():
        if names is not None and f.name not in names:
            continue
        kind, optional = field_types()[f.name]
        annotation = list[str] if kind is list else kind
        default = f.default if keep_defaults and kind is not list else None
        if default is None:
            annotation = Optional[annotation]
        panel = PANEL_OF.get(f.name)
        flags = _flags(f.name, f.metadata["aliases"])
        params.append(_param(f.name, annotation, default, flags, f.metadata["help"], panel))
        if f.metadata["negatable"] and keep_defaults:
            # Hidden, so that the help's name column keeps its width; the field's help names it.
            params.append(
                _param(f"no_{f.name}", bool, False, _flags(f"no_{f.name}"), f"Turn --{f.name} off.", hidden=True)
            )
    return params


def _param(
    name: str, annotation, default, flags: tuple[str, ...], help: str, panel: str | None = None, **kw
) -> inspect.Parameter:
    if panel is not None:
        kw["rich_help_panel"] = panel
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, *flags, help=help, **kw),
    )


def _with_options(*params: inspect.Parameter):
    """Give a `**kwargs` command the signature typer builds its options from."""

    def decorate(fn):
        fn.__signature__ = inspect.Signature(list(params))
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


def _ctx_param(name: str = "ctx") -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)


class _TrainCommand(Command):
    # Required, and checked by the run (TrainConfig.validate): a --config file may give it.
    shown_required = frozenset({"train_data"})


@app.command(help="Train a Transformer LM on token files.", cls=_TrainCommand)
@user_errors
@_with_options(
    _ctx_param(),
    *_field_options(),
    *(_param(name, *spec) for name, spec in {**_TRAIN_ONLY, **_RESUME_CHOICES}.items()),
)
def train(ctx: typer.Context, **params) -> None:
    """Train a Transformer LM on token files."""
    from lmtools.data.dataset import default_run_name
    from lmtools.errors import ConfigError

    resume_flag, auto = params.pop("resume"), params.pop("auto_resume")
    choices = {name: params.pop(name) for name in _RESUME_CHOICES}
    cfg, explicit = config_from_params(params, _explicit(ctx))
    # Where the run goes (--out_dir, or runs/NAME), before --resume and --auto_resume look there.
    cfg, explicit = cfg.with_run_folder(explicit, default_run_name)
    resume_from = None
    if auto and (finished := _finished_run(cfg, explicit)) is not None:
        with console_guard():
            typer.echo(f"Training already finished at iter {finished}. Final checkpoint: {cfg.checkpoint_path}")
        return
    if resume_flag or (auto and os.path.lexists(cfg.checkpoint_path)):
        resume_from = cfg.checkpoint_path
        if not Path(resume_from).exists():
            raise ConfigError(
                f"--resume: checkpoint {resume_from} does not exist; check --checkpoint_path or start without --resume"
            )
    _run(cfg, resume_from=resume_from, explicit=explicit, **choices)


def _finished_run(cfg: TrainConfig, explicit) -> int | None:
    """The iteration of the checkpoint at --checkpoint_path when it already reached max_iters
    (so that a restarted --auto_resume job ends at once instead of failing)."""
    from lmtools.checkpoint import peek_checkpoint, stored_config

    path = Path(cfg.checkpoint_path)
    payload = peek_checkpoint(path) if path.is_file() else None
    if payload is None:
        return None
    stored = stored_config(payload)
    max_iters = cfg.max_iters if "max_iters" in explicit else stored.get("max_iters", cfg.max_iters)
    iteration = int(payload["iteration"])
    return iteration if iteration >= int(max_iters) else None


def config_from_params(params: dict, typed: frozenset[str]) -> tuple[TrainConfig, frozenset[str]]:
    """The run config from the flags and the --config file (a typed flag wins over the file), and
    the names the user set (typed or in the file), which a resume treats as overrides."""
    from lmtools.config.toml import read_run_config

    params = dict(params)
    for name in [key for key in params if key.startswith("no_")]:
        # --no_X turns an option off explicitly, over a recipe that turns it on.
        if params.pop(name):
            params[name[3:]] = False
            typed = (typed - {name}) | {name[3:]}
    path = params.pop("config", None)
    from_file = read_run_config(path) if path is not None else {}
    for name, value in from_file.items():
        if name not in typed:
            params[name] = value
    params["train_data"] = list(params["train_data"] or [])
    return TrainConfig(**params), frozenset(typed - {"config"}) | frozenset(from_file)


@app.command()
@user_errors
@_with_options(
    inspect.Parameter(
        "checkpoint",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Path,
        default=typer.Argument(..., help="Checkpoint written by lmtools train."),
    ),
    *_field_options(_RESUME_FIELDS, keep_defaults=False),
    *(_param(name, *spec) for name, spec in _RESUME_CHOICES.items()),
)
def resume(checkpoint: Path, **overrides) -> None:
    """Continue a run from its checkpoint alone: config, data, RNG and data position come from it.
    --max_iters, --device and --max_minutes (a budget per invocation) override the stored values."""
    from lmtools.checkpoint import snapshot_base

    choices = {name: overrides.pop(name) for name in _RESUME_CHOICES}
    given = {name: value for name, value in overrides.items() if value is not None}
    cfg = TrainConfig(checkpoint_path=str(snapshot_base(checkpoint)), **given)
    _run(cfg, resume_from=str(checkpoint), explicit=frozenset({"checkpoint_path", *given}), **choices)


def _finish(result) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    with console_guard():
        if result.stopped_by_signal or result.stopped_by_time:
            why = "by signal" if result.stopped_by_signal else "at the --max_minutes limit"
            typer.echo(
                f"Stopped {why} at iter {result.iteration}; resume with: lmtools resume {result.checkpoint_path}"
            )
        else:
            typer.echo(f"Training finished at iter {result.iteration}. Final checkpoint: {result.checkpoint_path}")
