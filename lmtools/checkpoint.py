"""Checkpoints: atomic to write, safe to load.

A checkpoint is one file that `torch.load(..., weights_only=True)` reads: tensors and plain
data only, so loading one from a stranger can never run code. Writing goes to a temporary file
in the same folder, is flushed and fsynced, then renamed over the old one: a crash at any moment
leaves either the old checkpoint or the new one, never a torn file.

A sharded (FSDP) run writes two parts: every rank writes its shards of the model and optimizer
state into the folder `<checkpoint>.dcp/` with torch.distributed.checkpoint, and rank 0 writes
the checkpoint file as above, holding the plain data and the marker `"dcp": "<folder name>"`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from lmtools.errors import CheckpointError, ConfigError
from lmtools.layout import META_FILE, NPY_MAGIC, PICKLE_PROTO, ZIP_MAGIC, file_head, looks_like
from lmtools.model import MODEL_FIELDS, ModelConfig, TransformerLM, validate_config
from lmtools.runtime.fsutil import fsync_dir
from lmtools.training.preflight import check_inference_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
_TMP_SUFFIX = ".tmp"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (no `_orig_mod.` prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: str | os.PathLike | IO[bytes],
    **extra: Any,
) -> None:
    """Write model and optimizer state, the iteration and any extras to `out`.

    `out` is a path (written atomically) or a binary file object (written as is).
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "model_state_dict": unwrap_model(model).state_dict(),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "iteration": int(iteration),
        **extra,
    }
    _check_plain(payload, "checkpoint")
    if not isinstance(out, (str, os.PathLike)):
        torch.save(payload, out)
        return
    write_atomic(Path(out), lambda f: torch.save(payload, f))


# ---- sharded checkpoints (--fsdp) ------------------------------------------------------------


def dcp_folder(path: str | os.PathLike) -> Path:
    """The folder beside checkpoint `path` that holds its sharded state: `<path>.dcp`."""
    path = Path(path)
    return path.with_name(path.name + ".dcp")


def save_sharded_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    path: str | os.PathLike,
    *,
    is_main: bool,
    **extra: Any,
) -> None:
    """Every rank calls this: shards to `<path>.dcp/` by DCP, then rank 0 writes `path`.

    The shards go to a fresh `.dcp.tmp` folder; rank 0 then moves the previous folder to
    `.dcp.old`, renames the new one into place, writes the checkpoint file, and only then
    drops `.dcp.old`. The shards also record the iteration, so a crash between the renames and
    the file write is detected on resume, which then takes `.dcp.old` (see `load_state`).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    final = dcp_folder(path)
    tmp, old = final.with_name(final.name + _TMP_SUFFIX), final.with_name(final.name + ".old")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save(
            {"model": model_state, "optimizer": optim_state, "iteration": torch.tensor(int(iteration))},
            checkpoint_id=tmp,
        )
    except OSError as exc:
        raise CheckpointError(
            f"could not write the sharded checkpoint {tmp}: {exc.strerror or exc}; free space or choose a "
            f"writable --checkpoint_path (the previous checkpoint is intact)"
        ) from None
    dist.barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        payload = {"format_version": FORMAT_VERSION, "iteration": int(iteration), "dcp": final.name, **extra}
        _check_plain(payload, "checkpoint")
        write_atomic(path, lambda f: torch.save(payload, f))
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_sharded(payload: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore DCP shards into `model` (sharded or not) and `optimizer`; every rank calls this."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    folder = _sound_dcp_folder(payload)
    distributed = dist.is_available() and dist.is_initialized()
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    try:
        _dcp_load(state, folder, no_dist=not distributed)
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"the sharded checkpoint {folder} does not match this model ({_first_line(exc)}); "
            f"use the model flags it was trained with"
        ) from None
    if folder.name.endswith(".old") and distributed:
        # A save was cut between its renames: put the sound folder back where the file points.
        dist.barrier()
        if dist.get_rank() == 0:
            final = folder.with_name(folder.name.removesuffix(".old"))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(folder, final)
        dist.barrier()


def _dcp_load(state: dict, folder: Path, *, no_dist: bool) -> None:
    """dcp.load, but without unpickling code: the indexes are vetted, non-tensor items load weights-only."""
    import warnings

    import torch.distributed.checkpoint as dcp

    # Every index DCP may unpickle (the global one and per-rank ones) is checked first.
    for index in sorted(folder.glob("*.metadata")):
        _check_dcp_metadata(index)
    with warnings.catch_warnings():
        # One process reading shards (sample, inspect, the iteration check) is intended.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=folder, planner=_safe_dcp_planner(folder), no_dist=no_dist)


# DCP pickles its .metadata and loads non-tensor items with weights_only=False. Its own
# classes, torch's dtypes and sizes, and plain containers are all a sound .metadata references.
_DCP_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "torch.distributed.tensor.")
_DCP_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
    ("torch", "layout"),
    ("torch", "memory_format"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("datetime", "datetime"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _DcpIndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, resolving only DCP's own classes and plain torch/builtin types."""

    def find_class(self, module: str, name: str) -> Any:
        is_torch_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module.startswith(_DCP_SAFE_MODULES) or (module, name) in _DCP_SAFE_GLOBALS or is_torch_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _check_dcp_metadata(path: Path) -> None:
    """Refuse a .metadata pickle that names anything but DCP's own plain classes."""
    try:
        with open(path, "rb") as f:
            _DcpIndexUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it references {exc}, which a sharded checkpoint never holds "
            f"(only load checkpoints written by lmtools)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path} is not a sound sharded-checkpoint index ({_first_line(exc)})") from None


