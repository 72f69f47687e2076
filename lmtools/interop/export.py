"""`lmtools export`: a checkpoint written out as a Hugging Face folder, plain safetensors or GGUF.

The folder is written under a temporary name beside `--out`, then put in place in one rename
(an atomic exchange when it replaces an earlier export), so a failed or killed export leaves the
old folder or nothing; what a killed export left is removed by the next one to the same `--out`.
One export writes an `--out` at a time (a lock beside it), and `--overwrite` replaces only a
folder that export wrote (lmtools.runtime.ownership).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lmtools.checkpoint import model_from_payload, read_checkpoint, stored_model_config, tokenizer_from_checkpoint
from lmtools.errors import ConfigError
from lmtools.interop.gguf import write_gguf
from lmtools.interop.hf import (
    check_exportable,
    generation_config,
    json_text,
    llama_config,
    model_card,
    to_hf_state,
    tokenizer_files,
    write_safetensors,
)
from lmtools.layout import EOT
from lmtools.runtime.fsutil import disk_full, fsync_dir, fsync_file, remove_stale_temp_files, replace_folder
from lmtools.runtime.lock import exclusive, lock_path_for
from lmtools.runtime.ownership import EXPORT_RECORD, check_export_target, export_record

FORMATS = ("hf", "safetensors", "gguf")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "hf",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a checkpoint (plain or sharded) as a Hugging Face folder (`fmt="hf"`), as plain
    lmtools weights with the model config as safetensors metadata (`fmt="safetensors"`), or as
    one GGUF file for llama.cpp (`fmt="gguf"`). Returns the files of the folder written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be hf, safetensors or gguf, got {fmt!r}")
    out = Path(os.path.abspath(out))
    if not out.name:
        raise ConfigError(f"--out {out} is the root folder; choose a folder to write")
    check_export_target(out, overwrite, Path(checkpoint))  # at once, before taking any lock
    _make_parent(out)
    with exclusive(lock_path_for(out), f"--out {out}", "wait for that export to finish or choose another --out"):
        check_export_target(out, overwrite, Path(checkpoint))  # again: another export may have just written it
        remove_stale_temp_files(out.parent, names={out.name})  # left by a killed export
        return _export(Path(checkpoint), out, fmt, tokenizer)


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--out {out}: cannot create its parent folder ({_reason(exc)}); choose another --out"
        ) from None


def _export(checkpoint: Path, out: Path, fmt: str, tokenizer: str | None) -> list[Path]:
    """Read, check and build everything, then write the folder beside `out` and put it in place."""
    payload = read_checkpoint(checkpoint)
    if fmt != "safetensors":  # before building: a newer option this model code lacks is named too
        check_exportable(dict(stored_model_config(payload)))
    tok = None
    if fmt != "safetensors" or tokenizer or payload.get("tokenizer_json"):
        tok = tokenizer_from_checkpoint(payload, tokenizer, checkpoint)
    model = model_from_payload(payload, checkpoint)
    if fmt != "safetensors":
        check_exportable(model.config.to_dict())
    files: dict[str, str] = {}
    if tok is not None:  # the stored text as it was written, else the loaded file's
        stored = payload.get("tokenizer_json")
        files["tokenizer.json"] = stored if stored and not tokenizer else tok.to_str(pretty=True)
    eot_id = tok.token_to_id(EOT) if tok is not None else None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir()
        _write_export(tmp, fmt, payload, model, files, eot_id)
        written = [entry.name for entry in tmp.iterdir()]
        record = tmp / EXPORT_RECORD
        record.write_text(export_record(fmt, written, checkpoint, int(payload.get("iteration", 0))), encoding="utf-8")
        fsync_file(record)
        fsync_dir(tmp)
        replace_folder(tmp, out)
        fsync_dir(out.parent)
    except OSError as exc:
        raise ConfigError(
            f"--out {out}: cannot write the export ({_reason(exc, out.parent)}); nothing was changed"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.iterdir())


def _write_export(folder: Path, fmt: str, payload: dict, model, files: dict[str, str], eot_id: int | None) -> None:
    """The files of one export format, into `folder`."""
    model_cfg, state = model.config.to_dict(), model.state_dict()
    if fmt == "hf":
        write_safetensors(folder / "model.safetensors", to_hf_state(state, model_cfg), {})
        files |= tokenizer_files(files["tokenizer.json"], EOT, model_cfg["context_length"])
        files["config.json"] = json_text(llama_config(model_cfg, eot_id, next(iter(state.values())).dtype))
        files["generation_config.json"] = json_text(generation_config(eot_id))
        files["README.md"] = model_card(payload, model_cfg, model.num_parameters())
    elif fmt == "gguf":
        write_gguf(folder / "model.gguf", state, model_cfg, files.pop("tokenizer.json"), eot_id)
    else:
        meta = {"lmtools_model_config": json.dumps(model_cfg), "lmtools_iteration": str(payload.get("iteration", 0))}
        write_safetensors(folder / "model.safetensors", dict(state), meta)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    for entry in folder.iterdir():  # the weights too: the rename must not land before the data
        fsync_file(entry)


def _reason(exc: OSError, folder: Path | None = None) -> str:
    """Why a write failed, in words. A short write (numpy's, under gguf) carries no errno: a full
    device is then told by what is left on it."""
    if disk_full(exc) or (exc.errno is None and folder is not None and _full(folder)):
        return "no space left on the device: free some space or choose another --out"
    return exc.strerror or str(exc)


def _full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20
