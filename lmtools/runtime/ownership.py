"""What a command may replace: only what the same command wrote, and only when told to.

One rule for `train`, `prepare` and `export`. `train --overwrite` replaces an lmtools
checkpoint; `prepare --force` rewrites a prepared dataset's own files; `export --overwrite`
replaces a folder that export wrote, recognised by its record of the files it holds
(EXPORT_RECORD). None of them ever replaces a plain file of the user's, a folder holding
anything else (a checkpoint, a run's locks, a dataset, files export did not write), or the
checkpoint being exported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmtools.errors import ConfigError, DataError
from lmtools.layout import META_FILE, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE
from lmtools.runtime.fsutil import regular_file_problem

# Written last into every export folder: which files the export wrote, so that a later
# `export --overwrite` can tell its own folder from anyone else's.
EXPORT_RECORD = "lmtools_export.json"
_RECORD_LIMIT = 1 << 20  # a record is a few hundred bytes; a larger file is no record of ours


def check_checkpoint_target(path: Path, overwrite: bool) -> None:
    """A new run may replace `path` only when it is an lmtools checkpoint and --overwrite is given."""
    if not os.path.lexists(path):
        return
    problem = regular_file_problem(path)
    if problem is not None:
        raise ConfigError(f"--checkpoint_path {path} {problem}; choose another --checkpoint_path")
    from lmtools.checkpoint import peek_checkpoint  # imports torch: `prepare` starts without it

    if peek_checkpoint(path) is None:
        raise ConfigError(
            f"--checkpoint_path {path} exists and is not an lmtools checkpoint; it is never replaced: "
            f"choose another --checkpoint_path"
        )
    if not overwrite:
        raise ConfigError(
            f"{path} already holds a checkpoint; continue it with --resume, start another run "
            f"elsewhere with --out_dir DIR, or pass --overwrite to start a new run over it"
        )


def check_dataset_target(out: Path, force: bool) -> None:
    """`prepare` writes its files into `out`: a prepared dataset's only with --force, and never
    a file of the same name that no prepare wrote (no meta.json beside it)."""
    if (out / META_FILE).exists():
        if not force:
            raise DataError(
                f"{out} already holds a prepared dataset; pass --force to overwrite it or choose another --out"
            )
        return
    foreign = [name for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE) if os.path.lexists(out / name)]
    if foreign:
        raise DataError(
            f"--out {out} holds {foreign[0]}, which no lmtools prepare wrote (no {META_FILE} beside it); "
            "it is never replaced: choose another --out"
        )


def check_export_target(out: Path, overwrite: bool, checkpoint: Path) -> None:
    """`export` replaces `out` only when it is a folder that export wrote and --overwrite is given."""
    checkpoint = Path(os.path.abspath(checkpoint))
    if out == checkpoint or out in checkpoint.parents:
        raise ConfigError(f"--out {out} holds the checkpoint being exported; choose another --out")
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; export writes a folder: choose another --out")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    written = exported_files(out)
    if written is None:
        raise ConfigError(
            f"--out {out} is a folder that lmtools export did not write (it holds {_first_few(entries)}); "
            "it is never replaced: choose another --out"
        )
    foreign = [name for name in entries if name not in written]
    if foreign:
        raise ConfigError(
            f"--out {out} is an export folder that also holds {_first_few(foreign)}, which export did not write; "
            "it is never replaced: move those out or choose another --out"
        )
    if not overwrite:
        raise ConfigError(f"{out} already holds an export; choose another --out or pass --overwrite to replace it")


def exported_files(folder: Path) -> set[str] | None:
    """The names an export wrote into `folder` (its record included), or None when `folder` holds
    no readable export record, or the record names a file that is not a plain one."""
    record = folder / EXPORT_RECORD
    if regular_file_problem(record) is not None or record.is_symlink() or record.stat().st_size > _RECORD_LIMIT:
        return None
    try:
        files = json.loads(record.read_text(encoding="utf-8")).get("files")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError, OSError):
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) and name == Path(name).name for name in files):
        return None
    for name in files:
        path = folder / name
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
            return None
    return {*files, EXPORT_RECORD}


def export_record(fmt: str, files: list[str], checkpoint: Path, iteration: int) -> str:
    """The record written last into an export folder (see `exported_files`)."""
    record = {"format": fmt, "files": sorted(files), "checkpoint": str(checkpoint), "iteration": iteration}
    return json.dumps(record, indent=2) + "\n"


def _first_few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