def _safe_dcp_planner(folder: Path):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"refusing to load {folder}: a shard holds pickled code or objects, not plain data"
                ) from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyPlanner()


def _sound_dcp_folder(payload: dict) -> Path:
    """The shard folder whose recorded iteration is the checkpoint file's (`.dcp`, else `.dcp.old`)."""
    if "dcp_path" not in payload:
        raise CheckpointError("this checkpoint keeps its state in a .dcp folder; load it from its path")
    final = Path(payload["dcp_path"])
    for folder in (final, final.with_name(final.name + ".old")):
        if not (folder / ".metadata").is_file():
            continue
        stored = {"iteration": torch.tensor(-1)}
        try:
            _dcp_load(stored, folder, no_dist=True)
        except CheckpointError:  # refused as unsafe: never fall back past that
            raise
        except Exception:  # a torn folder: try the next one
            continue
        if int(stored["iteration"]) == int(payload["iteration"]):
            return folder
    raise CheckpointError(
        f"the sharded state {final} is missing or does not hold iteration {payload['iteration']}; "
        f"keep the .dcp folder beside its checkpoint file"
    )


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse to write what weights-only loading would refuse to read (e.g. a str subclass)."""
    if type(obj) in (dict, list, tuple) or isinstance(obj, dict):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(obj, dict) and type(key) not in _PLAIN:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not plain data")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) not in _PLAIN and not isinstance(obj, torch.Tensor):
        raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold tensors and plain data only")


def write_atomic(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync, and rename it over `path`."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; create it or choose another --checkpoint_path"
        )
    tmp = folder / f".{path.name}.{os.getpid()}{_TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; free space or choose a writable --checkpoint_path "
            f"(the previous checkpoint is intact)"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def read_checkpoint(src: str | os.PathLike | IO[bytes], *, suggest: bool = True) -> dict:
    """Load a checkpoint's contents on the CPU without ever unpickling code.

    When a path fails to load and `suggest` is set, the error names the newest sound
    checkpoint beside it as the way on.
    """
    way_on = _way_on if suggest else (lambda _name: "")
    name = src if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist{way_on(path)}")
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint file")
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (a torn write?){way_on(path)}")
    try:
        payload = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _is_unsafe(exc):
            raise CheckpointError(
                f"refusing to load {name}: it holds pickled code or objects, not plain tensors and data "
                f"(only load checkpoints written by lmtools or other weights-only files)"
            ) from None
        raise CheckpointError(f"checkpoint {name} is corrupted ({_first_line(exc)}){way_on(name)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {name} is truncated or corrupted ({_first_line(exc)}){way_on(name)}"
        ) from None
    if not isinstance(payload, dict) or not ("model_state_dict" in payload or "dcp" in payload):
        raise CheckpointError(f"{name} is not an lmtools checkpoint (no model_state_dict)")
    if "dcp" in payload and isinstance(src, (str, os.PathLike)):
        # Sharded state lives beside the file; `load_state` reads it from here.
        payload["dcp_path"] = str(Path(src).parent / str(payload["dcp"]))
    return payload


def load_checkpoint(
    src: str | os.PathLike | IO[bytes],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Restore model (and optimizer) state from `src`; return the stored iteration."""
    return load_state(read_checkpoint(src), model, optimizer)


