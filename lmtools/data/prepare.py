"""`prepare`: a text corpus -> train.npy, val.npy, tokenizer.json and meta.json in one folder.

Training a tokenizer reads about `--tokenizer_sample` bytes of the corpus (whole documents from
evenly spread places, see `DocumentSample`), or all of it when it is smaller. Then the corpus
is cut into units at document boundaries (`lmtools.data.units`), and every unit is encoded into
a part, on every core, each part committed as it is done (`lmtools.data.parts`): a prepare that
is stopped (a signal, kill -9, a full disk) continues where it stopped when run again with the
same arguments. Last the parts are joined, in corpus order, into train.npy and val.npy, the
validation documents picked on the way (`lmtools.data.split`). Each document is followed by
the end-of-text id. Memory stays bounded whatever the corpus's size.

`--shard I/N` encodes a deterministic 1/N of the units into a shard folder; `merge_shards`
joins the shard folders into the dataset one process would have written, bit for bit.

One process writes a folder at a time: it holds a lock on the folder (see `lmtools.runtime.lock`) for
the whole run, and a second prepare into the same folder is refused at once. Every file is
written under a temporary name of the writing process, flushed, fsynced and renamed, and
meta.json comes last. A folder without meta.json is not a dataset, and a failed run leaves an
existing dataset as it was; temporary files of a run that was killed are removed by the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtools import __version__
from lmtools.data.corpus import (
    EMPTY_EXAMPLES,
    PIECE_CHARS,
    Piece,
    ReadOptions,
    Source,
    SourceReader,
    check_not_binary,
    iter_pieces,
    resolve_corpus,
    utf8_len,
)
from lmtools.data.dedup import duplicate_documents
from lmtools.data.npy_stream import NpyWriter
from lmtools.data.parts import (
    EncoderSpec,
    Job,
    WorkerDied,
    WorkFolder,
    describe_sources,
    empty_places,
    part_path,
    run_jobs,
)
from lmtools.data.split import (
    MIN_VAL_TOKENS,
    SHARE_TOLERANCE,
    SPAN_SNAP,
    Candidates,
    doc_hashes,
    plan_split,
    split_record,
    val_flags,
    write_split,
)
from lmtools.data.tokenizer import Encoder, check_vocab_size, default_threads, load_tokenizer, train_bpe
from lmtools.data.tokenizer_sample import DocumentSample
from lmtools.data.units import Unit, plan_units, shard_units, unit_bytes_for
from lmtools.errors import ConfigError, DataError
from lmtools.layout import EOT, LOCK_FILE, META_FILE, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE
from lmtools.runtime.fsutil import disk_full, fsync_dir, fsync_file, write_text_atomically
from lmtools.runtime.lock import exclusive
from lmtools.runtime.ownership import check_dataset_target

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "prepare_corpus",
    "merge_shards",
    "read_meta",
    "Progress",
    "META_FILE",
    "NpyWriter",
    "MIN_VAL_TOKENS",
    "SHARE_TOLERANCE",
    "SPAN_SNAP",
    "doc_hashes",
    "val_flags",
]

# BPE training runs at 2-5 MB/s and holds word counts in memory: past this it trains on a sample
# (and reads only the sample), so its time and memory grow with this, not with the corpus.
DEFAULT_TOKENIZER_SAMPLE = 1_000_000_000
TRAIN_BATCH_CHARS = 1 << 20  # characters of text handed to the BPE trainer at a time
# The trainer's peak memory grows with the longest string it is given (measured: a 1M-character
# piece, about 75 MB more). Pieces are cut where pre-tokenization does not change (see
# `safe_cut`), so shorter ones train the same tokenizer in less memory.
TRAIN_PIECE_CHARS = 64 << 10
FORMAT = "lmtools.prepare/1"
SHARD_FILE = "shard.json"
SHARD_FORMAT = "lmtools.prepare-shard/1"
MAX_SHARDS = 1_000_000  # past any use; keeps I/N arithmetic and the shard records small

BATCH_CHARS = 8 << 20  # characters of text encoded per batch
CHECK_CHARS = 256 << 10  # characters of the corpus's start encoded both ways to check the fast path


class Progress:
    """What `prepare_corpus` reports as it works. The CLI draws it; the default is silent."""

    def phase(self, name: str, total_bytes: int | None) -> None:
        """A step starts: "train tokenizer" reads the tokenizer's sample (`total_bytes`: its
        size, the corpus's when the sample is all of it), "encode" reads the corpus; "learn
        merges" (the BPE trainer's own work after reading) has no total."""

    def advance(self, nbytes: int = 0, tokens: int = 0) -> None:
        """`nbytes` more of the input files were read, `tokens` more tokens written."""

    def done(self) -> None:
        """The current pass is over."""

    def note(self, text: str) -> None:
        """Something the user should know: a prepare resumes, starts again, or keeps parts."""


