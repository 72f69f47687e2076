"""What a file holds: a checkpoint, a token file or a prepared folder, described as plain data.

`inspect_path` returns a JSON-ready dict (the CLI renders it as a table or prints it as JSON).
Nothing here unpickles code: checkpoints are read weights-only (`read_checkpoint`), token
files through the Rust header check and a memory map. A file that is not what its name claims
(a text file named `.pt`, a 2-D or float `.npy`, random bytes) raises a `DataError` or
`CheckpointError` that says what it is instead.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmtools import _sampler
from lmtools.config.train_config import TrainConfig
from lmtools.data.dataset import known_range
from lmtools.data.prepare import read_meta
from lmtools.errors import CheckpointError, DataError, LMToolsError
from lmtools.layout import (
    EOT,
    META_FILE,
    NPY_MAGIC,
    PICKLE_PROTO,
    TOKEN_DTYPES_TEXT,
    TOKENIZER_FILE,
    TRAIN_FILE,
    ZIP_MAGIC,
    file_head,
    looks_like,
    token_dtype_name,
)
from lmtools.runtime.fsutil import regular_file_problem
from lmtools.training.preflight import check_stored_config
from lmtools.training.schedule import describe_schedule, lr_at

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
MODULE_ORDER = ("token_embeddings", "layers", "ln_final", "lm_head")

_EXCERPT_TOKENS = 512  # decoded, then cut to the requested number of characters
_COUNT_CHUNK = 1 << 24  # tokens per chunk when counting end-of-text ids
# Without --full, a token file whose meta.json does not give its range and counts is read whole
# up to this size; a larger one is sampled: SAMPLE_BLOCKS evenly spaced blocks of SAMPLE_BYTES.
READ_ALL_BYTES = 64 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 << 10
_BESIDE = object()  # default: look for the tokenizer beside the file


def inspect_path(
    path: str | os.PathLike, *, dtype: str | None = None, excerpt_chars: int = 200, full: bool = False
) -> dict:
    """Describe a checkpoint, a token file (`.npy`, or raw with `dtype`) or a prepared folder.

    A token file's id range and document count come from its meta.json when that describes it;
    else a file up to `READ_ALL_BYTES` is read whole, a larger one sampled (the values marked
    estimated). `full`: read every token of every file for exact values.
    """
    p = Path(path)
    problem = None if p.is_dir() else regular_file_problem(p)
    if problem == "file not found":
        raise DataError(f"{p} does not exist; pass a checkpoint, a token file or a prepared folder")
    if problem is not None:  # a FIFO would block the first read forever
        raise DataError(f"{p} {problem}; pass a checkpoint, a token file or a prepared folder")
    if p.is_dir():
        return inspect_dataset(p, excerpt_chars=excerpt_chars, full=full)
    suffix = p.suffix.lower()
    head = file_head(p)
    if suffix in (".npy", ".bin") or dtype is not None or head.startswith(NPY_MAGIC):
        return inspect_token_file(p, dtype=dtype, excerpt_chars=excerpt_chars, full=full)
    if suffix in CHECKPOINT_SUFFIXES or head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO]):
        return inspect_checkpoint(p)
    raise DataError(
        f"{p} is {looks_like(p, head)}; inspect reads checkpoints (.pt), token files (.npy, or .bin with --dtype) "
        f"and folders written by lmtools prepare"
    )


# ---- checkpoints ---------------------------------------------------------------------------


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """Format, model, parameters, optimizer, schedule position, metrics, data and versions."""
    from lmtools.checkpoint import read_checkpoint, stored_config, stored_model_config  # torch: not for token files

    p = Path(path)
    _check_checkpoint_head(p)
    payload = read_checkpoint(p, suggest=False)
    config, model_config = stored_config(payload), stored_model_config(payload)
    check_stored_config(model_config if isinstance(model_config, dict) else {}, p)
    sharded = "dcp" in payload
    # A sharded (--fsdp) checkpoint keeps its tensors in the .dcp folder: shapes come from the config.
    state = _config_shapes(model_config) if sharded else payload["model_state_dict"]
    if not isinstance(state, dict) or not all(hasattr(t, "shape") for t in state.values()):
        raise CheckpointError(f"{p} is not an lmtools checkpoint (its model_state_dict holds no tensors)")
    problems: list[str] = []
    report = _checkpoint_report(p, payload, config, model_config, state) | {"problems": problems}
    if sharded:
        report["shards"] = _shards(Path(payload["dcp_path"]), problems)
        return _plain(report | {"sound": not problems})
    problems.extend(_weight_problems(model_config, state))
    report["sound"] = not problems
    return _plain(report)


def _check_checkpoint_head(p: Path) -> None:
    """Refuse a file whose first bytes are neither a torch zip nor a pickle."""
    head = file_head(p)
    if not (head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO])):
        raise CheckpointError(
            f"{p} is not a checkpoint: it is {looks_like(p, head)}; checkpoints come from lmtools train"
        )
    if head.startswith(ZIP_MAGIC) and not _is_torch_zip(p):
        raise CheckpointError(f"{p} is not a checkpoint: it is a zip archive without PyTorch's data.pkl")


# The run's settings that `inspect` shows under "training", in this order.
TRAINING_KEYS = (
    "batch_size",
    "context_length",
    "grad_accum_steps",
    "gradient_clip_val",
    "seed",
    "device",
    "dtype",
    "compile",
    "fsdp",
    "checkpoint_interval",
    "eval_interval",
    "log_interval",
    "recipe",
    "optimizer",
    "muon_lr",
    "doc_aligned",
)


def _checkpoint_report(p: Path, payload: dict, config: dict, model_config: dict, state: dict) -> dict[str, Any]:
    """What the payload says about its run, section by section (problems not yet included)."""
    iteration = int(payload.get("iteration", 0))
    return {
        "kind": "checkpoint",
        "path": str(p),
        "file_size": p.stat().st_size,
        "format_version": payload.get("format_version"),
        "iteration": iteration,
        "lmtools_version": payload.get("lmtools_version"),
        "torch_version": payload.get("torch_version"),
        "model": dict(model_config, weights_dtype=", ".join(sorted({_tensor_dtype(t) for t in state.values()}))),
        "parameters": parameter_counts(state),
        "optimizer": _optimizer(payload.get("optimizer_state_dict")),
        "schedule": _schedule(iteration, config),
        "metrics": payload.get("metrics") or {},
        "data": _data(config, payload.get("sampler")),
        "tokenizer": _tokenizer_ref(payload, p),
        "training": _training_settings(config, payload),
    }


def _training_settings(config: dict, payload: dict) -> dict[str, Any]:
    training = {k: config[k] for k in TRAINING_KEYS if k in config}
    if "skipped_steps" in payload:
        training["skipped_steps"] = int(payload["skipped_steps"])
    return training


def _weight_problems(model_config: dict, state: dict) -> list[str]:
    """Non-finite weights, and weights whose shapes the config does not describe."""
    problems = []
    nonfinite = [name for name, t in state.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if nonfinite:
        problems.append(f"non-finite values in {len(nonfinite)} tensors: {', '.join(nonfinite[:5])}")
    return problems + _shape_problems(model_config, state)


def _config_shapes(model_config: dict) -> dict:
    """The state dict (meta tensors: shapes, no data) of the model a config describes; {} if none."""
    import torch  # torch and the model only for checkpoints: inspecting token files starts without them

    from lmtools.model import TransformerLM

    try:
        with torch.device("meta"):
            return TransformerLM.from_config(model_config).state_dict()
    except Exception:  # no or an invalid config: reported as a problem by the caller's checks
        return {}


def _shards(folder: Path, problems: list[str]) -> dict:
    """The .dcp folder of a sharded checkpoint: its files and size (the shards are not read)."""
    files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    if not (folder / ".metadata").is_file():
        problems.append(f"its sharded state {folder} is missing or incomplete (no .metadata)")
    return {"folder": str(folder), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def parameter_counts(state: dict) -> dict[str, int]:
    """Parameter count per top-level module (token_embeddings, layers, ln_final, lm_head) and total."""
    counts: dict[str, int] = {}
    for name, tensor in state.items():
        top = name.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + int(tensor.numel())
    ordered = {k: counts.pop(k) for k in MODULE_ORDER if k in counts}
    ordered.update(sorted(counts.items()))
    ordered["total"] = sum(ordered.values())
    return ordered


def _optimizer(opt_state: Any) -> dict:
    if isinstance(opt_state, dict) and set(opt_state) == {"adamw", "muon"}:  # --optimizer muon
        return {"muon": _optimizer(opt_state["muon"]), "adamw": _optimizer(opt_state["adamw"])}
    if not isinstance(opt_state, dict) or not opt_state.get("param_groups"):
        return {}
    groups = opt_state["param_groups"]
    first = groups[0]
    out: dict[str, Any] = {}
    for key in ("lr", "betas", "eps"):
        if key in first:
            out[key] = first[key]
    decays = [g.get("weight_decay") for g in groups]
    out["weight_decay"] = decays[0] if len(set(decays)) == 1 else decays
    out["param_groups"] = len(groups)
    out["parameters_per_group"] = [len(g.get("params", [])) for g in groups]
    steps = [s["step"] for s in opt_state.get("state", {}).values() if isinstance(s, dict) and "step" in s]
    if steps:
        out["step"] = int(max(float(s) for s in steps))
    return out


def _schedule(iteration: int, config: dict) -> dict:
    needed = ("max_iters", "warmup_iters", "learning_rate", "min_learning_rate")
    if not all(k in config for k in needed):
        return {"iteration": iteration}
    cfg = TrainConfig.from_dict(config)
    max_iters, warmup = cfg.max_iters, cfg.warmup_iters
    extended = [ext for ext in cfg.schedule_extensions if iteration > ext["start"]]
    if iteration < warmup:
        phase = "warmup"
    elif iteration >= max_iters:
        phase = "finished"
    elif extended:
        phase = f"extended cosine (from iter {extended[-1]['start']})"
    else:
        phase = "cosine decay"
    return {
        "iteration": iteration,
        "max_iters": max_iters,
        "warmup_iters": warmup,
        "progress": iteration / max_iters if max_iters else None,
        "phase": phase,
        "max_lr": cfg.learning_rate,
        "min_lr": cfg.min_learning_rate,
        # The rate of the step that produced this checkpoint (the loop uses iteration 1..max_iters).
        "lr": lr_at(cfg, max(iteration, 1)),
        "remaining_iters": max(max_iters - iteration, 0),
        "description": describe_schedule(cfg),
    }


def _data(config: dict, sampler: Any) -> dict:
    out: dict[str, Any] = {}
    train = config.get("train_data")
    if train is not None:
        out["train_data"] = list(train) if isinstance(train, (list, tuple)) else [train]
        missing = [s for s in out["train_data"] if not Path(_strip_weight(s)).exists()]
        if missing:
            out["missing"] = missing
    if config.get("val_data"):
        out["val_data"] = config["val_data"]
    if config.get("val_sets"):
        out["val_sets"] = dict(config["val_sets"])
    if config.get("init_from"):
        out["init_from"] = config["init_from"]
    if config.get("data_dtype"):
        out["data_dtype"] = config["data_dtype"]
    if isinstance(sampler, dict) and sampler:
        out["sampler"] = {k: sampler[k] for k in ("step", "micro", "seed", "rank", "num_tokens") if k in sampler}
        try:
            per_step = (
                int(sampler["batch_size"]) * int(sampler["context_length"]) * int(sampler.get("grad_accum_steps", 1))
            )
            out["sampler"]["tokens_seen"] = int(sampler["step"]) * per_step
        except (KeyError, TypeError, ValueError):
            pass
    return out


def _strip_weight(spec: str) -> str:
    head, sep, tail = str(spec).rpartition(":")
    if sep and head:
        try:
            float(tail)
            return head
        except ValueError:
            pass
    return str(spec)


def _tokenizer_ref(payload: dict, checkpoint: Path) -> dict:
    """Where the checkpoint's tokenizer comes from: stored in it, or the file it names."""
    from lmtools.checkpoint import named_tokenizer_files, tokenizer_from_checkpoint  # torch: not for token files

    ref, candidates = named_tokenizer_files(payload, checkpoint)
    report: dict[str, Any] = {"path": ref, "stored": bool(payload.get("tokenizer_json"))}
    if ref:
        found = next((cand for cand in candidates if cand.is_file()), None)
        report["found"] = str(found) if found else None
    try:
        report["vocab_size"] = tokenizer_from_checkpoint(payload, checkpoint=checkpoint).get_vocab_size()
    except LMToolsError:
        report["vocab_size"] = None  # no usable tokenizer: sample and eval of text need --tokenizer
    return report


