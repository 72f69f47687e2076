"""What a run reads: prepared folders resolved to their token files, the tokenizer they share,
and the validation sets that go with them.

A prepared folder (one holding train.npy and meta.json) named as training data always means
its train.npy, with or without a mixture weight; its val.npy is never trained on. With several
prepared folders, each folder's val.npy becomes a named validation set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmtools.config.train_config import DEFAULT_VOCAB_SIZE, TrainConfig
from lmtools.data.corpus import ReadOptions
from lmtools.data.prepare import read_meta
from lmtools.errors import ConfigError, DataError
from lmtools.layout import META_FILE, TRAIN_FILE, VAL_FILE


def parse_source_spec(spec: str) -> tuple[str, float | None]:
    """Splits `"path:weight"` into `(path, weight)`; a spec without a weight gives None.

    The weight is whatever follows the last colon when it reads as a number, so Windows drive
    letters (`C:\\data\\train.npy`) and paths holding colons keep working.
    """
    spec = str(spec).strip()
    path, sep, tail = spec.rpartition(":")
    weight = None
    if sep and not os.path.exists(spec):
        try:
            weight = float(tail)
        except ValueError:
            weight = None
    if weight is None:
        path = spec
    if not path:
        raise DataError(f"source spec {spec!r} names no file; use 'path' or 'path:weight'")
    if weight is not None and not (math.isfinite(weight) and weight > 0):
        raise DataError(f"source spec {spec!r}: the weight must be a positive number, e.g. 'web.npy:0.7'")
    return path, weight


def default_run_name(train_data: list[str]) -> str:
    """The run folder's name for this training data: a prepared folder's name (`data/` -> data,
    also for its train.npy), a token file's stem; a mixture's names joined by '+'."""
    names = []
    for spec in train_data:
        path = Path(parse_source_spec(spec)[0]).absolute()
        if path.is_dir():
            names.append(path.name)
        elif path.stem == "train" and (path.parent / "meta.json").is_file():
            names.append(path.parent.name)
        else:
            names.append(path.stem)
    return "+".join(dict.fromkeys(name for name in names if name)) or "run"


def prepared_folder(path: str | Path) -> Path | None:
    """The folder itself when `path` is a folder written by `lmtools prepare`, else None."""
    p = Path(path)
    if p.is_dir() and (p / TRAIN_FILE).is_file() and (p / META_FILE).is_file():
        return p
    return None


def train_file_spec(spec: str) -> str:
    """`FOLDER` or `FOLDER:WEIGHT` of a prepared folder -> its train.npy (weight kept)."""
    path, weight = parse_source_spec(spec)
    folder = prepared_folder(path)
    if folder is None:
        return spec
    return str(folder / TRAIN_FILE) + (f":{weight}" if weight is not None else "")


def absolute_spec(spec: str) -> str:
    """Absolute path of a data spec (keeping a `:weight` suffix), so resume works from anywhere."""
    path, weight = parse_source_spec(spec)
    # Not resolved: a `.npy` link to an extensionless blob (a Hugging Face cache) is judged by its name.
    return os.path.abspath(path) + (f":{weight}" if weight is not None else "")


def normalise_specs(specs: list[str]) -> list[str]:
    """Training data specs as a run stores them: prepared folders as their train.npy, absolute."""
    return [absolute_spec(train_file_spec(s)) for s in specs]


@dataclass(frozen=True)
class DataPlan:
    """What a run reads, resolved once when the run is planned: after planning nothing reads a
    meta.json again or rewrites a path."""

    train: list[str]  # absolute specs (a prepared folder as its train.npy), weights kept
    val: dict[str | None, str]  # validation files by name; a lone --val_data is named None
    tokenizer: str | None  # the data's tokenizer.json
    doc_eot: int | None  # --doc_aligned: the end-of-text id windows start after; else None
    bytes_per_token: float | None  # of a lone prepared training file: validation bits per byte
    # How the first prepared training folder's text was read (`ReadOptions.to_record`), for
    # `eval` to read held-out text the same way; None for bare token files.
    reading: dict | None = None
    # Token files whose id range meta.json records, by absolute path (see `KnownRange`).
    token_ranges: dict[str, KnownRange] = field(default_factory=dict)


@dataclass(frozen=True)
class KnownRange:
    """A token file's id range as its meta.json records it (min_token_id..max_token_id, over
    train and val together, so a bound for each), valid while the file holds `tokens` tokens and
    was not written after its meta.json (mtime at most `meta_mtime_ns`). A file that fails
    either is scanned; the sampler checks the ids of every batch it gathers against the bound."""

    tokens: int
    lo: int
    hi: int
    meta_mtime_ns: int

    def holds(self, path: str | os.PathLike, tokens: int) -> bool:
        """Whether this record describes `path` as it is now, holding `tokens` tokens."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return False
        return tokens == self.tokens and mtime <= self.meta_mtime_ns