# ---------------------------------------------------------------------------------------------
# Reading a prepared folder
# ---------------------------------------------------------------------------------------------


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The meta.json of a prepared folder, given the folder or a token file in it.

    Returns None when there is no meta.json (a bare token file, or an unfinished prepare).
    The dict is meta.json as written plus "dir": the folder's absolute path, against which
    the file names in it ("tokenizer", "train_file", "val_file") resolve.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        meta_path = p / META_FILE
    elif p.name == META_FILE:
        meta_path = p
    else:
        meta_path = p.parent / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: unreadable ({exc}); run `lmtools prepare` again") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise DataError(f"{meta_path}: not an lmtools meta.json; run `lmtools prepare` again")
    meta["dir"] = str(meta_path.parent.resolve())
    return meta


# ---------------------------------------------------------------------------------------------
# prepare_corpus and merge_shards
# ---------------------------------------------------------------------------------------------


def prepare_corpus(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike = "data",
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 10000,
    tokenizer_sample: int = DEFAULT_TOKENIZER_SAMPLE,
    val_fraction: float = 0.01,
    seed: int = 0,
    text_field: str = "text",
    text_column: str = "text",
    separator: str | None = EOT,
    separator_line: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    keep_duplicates: bool = False,
    force: bool = False,
    threads: int | None = None,
    shard: tuple[int, int] | None = None,
    batch_chars: int = BATCH_CHARS,
    piece_chars: int = PIECE_CHARS,
    unit_bytes: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into `out` and return the meta.json written there.

    inputs: files (.txt, .jsonl, .parquet, .txt.gz, .jsonl.gz), folders and glob patterns.
    tokenizer: None trains a byte-level BPE of `vocab_size`; "bytes" uses the 256 bytes;
        otherwise a tokenizer.json, a vocab.json (merges.txt beside it), or a folder with them.
    tokenizer_sample: train the BPE on about this many bytes of the corpus files, whole
        documents read from evenly spread places, seeded by `seed` (0, or a corpus no larger:
        on all of it). Only the sample is read, so the default, 1 GB, bounds the time and memory
        of BPE training on corpora of any size and changes nothing on smaller ones.
    separator: text files are split into documents at this string (default <|endoftext|>);
        None makes each text file one document.
    separator_line: text files are split at every line that holds exactly this string (the
        `%` lines of a fortune file, `---`), at the file's start and end too; replaces `separator`.
    include, exclude: shell patterns a file found in a folder or by a glob must match (any of
        `include`, when given) and must not match (all of `exclude`), on its name or its path
        below the folder; files left out are counted in meta.json's "skipped_files".
    keep_duplicates: keep documents whose text repeats an earlier document's exactly (by
        default they are removed, and counted, so that no text is in train and val at once).
    threads: processes that encode (default: one per core).
    shard: (I, N): encode only shard I of N into `out`, a shard folder for `merge_shards`
        (needs a given `tokenizer`); returns the shard's record instead of a meta.json.
    batch_chars, piece_chars, unit_bytes: characters encoded per batch, the size of the pieces
        long documents are cut into, and the bytes of a unit of work (default: a 256th of the
        corpus, within 4 MB .. 64 MB); tuning knobs that never change the tokens.
    Raises DataError / ConfigError for anything the user can fix; leaves a dataset in `out`
    untouched then.
    """
    threads = _check_options(val_fraction, separator, threads, tokenizer, vocab_size, tokenizer_sample, shard)
    check_separator_line(separator_line)
    if separator_line:
        separator = None
    # The inputs first: a missing corpus is the first thing to hear about.
    corpus = resolve_corpus(inputs, include, exclude)
    sources = corpus.sources
    check_not_binary(sources)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    out = _out_folder(out)
    options = ReadOptions(text_field, text_column, separator, separator_line, piece_chars)
    with _remove_created_folder_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        with exclusive(out / LOCK_FILE, f"--out {out}", "wait for that prepare to finish or choose another --out"):
            _claim(out, force, shard)
            run = _Run(sources, options, out, seed, val_fraction, progress or Progress())
            run.skipped, run.keep_duplicates = corpus.skipped, keep_duplicates
            tokenizer_args = (loaded, tokenizer, vocab_size, tokenizer_sample)
            result = run.write(tokenizer_args, threads, batch_chars, unit_bytes, shard)
    result["dir"] = str(out.resolve())
    return result


def merge_shards(
    shard_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Join the shard folders of one corpus (`prepare_corpus(..., shard=(I, N))` for every I)
    into a dataset in `out`: the same token files one process writes. The shard folders are
    only read. Returns the meta.json written."""
    shards = [_read_shard(Path(d).expanduser()) for d in shard_dirs]
    first = shards[0][1]
    count = first["shard"][1]
    for folder, record in shards[1:]:
        if _shard_identity(record) != _shard_identity(first):
            raise DataError(
                f"{folder}: a shard of another prepare than {shards[0][0]} (other inputs, options or tokenizer)"
            )
    indices = sorted(record["shard"][0] for _, record in shards)
    if indices != list(range(count)):
        twice = sorted(i for i in set(indices) if indices.count(i) > 1)
        missing = sorted(set(range(count)) - set(indices))
        what = f"shard {twice[0]}/{count} is given twice" if twice else f"shard {missing[0]}/{count} is missing"
        raise DataError(f"--merge: {what}; name the {count} shard folders of the prepare once each")
    units = [Unit.from_json(u) for u in first["units"]]
    records: dict[int, dict] = {}
    part_dirs: dict[int, Path] = {}
    for folder, record in shards:
        work = WorkFolder(folder)
        found = work.records()
        for index in record["mine"]:
            if index not in found:
                raise DataError(f"{folder}: part {index} is missing; run that shard's prepare again")
            records[index] = found[index]
            part_dirs[index] = work.path
    settings = first["settings"]
    sources = [Source(Path(p), kind, compressed, size) for p, kind, compressed, size in settings["sources"]]
    tok = WorkFolder(shards[0][0]).tokenizer()
    out = _out_folder(out)
    progress = progress or Progress()
    with _remove_created_folder_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        with exclusive(out / LOCK_FILE, f"--out {out}", "wait for that prepare to finish or choose another --out"):
            _claim(out, force, None)
            encoder = Encoder(tok, settings["tokenizer_kind"], threads=1, fast=False)  # for its ids' facts
            ordered = [records[u.index] for u in units]
            merged_from = {"merged_from": [str(Path(folder).resolve()) for folder, _ in shards]}
            meta = _finish(out, settings, units, sources, ordered, part_dirs, tok, encoder, extra=merged_from)
    meta["dir"] = str(out.resolve())
    return meta