def load_state(payload: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore model (and optimizer) state from a loaded checkpoint; return its iteration.

    A sharded checkpoint (`"dcp"` in the payload) loads from its `.dcp` folder, into a sharded
    model on every rank or into a plain model in one process.
    """
    if "dcp" in payload:
        _load_sharded(payload, unwrap_model(model), optimizer)
        return int(payload["iteration"])
    try:
        unwrap_model(model).load_state_dict(payload["model_state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint does not match the model: {_state_dict_problem(exc)}; use the model flags it was trained with"
        ) from None
    if optimizer is not None and payload.get("optimizer_state_dict") is not None:
        try:
            optimizer.load_state_dict(payload["optimizer_state_dict"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"the checkpoint's optimizer state does not match this model ({_first_line(exc)})"
            ) from None
    return int(payload["iteration"])


def _is_unsafe(exc: Exception) -> bool:
    text = str(exc)
    return "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text


def _state_dict_problem(exc: BaseException) -> str:
    """The line of load_state_dict's error that names a tensor (its first line names none)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith(("size mismatch for", "Missing key(s)", "Unexpected key(s)")):
            return line[:300]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


# ---- rolling snapshots (--keep_last) and finding a sound checkpoint -------------------------


def snapshot_path(path: Path, iteration: int) -> Path:
    return path.with_name(f"{path.stem}-{iteration:08d}{path.suffix}")


def snapshots(path: Path) -> list[Path]:
    """Snapshots of `path` (stem-NNNNNNNN.suffix), newest first."""
    return [p for _, p in _numbered_snapshots(path)]


def _numbered_snapshots(path: Path) -> list[tuple[int, Path]]:
    pattern = re.compile(re.escape(path.stem) + r"-(\d{8})" + re.escape(path.suffix) + "$")
    found = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def keep_snapshot(path: Path, iteration: int, keep_last: int, protect: Path | None = None) -> None:
    """Hard-link the new checkpoint as a snapshot and prune all but the `keep_last` newest up
    to `iteration`. Never pruned: `protect` (the file a run started from), and snapshots past
    `iteration` (left by a run rolled back to an older one: each is replaced when the run
    reaches its iteration)."""
    if keep_last <= 0:
        return
    snap = snapshot_path(path, iteration)
    tmp = snap.with_name(f".{snap.name}.{os.getpid()}{_TMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # filesystems without hard links get a copy
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(tmp, snap)
    current = [p for it, p in _numbered_snapshots(path) if it <= iteration]
    keep = os.path.abspath(protect) if protect is not None else None
    for old in current[keep_last:]:
        if os.path.abspath(old) != keep:
            old.unlink(missing_ok=True)


def newest_sound(path: Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint beside `path` (itself or a snapshot) that loads."""
    candidates = [path, *snapshots(path)]
    for cand in candidates:
        if exclude is not None and cand.resolve() == exclude.resolve():
            continue
        if not cand.is_file():
            continue
        try:
            read_checkpoint(cand, suggest=False)
        except CheckpointError:
            continue
        return cand
    return None


def _way_on(name) -> str:
    if not isinstance(name, (str, os.PathLike)) or str(name) == "<file object>":
        return ""
    path = Path(name)
    sound = newest_sound(path, exclude=path)
    return f"; the newest sound checkpoint beside it is {sound}" if sound else ""


def snapshot_base(path: str | os.PathLike) -> Path:
    """The run's main checkpoint path for a snapshot (`ckpt-00001000.pt` -> `ckpt.pt`)."""
    path = Path(path)
    m = re.match(r"(.+)-\d{8}$", path.stem)
    return path.with_name(m.group(1) + path.suffix) if m else path


# ---- reading what a checkpoint holds: the one place that knows its fields ----------------------


def check_checkpoint_file(path: Path, command: str) -> None:
    """Refuse, in words, a path given where a checkpoint belongs that is something else: a
    token file, a prepared folder, text. A missing file is left to `read_checkpoint`."""
    fix = f"{command} needs a checkpoint written by lmtools train (e.g. runs/NAME/checkpoint.pt)"
    if not path.exists():
        return
    if path.is_dir():
        kind = "a prepared dataset folder" if (path / META_FILE).is_file() else "a folder"
        raise CheckpointError(f"{path} is {kind}, not a checkpoint; {fix}")
    head = file_head(path)
    if path.suffix.lower() in (".npy", ".bin") or head.startswith(NPY_MAGIC):
        raise CheckpointError(
            f"{path} is a token file, not a checkpoint; {fix}, e.g. after lmtools train --train_data {path}"
        )
    if not (head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO])):
        raise CheckpointError(f"{path} is {looks_like(path, head)}, not a checkpoint; {fix}")


def peek_checkpoint(path: Path) -> dict | None:
    """The plain data of an lmtools checkpoint without reading its tensors (memory-mapped),
    or None when `path` is no lmtools checkpoint."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file, pickled code, torn: none is a checkpoint to replace
        return None
    if isinstance(payload, dict) and ("model_state_dict" in payload or "dcp" in payload) and "iteration" in payload:
        return payload
    return None


def stored_config(payload: dict) -> dict:
    """The run config a checkpoint records ({} when it holds none)."""
    config = payload.get("config")
    return config if isinstance(config, dict) else {}


def stored_user_config(payload: dict) -> dict:
    """The run config as the user passed it (older checkpoints hold only the resolved one)."""
    user = payload.get("user_config")
    return user if isinstance(user, dict) and user else stored_config(payload)


def stored_model_config(payload: dict) -> dict:
    """The model config a checkpoint records: its own entry, or (older checkpoints) the model
    fields of its run config."""
    config = stored_config(payload)
    return payload.get("model_config") or {k: config[k] for k in MODEL_FIELDS if k in config}


def stored_tokenizer_text(payload: dict, checkpoint: Path) -> str | None:
    """The checkpoint's tokenizer.json text: stored in it, or the file it names (if still there)."""
    config = stored_config(payload)
    for value in (payload.get("tokenizer_json"), payload.get("tokenizer"), config.get("tokenizer")):
        if isinstance(value, dict):
            return json.dumps(value)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return value
    _, named = named_tokenizer_files(payload, checkpoint)
    for cand in named:
        if cand.is_file():
            return cand.read_text(encoding="utf-8")
    return None


def named_tokenizer_files(payload: dict, checkpoint: str | os.PathLike | None) -> tuple[str | None, list[Path]]:
    """The tokenizer file a checkpoint names (those written before the text was stored in it),
    and where it may be: as named, then of that name beside the checkpoint."""
    ref = payload.get("tokenizer") or stored_config(payload).get("tokenizer")
    if not isinstance(ref, str) or not ref or ref.lstrip().startswith("{"):
        return None, []
    candidates = [Path(ref)]
    if checkpoint is not None:
        candidates.append(Path(checkpoint).parent / Path(ref).name)
    return ref, candidates


def tokenizer_from_checkpoint(
    payload: dict, override: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None
) -> Tokenizer:
    """The tokenizer of a checkpoint: `override`, else the tokenizer.json text stored in it, else
    (checkpoints written before it was stored) the file it names, or one of that name beside it."""
    from tokenizers import Tokenizer

    if override:
        return _tokenizer_file(Path(override))
    text = payload.get("tokenizer_json")
    if isinstance(text, str) and text:
        try:
            return Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ConfigError(
                f"the checkpoint's stored tokenizer does not load ({str(exc).splitlines()[0]}); "
                f"pass --tokenizer PATH/tokenizer.json"
            ) from None
    ref, candidates = named_tokenizer_files(payload, checkpoint)
    for cand in candidates:
        if cand.is_file():
            return _tokenizer_file(cand)
    where = f" (it names {ref}, which is gone)" if ref else ""
    raise ConfigError(
        f"no tokenizer for this checkpoint{where}; pass --tokenizer PATH/tokenizer.json from lmtools prepare"
    )


def _tokenizer_file(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ConfigError(f"--tokenizer {path}: no such file; give the tokenizer.json from lmtools prepare")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ConfigError(f"{path} is not a tokenizer.json ({str(exc).splitlines()[0]})") from None


def model_from_payload(payload: dict, checkpoint: str | Path = "the checkpoint") -> TransformerLM:
    """The model a loaded checkpoint holds (plain or sharded), on the CPU."""
    model_cfg = stored_model_config(payload) or stored_config(payload)
    try:
        # Options a checkpoint predates keep their defaults (the specification's model).
        config = ModelConfig.from_dict({k: model_cfg[k] for k in MODEL_FIELDS[:6]} | model_cfg)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{checkpoint} holds no model config ({exc} missing); it was not written by lmtools"
        ) from None
    validate_config(config)
    check_inference_model(config, checkpoint)  # before allocating: a stored config is input too
    model = TransformerLM.from_config(config)
    load_state(payload, model)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{checkpoint} holds non-finite weights ({name}); sample from an earlier checkpoint of the run"
            )
    return model
