"""Run configs: TrainConfig's flag fields as a TOML file (`train --config`, `inspect --config`)."""

from __future__ import annotations

import difflib
import functools
import sys
import types
import typing
from dataclasses import Field, fields
from pathlib import Path

from lmtools.config.train_config import TrainConfig
from lmtools.errors import ConfigError

# A run config is a page of flags; anything larger is the wrong file (and is not parsed).
MAX_CONFIG_BYTES = 1 << 20


def flag_fields() -> list[Field]:
    """The fields a user sets (by flag or in a run config), in declaration order."""
    return [f for f in fields(TrainConfig) if f.metadata.get("cli", False)]


@functools.cache
def field_types() -> dict[str, tuple[type, bool]]:
    """Each flag field's value type and whether it may be None (absent)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in flag_fields():
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        base = next(a for a in args if a is not type(None)) if args else hint
        out[f.name] = (typing.get_origin(base) or base, bool(args))
    return out


def read_run_config(path: str | Path) -> dict:
    """The fields a TOML run config sets, checked against TrainConfig: an unknown key or a value
    of the wrong type is a ConfigError naming it (and the closest field)."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"--config: {path} is over {MAX_CONFIG_BYTES // 2**20} MiB, too large for a run config; "
            f"check that it is the right file"
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"--config: {path} is not a run config: its values are nested too deeply") from None
    except ValueError as exc:  # after TOMLDecodeError, its subclass: what int() refuses
        if "integer string conversion" not in str(exc):
            raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
        raise ConfigError(
            f"--config: {path} is not a run config: it holds an integer of more than "
            f"{sys.get_int_max_str_digits():,} digits"
        ) from None
    except MemoryError:
        raise ConfigError(f"--config: {path} is not a run config: its values do not fit in memory") from None
    types_ = field_types()
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in types_:
            best = difflib.get_close_matches(name, list(types_), n=1, cutoff=0.5)
            hint = f"; did you mean {best[0]}?" if best else ""
            raise ConfigError(f"--config: {path}: unknown key {key!r}{hint}")
        out[name] = _checked(path, key, value, types_[name][0])
    return out


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list of strings"}


def _checked(path, key: str, value, kind: type):
    """`value` as field type `kind`, or a ConfigError that names the key."""
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    want = _KIND_WORDS[kind]
    raise ConfigError(f"--config: {path}: {key} must be {want}, got {value!r}")


def to_toml(config: dict) -> str:
    """The TOML run config that reproduces `config` (a TrainConfig dict): every flag field that
    has a value (TOML has no null: an absent key is the field's default, None)."""
    import tomli_w

    names = [f.name for f in flag_fields()]
    return tomli_w.dumps({name: config[name] for name in names if config.get(name) is not None})


def is_output_place(name: str) -> bool:
    """Whether a flag field says where a run writes (its checkpoint, its folder, its logs) or lets
    it replace what is there: the run's place, not how it trains."""
    return name in ("checkpoint_path", "tensorboard", "overwrite") or name.endswith(("_dir", "_path"))


def reproducing_toml(user_config: dict, config: dict, source: str) -> str:
    """The TOML run config that trains the run of checkpoint `source` again, into a new place.

    `user_config` is the run's config as passed, `config` the one it trained with. The keys of
    the old run's place are written as comments, so that `train --config` of the file never
    aims at it. max_iters is the one the run was started with: a resume that moved the end of
    its schedule is noted beside it (resumes that moved no rate keep no record: their max_iters
    then reproduces the schedule as it ran)."""
    import tomli_w

    values = {f.name: user_config[f.name] for f in flag_fields() if user_config.get(f.name) is not None}
    place = {k: v for k, v in values.items() if is_output_place(k) and v is not False}
    kept = {k: v for k, v in values.items() if not is_output_place(k)}
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in source)  # a comment is one line
    lines = [
        f"# The run config of {shown} (lmtools inspect --config):",
        "# lmtools train --config FILE trains that run again.",
    ]
    if place:
        lines += [
            "# Where that run went is left out, so that a new run does not aim at it: name a new place",
            "# here or by flag (lmtools train --config FILE --checkpoint_path NEW.pt).",
            *(f"# {line}" for line in tomli_w.dumps(place).splitlines()),
        ]
    extensions = [e for e in config.get("schedule_extensions") or [] if isinstance(e, dict)]
    note: list[str] = []
    if extensions and "max_iters" in kept and "previous_end" in extensions[0]:
        kept["max_iters"] = int(extensions[0]["previous_end"])
        moves = ", ".join(f"to {e.get('end')} at iter {e.get('start')}" for e in extensions)
        who = "a resume" if len(extensions) == 1 else "resumes"
        note = [f"# The run was started with max_iters = {kept['max_iters']}; {who} moved its end {moves}."]
        if all(e.get("start") == e.get("previous_end") for e in extensions):  # each at the end of the run
            ends = ", then ".join(str(e.get("end")) for e in extensions)
            note.append(f"# Resuming the new run at its end with --max_iters {ends} does the same.")
    for line in tomli_w.dumps(kept).splitlines():
        if note and line.startswith("max_iters ="):
            lines += note
        lines.append(line)
    return "\n".join(lines) + "\n"