def _shape_problems(model_config: dict, state: dict) -> list[str]:
    """Compare the state dict with the model its config describes (built on the meta device)."""
    import torch  # torch and the model only for checkpoints: inspecting token files starts without them

    from lmtools.model import TransformerLM

    fields = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff")
    if not all(k in model_config for k in fields):
        return ["no complete model config: the checkpoint cannot be loaded by lmtools sample or resume"]
    try:
        with torch.device("meta"):
            model = TransformerLM.from_config(model_config)
    except Exception as exc:  # a config that validate_config refuses
        return [f"model config is invalid: {exc}"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if missing := sorted(set(expected) - set(got)):
        problems.append(f"{len(missing)} tensors missing from the weights: {', '.join(missing[:3])}")
    if extra := sorted(set(got) - set(expected)):
        problems.append(f"{len(extra)} unexpected tensors in the weights: {', '.join(extra[:3])}")
    wrong = [k for k in expected if k in got and expected[k] != got[k]]
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} tensors do not match the model config, e.g. {k} {got[k]} vs {expected[k]}")
    return problems


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return True  # a truncated torch file: let read_checkpoint name the damage


# ---- token files and prepared folders -------------------------------------------------------


def inspect_token_file(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    meta: dict | None = None,
    tokenizer: Any = _BESIDE,
    excerpt_chars: int = 200,
    full: bool = False,
) -> dict:
    """Tokens, dtype, token range, documents, bytes per token and a decoded excerpt.

    `meta` and `tokenizer` default to the `meta.json` and `tokenizer.json` beside the file
    (`tokenizer=None`: no tokenizer, no excerpt). The range and the document count come from
    meta.json when it describes the file (its token count, not newer than it); else from reading
    the file, whole when it is at most READ_ALL_BYTES or `full`, else from a sample (marked
    "estimated").
    """
    import functools

    p = Path(path)
    is_npy = p.suffix.lower() == ".npy"
    token_file = _open_token_file(p, is_npy, dtype)
    n = len(token_file)
    if meta is None:
        meta = _meta_beside(p)
    recorded = None if full else _meta_range(p, n, meta)
    sample = None
    if not n:
        rng = None
    elif recorded is not None:
        rng = recorded
    elif full or n * np.dtype(token_file.dtype).itemsize <= READ_ALL_BYTES:
        rng = token_file.token_range()
    else:
        sample = _sample_tokens(p, token_file)
        rng = (int(sample.min()), int(sample.max()))
    if tokenizer is _BESIDE:
        tokenizer = _tokenizer_beside(p, meta)
    vocab_size = _meta_int(meta, "vocab_size")
    if vocab_size is None and tokenizer is not None:
        vocab_size = int(tokenizer.get_vocab_size())
    report: dict[str, Any] = {
        "kind": "token_file",
        "path": str(p),
        "format": "npy" if is_npy else "raw",
        "file_size": p.stat().st_size,
        "dtype": token_file.dtype,
        "tokens": n,
        "min_token": rng[0] if rng else None,
        "max_token": rng[1] if rng else None,
        "vocab_size": vocab_size,
    }
    if sample is not None:
        report["token_range_from"] = _estimated(sample, n)
    problems = _range_problems(rng, vocab_size)
    tokens = functools.cache(lambda: _open_tokens(p, is_npy, token_file.dtype))  # opened once, if at all
    report |= _documents(p, n, meta, tokenizer, tokens, sample, full)
    bpt = _meta_float(meta, "bytes_per_token")
    if bpt is not None:
        report["bytes_per_token"] = bpt
    if tokenizer is not None and n and excerpt_chars > 0 and not problems:
        ids = [int(t) for t in np.asarray(tokens()[:_EXCERPT_TOKENS])]
        report["excerpt"] = tokenizer.decode(ids, skip_special_tokens=False)[:excerpt_chars]
    report["problems"] = problems
    report["sound"] = not problems
    return _plain(report)