def resolve_data(cfg: TrainConfig, explicit_vocab: bool) -> tuple[TrainConfig, DataPlan]:
    """A new run's config with vocab size, validation files and tokenizer filled from the
    prepared folders' meta.json, its data paths absolute; and its DataPlan (from the same reads).

    Sources tokenized differently cannot mix: that is an error naming both tokenizers.
    """
    cfg = absolute_paths(cfg)
    metas = _metas(cfg.train_data)
    prepared = [(Path(parse_source_spec(s)[0]), meta) for s, meta in zip(cfg.train_data, metas) if meta is not None]
    if not prepared:
        if cfg.vocab_size is None:
            cfg.vocab_size = DEFAULT_VOCAB_SIZE
        return cfg, _plan(cfg, metas)
    check_same_tokenizer(prepared)
    meta_vocab = int(prepared[0][1]["vocab_size"])
    if explicit_vocab and cfg.vocab_size is not None and cfg.vocab_size != meta_vocab:
        raise ConfigError(
            f"--vocab_size {cfg.vocab_size} contradicts the dataset's meta.json ({meta_vocab}); drop the flag"
        )
    cfg.vocab_size = meta_vocab
    if cfg.val_data is None and not cfg.val_sets:
        _fill_validation(cfg, prepared)
    if cfg.tokenizer is None:
        tok = tokenizer_file(prepared[0][1])
        if tok is not None and tok.is_file():
            cfg.tokenizer = str(tok.resolve())
    return cfg, _plan(cfg, metas)