def _shard_identity(record: dict) -> dict:
    """What the shards of one prepare share: the files (by name and size, so that machines may
    mount the corpus at other paths), how they were read and cut, the tokenizer and the
    settings of the split."""
    key, settings = record["key"], record["settings"]
    return {
        "files": [[Path(path).name, size] for path, size, _ in key["sources"]],
        "read": key["read"],
        "tokenizer": key["tokenizer"],
        "units": record["units"],
        "settings": {k: v for k, v in settings.items() if k not in ("sources", "skipped_files")},
        "count": record["shard"][1],
    }


def _read_shard(folder: Path) -> tuple[Path, dict]:
    path = folder / SHARD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{folder}: not a finished shard (no {SHARD_FILE}); run its `lmtools prepare --shard I/N` to the end"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: not a shard record of lmtools prepare")
    return folder, record


def _unit_bytes_from_env() -> int | None:
    """LMTOOLS_PREPARE_UNIT_BYTES: the unit size, for a machine with many more cores than a
    256th of the corpus keeps busy (it never changes the tokens; shards must agree on it)."""
    text = os.environ.get("LMTOOLS_PREPARE_UNIT_BYTES", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 4096:
        raise ConfigError(f"LMTOOLS_PREPARE_UNIT_BYTES={text!r}: give a number of bytes, at least 4096")
    return value


def _out_folder(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    return out


def check_separator_line(line: str | None) -> None:
    if line is not None and (not line or "\n" in line or "\r" in line):
        raise ConfigError(f"--separator_line {line!r} must be one non-empty line of text")


def _check_options(
    val_fraction: float,
    separator: str | None,
    threads: int | None,
    tokenizer,
    vocab_size: int,
    tokenizer_sample: int,
    shard: tuple[int, int] | None,
) -> int:
    """Refuse option values that no corpus makes right; returns the number of encoding processes."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val_fraction {val_fraction} must be in [0, 1)")
    if separator == "":
        raise ConfigError("--separator must not be empty (`none` turns splitting off)")
    threads = threads or default_threads()
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be at least 1")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if tokenizer_sample < 0:
        raise ConfigError(f"--tokenizer_sample {tokenizer_sample} must be >= 0 (0: all)")
    if shard is not None:
        index, count = shard
        if not 0 <= index < count or count > MAX_SHARDS:
            raise ConfigError(f"--shard {index}/{count}: I/N needs 0 <= I < N <= {MAX_SHARDS:,}")
        if tokenizer is None:
            raise ConfigError(
                "--shard needs --tokenizer: every shard must encode with the same one "
                "(train it once: `lmtools prepare SAMPLE --out tok`, then --tokenizer tok/tokenizer.json)"
            )
    return threads


@contextlib.contextmanager
def _remove_created_folder_on_failure(out: Path) -> Iterator[None]:
    """A folder that this prepare creates is removed again (if still empty) when it fails; an
    OSError becomes one line where the user can fix it."""
    created_out = not out.exists()
    try:
        yield
    except OSError as exc:
        if created_out:
            _remove_if_empty(out)
        raise _write_error(out, exc) from None
    except BaseException:
        if created_out:
            _remove_if_empty(out)
        raise


def _claim(out: Path, force: bool, shard: tuple[int, int] | None) -> None:
    """Under the folder's lock: a dataset is overwritten only with --force (a shard folder
    writes none), and what a killed prepare left behind goes."""
    if shard is None:
        check_dataset_target(out, force)
    _remove_stale_temporaries(out)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _write_error(out: Path, exc: OSError, kept: str | None = None) -> BaseException:
    """A full disk or a file that may not be read or written, as one line; other OSErrors
    (failing hardware, bugs) stay as they are. `kept`: the parts kept for the next run."""
    if disk_full(exc):
        if kept:
            return DataError(
                f"--out {out}: no space left on the device ({exc.strerror}); free some space and run the "
                f"same command again to continue from the {kept} (no dataset file was changed)"
            )
        return DataError(
            f"--out {out}: no space left on the device ({exc.strerror}); "
            "free some space or choose another --out (nothing was changed)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and exc.filename is not None:
        where = Path(os.fsdecode(exc.filename))
        if where == out or out in where.parents:
            return DataError(f"--out {out}: cannot write {where} ({exc.strerror}); choose another --out")
        return DataError(f"{where}: cannot read it ({exc.strerror})")
    return exc


def _temporary(out: Path, name: str) -> Path:
    """A name no other process uses (the PID), hidden, and recognisable as left over."""
    return out / f".{name}.{os.getpid()}.tmp"


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a prepare that died in this folder (it held the lock we now hold)."""
    for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE, SHARD_FILE):
        for path in out.glob(f".{name}*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


class _Run:
    """One prepare into a folder whose lock it holds: tokenizer, units, parts, split, commit.

    The parts live in the work folder until the dataset is committed, and stay there when the
    run fails or is stopped, for the next run with the same arguments to continue from. Every
    other file is written under a temporary name of this process; on any failure exactly
    those are removed, and the dataset in the folder is as it was.
    """

    def __init__(
        self, sources: list, options: ReadOptions, out: Path, seed: int, val_fraction: float, progress: Progress
    ):
        self.sources, self.options, self.out = sources, options, out
        self.seed, self.val_fraction, self.progress = seed, val_fraction, progress
        self.work = WorkFolder(out)
        self.skipped: dict[str, dict] = {}  # files of the inputs left out, by reason
        self.keep_duplicates = False

    def write(self, tokenizer_args, threads: int, batch_chars: int, unit_bytes: int | None, shard) -> dict[str, Any]:
        loaded, tokenizer_spec, vocab_size, tokenizer_sample = tokenizer_args
        unit_bytes = unit_bytes or _unit_bytes_from_env() or unit_bytes_for(sum(s.size for s in self.sources))
        units = plan_units(self.sources, self.options, unit_bytes)
        mine = units if shard is None else shard_units(units, *shard)
        key = self._key(loaded, vocab_size, tokenizer_sample, unit_bytes, shard)
        done, state = self.work.open(key, self.progress.note)
        try:
            tok, kind, sampled = self._tokenizer(state, loaded, vocab_size, tokenizer_sample)
            sample = _fast_path_sample(self.sources, self.options, units)
            records, encoder, engine = self._encode(mine, done, tok, kind, threads, batch_chars, sample)
            try:
                settings = self._settings(kind, tokenizer_spec, vocab_size, tokenizer_sample, sampled, engine)
                if shard is not None:
                    return self._write_shard(shard, key, settings, units, mine, records)
                meta = _finish(self.out, settings, units, self.sources, records, {}, tok, encoder, self.work.path)
            finally:
                encoder.close()
        except KeyboardInterrupt:
            if kept := self._keep_or_drop_parts(keep=True):
                verb = "is" if kept.startswith("1 ") else "are"
                self.progress.note(
                    f"{kept} {verb} kept in {self.work.path}: run the same command again to continue from them"
                )
            raise
        except (OSError, WorkerDied) as exc:
            kept = self._keep_or_drop_parts(keep=True)
            if isinstance(exc, OSError) and kept:  # one line that says what is kept
                raise _write_error(self.out, exc, kept=f"{kept} kept in {self.work.path}") from None
            raise
        except BaseException:
            self._keep_or_drop_parts(keep=False)
            raise
        self.work.remove()
        return meta

    def _encode(self, mine: list[Unit], done: dict[int, dict], tok, kind, threads, batch_chars, sample):
        """Encode the units not done yet into parts. Returns the records of all, in order, an
        encoder (for the facts of its ids) and the engine that encoded: decided here on
        `sample`, or, where worker processes encode, by the first of them, so that this
        process never builds the fast encoder it would not use."""
        resumed = [u for u in mine if u.index in done]
        if resumed:
            self.progress.note(f"resuming: {len(resumed)} of {len(mine)} parts are done already ({self.work.path})")
        todo = [u for u in mine if u.index not in done]
        pooled = threads > 1 and len(todo) > 1
        encoder = Encoder(tok, kind, threads=threads, fast=not pooled)
        engine = None if pooled else encoder.check_fast_path(sample)
        dtype = "uint16" if encoder.vocab_size <= 1 << 16 else "uint32"
        jobs = [Job(u, self.sources[u.source], self.options, self.work.path, dtype, batch_chars) for u in todo]
        self.progress.phase("encode", sum(u.weight for u in mine))
        self.progress.advance(sum(u.weight for u in resumed), sum(done[u.index]["tokens"] for u in resumed))
        try:
            engine = run_jobs(
                jobs,
                EncoderSpec(self.work.tokenizer_path, kind, engine),
                threads,
                lambda n: self.progress.advance(nbytes=n),
                lambda n: self.progress.advance(tokens=n),
                lambda record: done.__setitem__(record["unit"], record),
                encoder=None if pooled else encoder,
                sample=sample,
            )
        except BaseException:
            encoder.close()
            raise
        self.progress.done()
        return [done[u.index] for u in mine], encoder, engine

    def _keep_or_drop_parts(self, keep: bool) -> str | None:
        """After a stop, a full disk or a dead worker, the parts committed stay for the next run
        to continue from ("N finished parts (M MB)", None when there are none). After an error
        in the input (which the user must change, and with it the key), and when there are no
        parts, the work folder goes: the folder is as it was."""
        self.work.remove_temporaries()
        kept = len(self.work.records()) if keep else 0
        if not kept:
            if self.work.exists():
                self.work.remove()
            return None
        return f"{kept} finished part{'s' if kept != 1 else ''} ({self.work.size() / 1e6:,.0f} MB)"

    def _key(self, loaded, vocab_size: int, tokenizer_sample: int, unit_bytes: int, shard) -> dict:
        """What the parts depend on (the split does not: it is made when they are joined)."""
        sources = []
        for s in self.sources:
            st = s.path.stat()
            sources.append([str(s.path.resolve()), st.st_size, st.st_mtime_ns])
        if loaded is None:
            tokenizer = {"train": vocab_size, "sample": tokenizer_sample, "seed": self.seed}
        else:
            tokenizer = {"sha256": hashlib.sha256(loaded[0].to_str().encode()).hexdigest(), "kind": loaded[1]}
        return {
            "sources": sources,
            "read": self.options.to_record(),
            "tokenizer": tokenizer,
            "unit_bytes": unit_bytes,
            "shard": list(shard) if shard else None,
        }

    def _tokenizer(self, state: dict, loaded, vocab_size: int, tokenizer_sample: int):
        """The tokenizer, its kind and the bytes it was trained on: the work folder's when an
        earlier run saved it there, else trained or loaded now and saved there."""
        saved = self.work.tokenizer()
        if saved is not None and "tokenizer" in state:
            return saved, state["tokenizer"]["kind"], state["tokenizer"]["sample_bytes"]
        if loaded is None:
            total = sum(s.size for s in self.sources)
            tok, sampled = _train(
                self.sources, self.options, vocab_size, self.progress, total, tokenizer_sample, self.seed
            )
            kind = "bpe"
        else:
            (tok, kind), sampled = loaded, None
        self.work.save_tokenizer(tok)
        state["tokenizer"] = {"kind": kind, "sample_bytes": sampled}
        self.work.save_state(state)
        return tok, kind, sampled

    def _settings(self, kind, tokenizer_spec, vocab_size, tokenizer_sample, sampled, engine) -> dict[str, Any]:
        """Everything meta.json says besides what the parts hold (a shard carries it to the merge)."""
        trained = tokenizer_spec is None
        source = str(Path(tokenizer_spec).expanduser().resolve()) if kind not in ("bpe", "bytes") else None
        return {
            "sources": [[str(s.path), s.kind, s.compressed, s.size] for s in self.sources],
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "tokenizer_kind": kind,
            "tokenizer_source": source,
            "vocab_size_requested": vocab_size if trained else None,
            "tokenizer_sample": tokenizer_sample if trained else None,
            "tokenizer_sample_bytes": sampled,
            "encoder": engine,
            **self.options.to_record(),
            "skipped_files": self.skipped,
            "keep_duplicates": self.keep_duplicates,
        }

    def _write_shard(self, shard, key, settings, units, mine, records) -> dict[str, Any]:
        record = {
            "format": SHARD_FORMAT,
            "shard": list(shard),
            "key": key,
            "settings": settings,
            "units": [u.to_json() for u in units],
            "mine": [u.index for u in mine],
            "tokens": sum(r["tokens"] for r in records),
            "documents": sum(r["documents"] for r in records),
            "lmtools_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        write_text_atomically(self.out / SHARD_FILE, json.dumps(record, indent=1) + "\n")
        return record


def _finish(
    out: Path,
    settings: dict,
    units: Sequence[Unit],
    sources: Sequence[Source],
    records: Sequence[dict],
    part_dirs: dict[int, Path],
    tok,
    encoder,
    work: Path | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Join the parts (`records`, in corpus order; each in `part_dirs` or `work`) into the
    dataset in `out`: split, write, commit. Returns meta.json (with `extra` added)."""
    import numpy as np

    tmp = {name: _temporary(out, name) for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE)}
    where = lambda index: part_dirs.get(index, work)  # noqa: E731
    empty = sum(r["empty"] for r in records)
    places = empty_places(records, units, sources, EMPTY_EXAMPLES)
    if sum(r["documents"] for r in records) == 0:
        raise _no_text(empty, places)
    seed, val_fraction = settings["seed"], settings["val_fraction"]

    def lengths(r: dict) -> np.ndarray:  # of a part's documents (read again when needed: 8 bytes each)
        return np.load(part_path(where(r["unit"]), r["unit"], ".docs.npy")).astype(np.int64)

    def hashes(r: dict) -> np.ndarray:
        return np.load(part_path(where(r["unit"]), r["unit"], ".hashes.npy"), mmap_mode="r")

    if settings.get("keep_duplicates", True):
        repeats = [np.zeros(0, np.int64) for _ in records]
    else:
        repeats = duplicate_documents([lambda r=r: hashes(r) for r in records], [r["documents"] for r in records])
    removed = {"documents": 0, "tokens": 0, "text_bytes": 0}
    for r, dup in zip(records, repeats):
        if len(dup):
            removed["documents"] += len(dup)
            removed["tokens"] += int(lengths(r)[dup].sum())
            removed["text_bytes"] += int(np.asarray(hashes(r)[dup, 2]).sum())

    def kept(i: int) -> np.ndarray | None:  # which documents of part i are kept (None: all)
        if not len(repeats[i]):
            return None
        keep = np.ones(records[i]["documents"], dtype=bool)
        keep[repeats[i]] = False
        return keep

    tokens = sum(r["tokens"] for r in records) - removed["tokens"]
    documents = sum(r["documents"] for r in records) - removed["documents"]
    candidates = Candidates(seed, val_fraction)
    for i, r in enumerate(records):
        keep = kept(i)
        candidates.add(lengths(r) if keep is None else lengths(r)[keep])
    plan = plan_split(tokens, documents, candidates, val_fraction)
    dtype = np.dtype(np.uint16 if encoder.vocab_size <= 1 << 16 else np.uint32)
    writers: list[NpyWriter] = []
    try:
        train = NpyWriter(tmp[TRAIN_FILE], dtype)
        writers.append(train)
        val = NpyWriter(tmp[VAL_FILE], dtype)
        writers.append(val)
        parts = ((part_path(where(r["unit"]), r["unit"], ".npy"), lengths(r), kept(i)) for i, r in enumerate(records))
        counts = write_split(parts, train, val, plan, seed, encoder.eot_id, documents, encoder.line_ends)
        train.finish()
        val.finish()
        tmp[TOKENIZER_FILE].write_text(tok.to_str(pretty=True), encoding="utf-8")
        fsync_file(tmp[TOKENIZER_FILE])
        ids = [(r["min_id"], r["max_id"]) for r in records if r["min_id"] is not None]
        totals = {
            "tokens": tokens,
            "val_tokens": val.count,
            "documents": documents,
            "empty": empty,
            "places": places,
            "text_bytes": sum(r["text_bytes"] for r in records) - removed["text_bytes"],
            "removed": removed,
            "min_id": min(lo for lo, _ in ids),
            "max_id": max(hi for _, hi in ids),
            "sources": describe_sources(records, units, sources),
        }
        meta = {**_meta(settings, totals, plan, counts, encoder), **(extra or {})}
        tmp[META_FILE].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        fsync_file(tmp[META_FILE])
        _commit(out, tmp)
    except BaseException:
        for w in writers:
            w.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    return meta


def _meta(settings: dict, totals: dict, plan: dict, counts: dict, encoder) -> dict[str, Any]:
    tokens, documents, val_tokens = totals["tokens"], totals["documents"], totals["val_tokens"]
    text_tokens = tokens - documents
    split = split_record(plan, settings["val_fraction"], val_tokens / tokens)
    return {
        "format": FORMAT,
        "vocab_size": encoder.vocab_size,
        "vocab_size_requested": settings["vocab_size_requested"],
        "dtype": "uint16" if encoder.vocab_size <= 1 << 16 else "uint32",
        "train_file": TRAIN_FILE,
        "val_file": VAL_FILE,
        "train_tokens": tokens - val_tokens,
        "val_tokens": val_tokens,
        "documents": documents,
        **counts,
        "split": split,
        "empty_documents": totals["empty"],
        "empty_document_places": totals["places"],
        "duplicate_documents": totals["removed"]["documents"],
        "duplicate_tokens": totals["removed"]["tokens"],
        "keep_duplicates": settings.get("keep_duplicates", True),
        "skipped_files": settings.get("skipped_files", {}),
        "eot_id": encoder.eot_id,
        "eot_token": EOT,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_kind": settings["tokenizer_kind"],
        "tokenizer_source": settings["tokenizer_source"],
        "encoder": settings["encoder"],
        "text_bytes": totals["text_bytes"],
        "bytes_per_token": round(totals["text_bytes"] / text_tokens, 4) if text_tokens else None,
        "min_token_id": totals["min_id"],
        "max_token_id": totals["max_id"],
        "sources": totals["sources"],
        "seed": settings["seed"],
        "val_fraction": settings["val_fraction"],
        "tokenizer_sample": settings["tokenizer_sample"],
        "tokenizer_sample_bytes": settings["tokenizer_sample_bytes"],
        **ReadOptions.from_record(settings).to_record(),
        "lmtools_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _no_text(empty: int, places: list[str]) -> DataError:
    if empty == 0:
        return DataError("the corpus holds no documents")
    where = ", ".join(places) + (", ..." if empty > len(places) else "")
    noun = "its 1 document is" if empty == 1 else f"all {empty} documents are"
    return DataError(f"the corpus holds no text: {noun} empty ({where})")


def _train(sources, options, vocab_size, progress: Progress, total_bytes: int, sample_bytes: int, seed: int):
    """Train the BPE on the tokenizer's sample (the whole corpus when it is no larger than
    `sample_bytes`, or that is 0); returns the tokenizer and the UTF-8 bytes it was trained on."""
    options = dataclasses.replace(options, piece_chars=min(options.piece_chars, TRAIN_PIECE_CHARS))
    whole = not 0 < sample_bytes < total_bytes
    sample = None if whole else DocumentSample(sources, options, sample_bytes, seed, progress.advance)
    progress.phase("train tokenizer", total_bytes if sample is None else sample.planned)
    failure: list[BaseException] = []
    trained_on = 0

    def batches() -> Iterator[list[str]]:
        # An exception raised inside an iterator that Rust consumes may come back changed;
        # keep the original to re-raise it.
        nonlocal trained_on
        try:
            pieces = iter_pieces(sources, options, on_bytes=progress.advance) if sample is None else iter(sample)
            for batch in _text_batches(pieces, TRAIN_BATCH_CHARS):
                trained_on += sum(map(utf8_len, batch))
                yield batch
            progress.done()
            progress.phase("learn merges", None)
        except BaseException as exc:
            failure.append(exc)
            raise

    try:
        tok = train_bpe(batches(), vocab_size)
    except BaseException:
        if failure:
            raise failure[0] from None
        raise
    if failure:
        raise failure[0]
    progress.done()
    return tok, trained_on


def _text_batches(pieces: Iterable[Piece], chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece.text)
        size += len(piece.text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _fast_path_sample(sources: Sequence[Source], options: ReadOptions, units: Sequence[Unit]) -> list[str]:
    """The corpus's first CHECK_CHARS characters, on which tiktoken must agree with
    `tokenizers` to encode the corpus (else `tokenizers` encodes all of it)."""
    sample, size = [], 0
    for unit in units:
        for piece in SourceReader(sources[unit.source], options, hash_file=False, span=unit.span):
            sample.append(piece.text[:CHECK_CHARS])
            size += len(sample[-1])
            if size >= CHECK_CHARS:
                return sample
    return sample


# ---------------------------------------------------------------------------------------------
# Committing
# ---------------------------------------------------------------------------------------------


def _commit(out: Path, tmp: dict[str, Path]) -> None:
    """Rename the finished files into place, meta.json last.

    An old meta.json goes first, so a crash between the renames leaves a folder that does not
    claim to be a dataset rather than one whose meta describes other token files. Only the
    dataset's own four names are replaced; nothing else in the folder is touched.
    """
    (out / META_FILE).unlink(missing_ok=True)
    fsync_dir(out)
    for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE):
        os.replace(tmp[name], out / name)
    fsync_dir(out)