def _open_token_file(p: Path, is_npy: bool, dtype: str | None):
    """The Rust extension's TokenFile of `p`, after the checks that name what to fix."""
    if not is_npy and file_head(p).startswith(NPY_MAGIC):
        raise DataError(f"{p} holds a .npy array under another name; rename it to {p.stem}.npy")
    if not is_npy and dtype is None:
        raise DataError(f"{p} is a raw token file; pass --dtype ({TOKEN_DTYPES_TEXT})")
    if is_npy:
        _sampler.read_npy_header(str(p))  # 2-D, float, big-endian or not-npy: a DataError naming the fix
    return _sampler.TokenFile.open(str(p), None if is_npy else token_dtype_name(dtype, "--dtype"))


def _meta_range(p: Path, n: int, meta: dict | None) -> tuple[int, int] | None:
    """The id range meta.json records for `p` while it describes `p` as it is now (its train or
    val file, holding the tokens it counts, not written after it); else None."""
    known = known_range(meta, p) if meta else None
    return (known.lo, known.hi) if known is not None and known.holds(p, n) else None


def _sample_tokens(p: Path, token_file) -> np.ndarray:
    """SAMPLE_BLOCKS evenly spaced blocks of the file's tokens (first and last included), read
    with pread: a few MB whatever the file's size."""
    dtype = np.dtype(token_file.dtype).newbyteorder("<")
    n = len(token_file)
    offset = _sampler.read_npy_header(str(p))[2] if p.suffix.lower() == ".npy" else 0
    per_block = max(1, SAMPLE_BYTES // dtype.itemsize)
    last = max(0, n - per_block)
    starts = sorted({last * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
    parts = []
    with open(p, "rb") as f:
        for start in starts:
            count = min(per_block, n - start)
            raw = os.pread(f.fileno(), count * dtype.itemsize, offset + start * dtype.itemsize)
            parts.append(np.frombuffer(raw, dtype=dtype))
    return np.concatenate(parts)


def _estimated(sample: np.ndarray, n: int, what: str = "") -> str:
    share = len(sample) / n
    return (
        f"estimated{' from ' + what if what else ''} in a sample of {len(sample):,} of {n:,} tokens "
        f"({share:.1%}); --full reads them all"
    )


def _range_problems(rng: tuple[int, int] | None, vocab_size: int | None) -> list[str]:
    problems = []
    if rng and rng[0] < 0:
        problems.append(f"negative token id {rng[0]}")
    if rng and vocab_size is not None and rng[1] >= vocab_size:
        problems.append(f"token id {rng[1]} is beyond the vocabulary ({vocab_size})")
    return problems


def _documents(
    p: Path,
    n: int,
    meta: dict,
    tokenizer: Any,
    tokens: Callable[[], np.ndarray],
    sample: np.ndarray | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """The file's document count (from meta.json, else counted, or estimated from `sample` when
    the file was sampled) and end-of-text id, as report keys. `full`: counted, whatever meta.json says."""
    found: dict[str, Any] = {}
    eot_id = _meta_int(meta, "eot_id", "eot_token", "end_of_text_id")
    if eot_id is None and tokenizer is not None:
        eot_id = tokenizer.token_to_id(EOT)
    documents = None if full else _meta_int(meta, f"{p.stem}_documents")  # prepare's train_ / val_documents
    if documents is not None:
        found["documents"] = documents
        found["documents_from"] = META_FILE
    elif eot_id is not None and n and sample is not None:
        found["documents"] = round(count_token(sample, eot_id) * n / len(sample))
        found["documents_from"] = _estimated(sample, n, f"end-of-text id {eot_id}")
    elif eot_id is not None and n:
        found["documents"] = count_token(tokens(), eot_id)
        found["documents_from"] = f"count of end-of-text id {eot_id}"
    if eot_id is not None:
        found["eot_id"] = eot_id
    return found


def inspect_dataset(folder: str | os.PathLike, *, excerpt_chars: int = 200, full: bool = False) -> dict:
    """A folder written by `lmtools prepare`: meta.json, tokenizer and each split's token file."""
    p = Path(folder)
    splits = {name: p / f"{name}.npy" for name in ("train", "val")}
    meta_path, tok_path = p / META_FILE, p / TOKENIZER_FILE
    if not meta_path.is_file() and not any(f.is_file() for f in splits.values()):
        if (p / "shard.json").is_file():
            raise DataError(
                f"{p} is a shard folder of `lmtools prepare --shard`, not a dataset; "
                "join the shards into one with `lmtools prepare --merge SHARD_DIR... --out DIR`"
            )
        raise DataError(
            f"{p} is a folder but not a prepared dataset (no meta.json, train.npy or val.npy); "
            f"pass a checkpoint, a token file, or a folder written by lmtools prepare"
        )
    meta = _meta_beside(p) or None
    tokenizer = _tokenizer_beside(splits["train"], meta)
    problems = []
    for name, f in ((META_FILE, meta_path), (TRAIN_FILE, splits["train"]), (TOKENIZER_FILE, tok_path)):
        if not f.is_file() and not (name == TOKENIZER_FILE and tokenizer is not None):
            problems.append(f"{name} is missing")
    report: dict[str, Any] = {
        "kind": "dataset",
        "path": str(p),
        "vocab_size": _meta_int(meta, "vocab_size") or (tokenizer.get_vocab_size() if tokenizer else None),
        "tokenizer": str(tok_path) if tok_path.is_file() else None,
        "tokens": sum(_meta_int(meta, f"{n}_tokens") or 0 for n in splits) if meta else None,
        "documents": sum(_meta_int(meta, f"{n}_documents") or 0 for n in splits) if meta else None,
    }
    for key in ("format", "dtype", "eot_id", "bytes_per_token", "text_bytes", "tokenizer_kind", "created"):
        if meta and key in meta and not isinstance(meta[key], dict):
            report[key] = meta[key]
    sources = meta.get("sources") if meta else None
    if isinstance(sources, list):
        sizes = [s.get("bytes", s.get("size")) for s in sources if isinstance(s, dict)]
        report["sources"] = {"files": len(sources), "bytes": sum(int(s) for s in sizes if isinstance(s, (int, float)))}
    for name, f in splits.items():
        if f.is_file():
            sub = inspect_token_file(
                f,
                meta=meta or {},
                tokenizer=tokenizer,
                excerpt_chars=excerpt_chars if name == "train" else 0,
                full=full,
            )
            report[name] = {
                k: v for k, v in sub.items() if k not in ("kind", "path", "vocab_size", "problems", "sound")
            }
            problems.extend(f"{name}.npy: {msg}" for msg in sub["problems"])
            claimed = _meta_int(meta, f"{name}_tokens")
            if claimed is not None and claimed != sub["tokens"]:
                problems.append(
                    f"{name}.npy holds {sub['tokens']:,} tokens but meta.json says {claimed:,}; re-run lmtools prepare"
                )
    if "train" in report and "excerpt" in report["train"]:
        report["excerpt"] = report["train"].pop("excerpt")
    report["problems"] = problems
    report["sound"] = not problems
    return _plain(report)


def count_token(data: np.ndarray, token: int) -> int:
    """How often `token` occurs, in chunks (a memmap is never read whole into memory)."""
    total = 0
    for start in range(0, len(data), _COUNT_CHUNK):
        total += int(np.count_nonzero(data[start : start + _COUNT_CHUNK] == token))
    return total


def _open_tokens(p: Path, is_npy: bool, dtype: str) -> np.ndarray:
    from lmtools.data.loader import load_dataset  # imports torch: only when documents are shown

    return load_dataset(p, dtype=None if is_npy else dtype)


def _meta_beside(p: Path) -> dict:
    """meta.json of the folder holding `p` (or of the folder `p`); {} when there is none."""
    return read_meta(p) or {}


def _tokenizer_beside(p: Path, meta: dict | None):
    """The tokenizer named by meta.json, or tokenizer.json beside `p`; None when absent or unreadable."""
    candidates = []
    if meta and isinstance(meta.get("tokenizer"), str):
        ref = Path(meta["tokenizer"])
        candidates += [p.parent / ref.name, ref]
    candidates.append(p.parent / TOKENIZER_FILE)
    for cand in candidates:
        if cand.is_file():
            try:
                from tokenizers import Tokenizer

                return Tokenizer.from_file(str(cand))
            except Exception:  # tokenizers raises its own Exception type; an excerpt is optional
                return None
    return None


def _meta_int(meta: dict | None, *names: str) -> int | None:
    for name in names:
        if meta and isinstance(meta.get(name), (int, float)) and not isinstance(meta.get(name), bool):
            return int(meta[name])
    return None


def _meta_float(meta: dict | None, name: str) -> float | None:
    value = meta.get(name) if meta else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---- helpers --------------------------------------------------------------------------------


def _tensor_dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _plain(obj: Any) -> Any:
    """JSON-ready: tensors become numbers or lists, tuples lists, non-finite floats None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # torch tensors and numpy arrays
        if getattr(obj, "numel", lambda: obj.size)() > 16:
            return f"<{_tensor_dtype(obj)} tensor of shape {list(obj.shape)}>"
        return _plain(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.integer, np.floating)):
        return _plain(obj.item())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