def plan_data(cfg: TrainConfig) -> DataPlan:
    """The DataPlan of a config resolved before (a resumed run's, stored in its checkpoint)."""
    return _plan(cfg, _metas(cfg.train_data))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` whose data paths are absolute (a prepared folder as its train.npy): the same
    data from any folder a resume runs in."""
    if cfg.val_data:
        val = dict(val_data=absolute_spec(cfg.val_data))
    else:
        val = dict(val_sets={name: absolute_spec(path) for name, path in cfg.val_sets.items()})
    return replace(cfg, train_data=normalise_specs(cfg.train_data), **val)


def _metas(specs: list[str]) -> list[dict | None]:
    """The meta.json beside each training file (None for a bare token file): the one read of them."""
    out = []
    for spec in specs:
        path = Path(parse_source_spec(spec)[0])
        out.append(read_meta(path) if path.is_file() else None)
    return out


def _plan(cfg: TrainConfig, metas: list[dict | None]) -> DataPlan:
    lone = metas[0] if len(metas) == 1 else None
    return DataPlan(
        train=list(cfg.train_data),
        val={None: cfg.val_data} if cfg.val_data else dict(cfg.val_sets),
        tokenizer=cfg.tokenizer,
        doc_eot=_document_eot(cfg, metas),
        bytes_per_token=float(lone["bytes_per_token"]) if lone and lone.get("bytes_per_token") else None,
        reading=_reading(metas),
        token_ranges=_known_ranges(cfg, metas),
    )


def _reading(metas: list[dict | None]) -> dict | None:
    for meta in metas:
        if meta is not None and "separator" in meta:
            return ReadOptions.from_record(meta).to_record()
    return None


def _known_ranges(cfg: TrainConfig, metas: list[dict | None]) -> dict[str, KnownRange]:
    """The id ranges meta.json records for the training files and for the validation files of the
    same prepared folders, by absolute path, from the metas already read."""
    val_files = [cfg.val_data] if cfg.val_data else list(cfg.val_sets.values())
    specs = [parse_source_spec(s)[0] for s in cfg.train_data] + [v for v in val_files if v]
    folders = {meta["dir"]: meta for meta in metas if meta is not None}
    out: dict[str, KnownRange] = {}
    for meta in folders.values():
        for spec in specs:
            if (known := known_range(meta, spec)) is not None:
                out[os.path.abspath(spec)] = known
    return out


def known_range(meta: dict, path: str | os.PathLike) -> KnownRange | None:
    """The id range a prepared folder's meta.json (as `read_meta` gives it) records for `path`,
    when `path` is its train or val file; None otherwise, or when it records no range."""
    lo, hi = meta.get("min_token_id"), meta.get("max_token_id")
    if not isinstance(lo, int) or not isinstance(hi, int) or "dir" not in meta:
        return None
    folder = Path(meta["dir"])
    for name_key, count_key in (("train_file", "train_tokens"), ("val_file", "val_tokens")):
        name, count = meta.get(name_key), meta.get(count_key)
        if not isinstance(name, str) or not isinstance(count, int):
            continue
        target = folder / name
        if os.path.abspath(path) == str(target) or _same_file(path, target):
            try:
                return KnownRange(count, lo, hi, (folder / META_FILE).stat().st_mtime_ns)
            except OSError:
                return None
    return None


def _same_file(a: str | os.PathLike, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _document_eot(cfg: TrainConfig, metas: list[dict | None]) -> int | None:
    """The end-of-text id that --doc_aligned windows start after, from the data's meta.json;
    None when windows are not aligned."""
    if not cfg.doc_aligned:
        return None
    ids = set()
    for spec, meta in zip(cfg.train_data, metas):
        if meta is None or meta.get("eot_id") is None:
            raise ConfigError(
                f"--doc_aligned needs the end-of-text id from a meta.json beside {parse_source_spec(spec)[0]}; "
                f"prepare the data with lmtools prepare, or drop --doc_aligned"
            )
        ids.add(int(meta["eot_id"]))
    if len(ids) > 1:
        raise ConfigError(
            f"--doc_aligned: the training files disagree on the end-of-text id ({sorted(ids)}); drop --doc_aligned"
        )
    return ids.pop()


def _fill_validation(cfg: TrainConfig, prepared: list[tuple[Path, dict]]) -> None:
    """The sibling val.npy of one prepared train.npy, or one named set per prepared folder;
    a val.npy too short for one window (tiny corpora) is left out."""
    folders: dict[Path, dict] = {}
    for path, meta in prepared:
        if path.name == TRAIN_FILE:
            folders.setdefault(path.parent.resolve(), meta)
    usable = {
        folder: folder / VAL_FILE
        for folder, meta in folders.items()
        if (folder / VAL_FILE).is_file() and int(meta.get("val_tokens", cfg.context_length + 1)) > cfg.context_length
    }
    if len(folders) == 1:
        if usable:
            cfg.val_data = str(next(iter(usable.values())))
        return
    names = unique_names(list(folders))
    cfg.val_sets = {name: str(usable[folder]) for name, folder in zip(names, folders) if folder in usable}


def unique_names(folders: list[Path]) -> list[str]:
    """Short names for folders: their own name, with parent folders added until all differ."""
    depth = 1
    while True:
        names = ["/".join(f.parts[-depth:]) for f in folders]
        if len(set(names)) == len(names) or depth >= max(len(f.parts) for f in folders):
            return names
        depth += 1


def tokenizer_file(meta: dict) -> Path | None:
    name = meta.get("tokenizer")
    return Path(meta["dir"]) / name if name else None


def tokenizer_identity(path: Path | None) -> Any:
    """What a tokenizer.json's ids mean (see `parse_tokenizer_text`), or None when there is none."""
    if path is None or not path.is_file():
        return None
    return parse_tokenizer_text(path.read_text(encoding="utf-8"), str(path))


def parse_tokenizer_text(text: str, where: str) -> Any:
    """The part of a tokenizer.json that gives ids their meaning: the model's type and
    vocabulary and the added tokens. Formatting, and settings a re-save may rewrite, aside."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"{where} is not a tokenizer.json (not JSON); run `lmtools prepare` again") from None
    if not isinstance(spec, dict):
        raise DataError(f"{where} is not a tokenizer.json; run `lmtools prepare` again")
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    added = sorted((t.get("id"), t.get("content")) for t in spec.get("added_tokens") or [] if isinstance(t, dict))
    return {"type": model.get("type"), "vocab": model.get("vocab"), "added": added}


def check_same_tokenizer(prepared: list[tuple[Path, dict]]) -> None:
    """Every source must be tokenized alike: same vocabulary size, same tokenizer.json."""
    first_path, first_meta = prepared[0]
    first_file = tokenizer_file(first_meta)
    first_id = tokenizer_identity(first_file)
    for _path, meta in prepared[1:]:
        if Path(meta["dir"]) == Path(first_meta["dir"]):
            continue
        other_file = tokenizer_file(meta)
        other_id = tokenizer_identity(other_file)
        sizes_differ = int(meta["vocab_size"]) != int(first_meta["vocab_size"])
        if sizes_differ or (first_id is not None and other_id is not None and first_id != other_id):
            a = first_file if first_id is not None else Path(first_meta["dir"]) / META_FILE
            b = other_file if other_id is not None else Path(meta["dir"]) / META_FILE
            sizes = f" ({first_meta['vocab_size']} vs {meta['vocab_size']} ids)" if sizes_differ else ""
            raise ConfigError(
                f"{a} and {b} are different tokenizers{sizes}: their token ids mean different things and "
                f"cannot be mixed; prepare both corpora with one tokenizer (lmtools prepare ... --tokenizer {a})"
            )


def data_tokenizer_identity(cfg: TrainConfig) -> Any:
    return tokenizer_identity(Path(cfg.tokenizer)) if cfg.tokenizer else None
