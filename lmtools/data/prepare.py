"""`prepare`: a text corpus -> train.npy, val.npy, tokenizer.json and meta.json in one folder.

The corpus is streamed once to encode it, in batches of documents, so memory stays bounded
whatever its size; training a tokenizer reads about `--tokenizer_sample` bytes of it before
that (whole documents from evenly spread places, see `DocumentSample`), or all of it when it
is smaller. Each document is followed by the end-of-text id, and the whole corpus is written
in order into one token file, which then becomes train.npy once the validation tokens are
moved out of it:

- by whole documents, picked in the order of a seeded hash of their index until they hold
  about `val_fraction` of the tokens, when the corpus has documents enough for that;
- otherwise (one text file, a few huge documents) by the tail of the token stream, cut at a
  document boundary or a line end near `val_fraction` of the tokens;
- not at all for a corpus too small for one validation window (meta.json says why).

Token files are written as .npy by streaming: the header is written with the length left open
and patched at the end.

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
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtools import __version__
from lmtools.data.corpus import (
    EMPTY_EXAMPLES,
    PIECE_CHARS,
    Piece,
    ReadOptions,
    SourceReader,
    check_not_binary,
    iter_pieces,
    resolve_sources,
)
from lmtools.data.tokenizer import Encoder, check_vocab_size, default_threads, load_tokenizer, train_bpe
from lmtools.data.tokenizer_sample import DocumentSample
from lmtools.errors import ConfigError, DataError
from lmtools.layout import EOT, LOCK_FILE, META_FILE, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE
from lmtools.runtime.fsutil import disk_full, fsync_dir, fsync_file
from lmtools.runtime.lock import exclusive
from lmtools.runtime.ownership import check_dataset_target

if TYPE_CHECKING:
    import numpy as np

__all__ = ["prepare_corpus", "read_meta", "Progress", "META_FILE"]

# BPE training runs at 2-5 MB/s and holds word counts in memory: past this it trains on a sample
# (and reads only the sample), so its time and memory grow with this, not with the corpus.
DEFAULT_TOKENIZER_SAMPLE = 1_000_000_000
TRAIN_BATCH_CHARS = 1 << 20  # characters of text handed to the BPE trainer at a time
# The trainer's peak memory grows with the longest string it is given (measured: a 1M-character
# piece, about 75 MB more). Pieces are cut where pre-tokenization does not change (see
# `safe_cut`), so shorter ones train the same tokenizer in less memory.
TRAIN_PIECE_CHARS = 64 << 10
FORMAT = "lmtools.prepare/1"

BATCH_CHARS = 8 << 20  # characters of text encoded per batch
CHECK_CHARS = 256 << 10  # characters of the first batch encoded both ways to check the fast path

# The split. A validation split shorter than this is no use (one window of a small context).
MIN_VAL_TOKENS = 64
# Whole documents are used when some of them hold the share asked for within this (relative).
SHARE_TOLERANCE = 0.1
# A tail cut moves by at most this share of the target to land on a boundary.
SPAN_SNAP = 0.05
# Documents whose hash is below CANDIDATE_FACTOR * val_fraction are remembered for the split.
CANDIDATE_FACTOR = 4


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
# Streaming .npy writer
# ---------------------------------------------------------------------------------------------


class NpyWriter:
    """Appends to a 1-D .npy file whose length is only known at the end.

    The header is written for the largest possible length, so the final header (written by
    numpy's own helper, then padded with spaces as the format allows) always fits in place.
    The tokens written so far can be read back and rewritten (`read`, `write_at`, `truncate`):
    the split moves tokens within the file before it is finished.
    """

    def __init__(self, path: Path, dtype: np.dtype):
        import numpy as np

        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._file = open(path, "w+b")
        self._header_len = len(self._header((1 << 63) - 1))
        self._file.write(self._header(0))

    def _header(self, n: int) -> bytes:
        from numpy.lib import format as npy

        buf = io.BytesIO()
        d = {"descr": npy.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        npy.write_array_header_1_0(buf, d)
        header = buf.getvalue()
        width = getattr(self, "_header_len", len(header))
        if len(header) < width:  # pad the dict with spaces before the final newline
            pad = width - len(header)
            body = header[10:-1] + b" " * pad + b"\n"
            header = header[:8] + len(body).to_bytes(2, "little") + body
        return header

    def append(self, tokens: np.ndarray) -> None:
        if len(tokens):
            self._file.write(tokens.astype(self.dtype, copy=False).data)
            self.count += len(tokens)

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens start .. start+n-1 (then the file position is back at the end)."""
        import numpy as np

        self._file.seek(self._header_len + start * self.dtype.itemsize)
        out = np.frombuffer(self._file.read(n * self.dtype.itemsize), dtype=self.dtype)
        self._file.seek(0, os.SEEK_END)
        return out

    def write_at(self, start: int, tokens: np.ndarray) -> None:
        """Overwrite tokens from `start` on (within what is written already)."""
        self._file.seek(self._header_len + start * self.dtype.itemsize)
        self._file.write(tokens.astype(self.dtype, copy=False).data)
        self._file.seek(0, os.SEEK_END)

    def truncate(self, n: int) -> None:
        self.count = n
        self._file.truncate(self._header_len + n * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)

    def finish(self) -> None:
        self._file.seek(0)
        self._file.write(self._header(self.count))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        """Close without caring about unwritten data (the file is being thrown away)."""
        try:
            self._file.close()
        except OSError:  # flushing failed (a full disk): the original error is what matters
            pass


# ---------------------------------------------------------------------------------------------
# The validation split
# ---------------------------------------------------------------------------------------------


def _threshold(fraction: float) -> int:
    return min(int(fraction * 2.0**64), 2**64 - 1)


def doc_hashes(seed: int | str, start: int, count: int) -> np.ndarray:
    """splitmix64(i * golden + key(seed)) for documents start .. start+count-1: a uniform,
    seeded hash of the document index, which needs no document count in advance."""
    import numpy as np

    key = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")
    z = np.arange(start, start + max(count, 0), dtype=np.uint64)
    z = z * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)  # wraps modulo 2**64, on purpose
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def val_flags(seed: int | str, start: int, count: int, fraction: float) -> np.ndarray:
    """Which of documents start .. start+count-1 have a hash below `fraction` of the range
    (each with probability `fraction`)."""
    import numpy as np

    if fraction <= 0 or count <= 0:
        return np.zeros(max(count, 0), dtype=bool)
    return doc_hashes(seed, start, count) < np.uint64(_threshold(fraction))


@dataclass
class _Encoded:
    """The encoded corpus, in order, in one token file, and what the split needs to know."""

    writer: NpyWriter
    tokens: int = 0
    documents: int = 0
    text_bytes: int = 0
    min_id: int | None = None
    max_id: int | None = None
    sources: list[dict] = field(default_factory=list)
    empty: int = 0
    empty_places: list[str] = field(default_factory=list)
    # Hash and length of every document whose hash is low enough to be picked for val.
    hashes: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    open_length: int = 0  # tokens of the document that the last batch ended inside

    def add_source(self, reader: SourceReader) -> None:
        """Record a source file read to its end."""
        self.sources.append(
            {
                **reader.source.describe(),
                "sha256": reader.sha256(),
                "documents": reader.documents,
                "empty_documents": reader.empty,
            }
        )
        self.empty += reader.empty
        self.empty_places.extend(reader.empty_places[: EMPTY_EXAMPLES - len(self.empty_places)])

    def add_ids(self, ids: np.ndarray, eot_id: int, seed: int, candidate_below: np.uint64 | None) -> None:
        """Append a batch's ids to the stream and count its documents; keep the hash and length
        of those whose hash is below `candidate_below` (None: val takes no documents)."""
        import numpy as np

        self.writer.append(ids)
        self.tokens += len(ids)
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            self.min_id = lo if self.min_id is None else min(self.min_id, lo)
            self.max_id = hi if self.max_id is None else max(self.max_id, hi)
        bounds = np.flatnonzero(ids == eot_id) + 1
        if not len(bounds):
            self.open_length += len(ids)
            return
        lengths = np.diff(bounds, prepend=0)
        lengths[0] += self.open_length
        self.open_length = len(ids) - int(bounds[-1])
        if candidate_below is not None:
            hashes = doc_hashes(seed, self.documents, len(bounds))
            keep = hashes < candidate_below
            self.hashes.append(hashes[keep])
            self.lengths.append(lengths[keep])
        self.documents += len(bounds)


def _plan_split(enc: _Encoded, fraction: float) -> dict[str, Any]:
    """How to split: by whole documents when some set of them holds about `fraction` of the
    tokens, else by the tail of the token stream; nothing when there is too little text.

    Documents are taken in the order of their seeded hash until they hold the share asked
    for: whole documents chosen at random, as close to the share as their sizes allow.
    """
    import numpy as np

    n = enc.tokens
    if fraction == 0:
        return {"method": "none", "reason": "--val_fraction 0"}
    if n < 2 * MIN_VAL_TOKENS:
        return {"method": "none", "reason": f"{n} tokens are too few for a {MIN_VAL_TOKENS}-token validation window"}
    target = max(fraction * n, MIN_VAL_TOKENS)
    if enc.hashes:
        hashes, lengths = np.concatenate(enc.hashes), np.concatenate(enc.lengths)
        order = np.argsort(hashes, kind="stable")[: enc.documents - 1]  # train keeps one
        if len(order):
            totals = np.cumsum(lengths[order])
            k = int(np.argmin(np.abs(totals - target)))
            if abs(totals[k] - target) <= SHARE_TOLERANCE * target:
                return {"method": "documents", "max_hash": int(hashes[order[k]])}
    return {"method": "spans", "where": "tail", "target_tokens": round(target)}


def _apply_split(
    enc: _Encoded, val: NpyWriter, plan: dict, seed: int, eot_id: int, line_ends: Callable[[], np.ndarray]
) -> dict[str, int]:
    """Move the validation tokens from the stream into `val`; the stream becomes train."""
    if plan["method"] == "documents":
        return _split_documents(enc.writer, val, seed, plan["max_hash"], eot_id)
    if plan["method"] == "spans":
        start, cut_at = _tail_start(enc.writer, plan["target_tokens"], eot_id, line_ends())
        plan.update(val_start=start, cut_at=cut_at, cuts_a_document=cut_at != "document")
        return _split_tail(enc.writer, val, start, eot_id, enc.documents)
    return {"train_documents": enc.documents, "val_documents": 0}


def _split_documents(
    stream: NpyWriter, val: NpyWriter, seed: int, max_hash: int, eot_id: int, chunk: int = 1 << 22
) -> dict[str, int]:
    """Documents whose hash is at most `max_hash` go to val; the rest is compacted in place
    (the write position never passes the read position, so nothing unread is overwritten)."""
    import numpy as np

    read = write = doc = val_docs = 0
    total = stream.count
    while read < total:
        ids = stream.read(read, min(chunk, total - read))
        bounds = np.flatnonzero(ids == eot_id) + 1
        ends = len(bounds)
        # ends + 1 flags: the chunk may stop inside a document, which the next one finishes.
        flags = doc_hashes(seed, doc, ends + 1) <= np.uint64(max_hash)
        to_val = np.repeat(flags, np.diff(bounds, prepend=0, append=len(ids)))
        val.append(ids[to_val])
        kept = ids[~to_val]
        stream.write_at(write, kept)
        write += len(kept)
        read += len(ids)
        doc += ends
        val_docs += int(flags[:ends].sum())
    stream.truncate(write)
    return {"train_documents": doc - val_docs, "val_documents": val_docs}


def _tail_start(stream: NpyWriter, target: int, eot_id: int, line_ends: np.ndarray) -> tuple[int, str]:
    """Where the validation tail starts: the document boundary nearest to `target` tokens
    from the end within +-SPAN_SNAP of it, else the nearest line end, else exactly there."""
    import numpy as np

    n = stream.count
    ideal = n - target
    reach = int(SPAN_SNAP * target)
    lo, hi = max(MIN_VAL_TOKENS, ideal - reach), min(n - MIN_VAL_TOKENS, ideal + reach)
    if lo > hi:
        return ideal, "token"
    before = stream.read(lo - 1, hi - lo + 1)  # before[i]: the token ending just before lo + i
    positions = np.arange(lo, hi + 1)
    for name, ok in (("document", before == eot_id), ("line", line_ends[before])):
        if ok.any():
            candidates = positions[ok]
            return int(candidates[np.argmin(np.abs(candidates - ideal))]), name
    return ideal, "token"


def _split_tail(
    stream: NpyWriter, val: NpyWriter, start: int, eot_id: int, documents: int, chunk: int = 1 << 22
) -> dict[str, int]:
    val_docs = 0
    for at in range(start, stream.count, chunk):
        ids = stream.read(at, min(chunk, stream.count - at))
        val.append(ids)
        val_docs += int((ids == eot_id).sum())
    stream.truncate(start)
    # A document counts where it ends (as counting end-of-text ids in each file does): one cut
    # in two counts in val, and train holds its start.
    return {"train_documents": documents - val_docs, "val_documents": val_docs}


# ---------------------------------------------------------------------------------------------
# prepare_corpus
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
    force: bool = False,
    threads: int | None = None,
    batch_chars: int = BATCH_CHARS,
    piece_chars: int = PIECE_CHARS,
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
    batch_chars, piece_chars: characters encoded per batch, and the size of the pieces long
        documents are cut into (tuning knobs; they never change the tokens).
    Raises DataError / ConfigError for anything the user can fix; leaves `out` untouched then.
    """
    threads = _check_options(val_fraction, separator, threads, tokenizer, vocab_size, tokenizer_sample)
    # The inputs first: a missing corpus is the first thing to hear about.
    sources = resolve_sources(inputs)
    check_not_binary(sources)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    options = ReadOptions(text_field=text_field, text_column=text_column, separator=separator, piece_chars=piece_chars)
    with _remove_created_folder_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        with exclusive(out / LOCK_FILE, f"--out {out}", "wait for that prepare to finish or choose another --out"):
            _claim(out, force)
            run = _Run(sources, options, out, seed, val_fraction, progress or Progress())
            meta = run.write(loaded, tokenizer, vocab_size, tokenizer_sample, threads, batch_chars)
    meta["dir"] = str(out.resolve())
    return meta


def _check_options(
    val_fraction: float, separator: str | None, threads: int | None, tokenizer, vocab_size: int, tokenizer_sample: int
) -> int:
    """Refuse option values that no corpus makes right; returns the number of encoding threads."""
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


def _claim(out: Path, force: bool) -> None:
    """Under the folder's lock: a dataset is overwritten only with --force, and what a killed
    prepare left behind goes."""
    check_dataset_target(out, force)
    _remove_stale_temporaries(out)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _write_error(out: Path, exc: OSError) -> BaseException:
    """A full disk or a file that may not be read or written, as one line; other OSErrors
    (failing hardware, bugs) stay as they are."""
    if disk_full(exc):
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
    for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE):
        for path in out.glob(f".{name}*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


class _Run:
    """One prepare into a folder whose lock it holds: tokenizer, encode, split, write, commit.

    Every file is written under a temporary name of this process; on any failure exactly
    those are removed, and the folder is as it was.
    """

    def __init__(
        self, sources: list, options: ReadOptions, out: Path, seed: int, val_fraction: float, progress: Progress
    ):
        self.sources, self.options, self.out = sources, options, out
        self.seed, self.val_fraction, self.progress = seed, val_fraction, progress
        self.tmp = {name: _temporary(out, name) for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE)}

    def write(
        self, loaded, tokenizer_spec, vocab_size: int, tokenizer_sample: int, threads: int, batch_chars: int
    ) -> dict[str, Any]:
        import numpy as np

        total_bytes = sum(s.size for s in self.sources)
        sampled = None
        if loaded is None:
            tok, sampled = _train(
                self.sources, self.options, vocab_size, self.progress, total_bytes, tokenizer_sample, self.seed
            )
            kind = "bpe"
        else:
            tok, kind = loaded
        encoder = Encoder(tok, kind, threads=threads)
        dtype = np.dtype(np.uint16 if encoder.vocab_size <= 1 << 16 else np.uint32)
        writers: list[NpyWriter] = []
        try:
            stream = NpyWriter(self.tmp[TRAIN_FILE], dtype)
            writers.append(stream)
            val = NpyWriter(self.tmp[VAL_FILE], dtype)
            writers.append(val)
            self.progress.phase("encode", total_bytes)
            enc = _encode(
                self.sources, self.options, encoder, stream, self.seed, self.val_fraction, batch_chars, self.progress
            )
            self.progress.done()
            if enc.documents == 0:
                raise _no_text(enc)
            plan = _plan_split(enc, self.val_fraction)
            counts = _apply_split(enc, val, plan, self.seed, encoder.eot_id, encoder.line_ends)
            stream.finish()
            val.finish()
            self.tmp[TOKENIZER_FILE].write_text(tok.to_str(pretty=True), encoding="utf-8")
            fsync_file(self.tmp[TOKENIZER_FILE])
            sample = (tokenizer_sample, sampled)
            meta = self._meta(enc, plan, counts, encoder, kind, tokenizer_spec, vocab_size, sample, val.count)
            self.tmp[META_FILE].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            fsync_file(self.tmp[META_FILE])
            _commit(self.out, self.tmp)
        except BaseException:
            for w in writers:
                w.close()
            for path in self.tmp.values():
                path.unlink(missing_ok=True)
            raise
        finally:
            encoder.close()
        return meta

    def _meta(
        self,
        enc: _Encoded,
        plan: dict,
        counts: dict,
        encoder,
        kind: str,
        tokenizer_spec,
        vocab_size: int,
        sample: tuple[int, int | None],
        val_tokens: int,
    ) -> dict[str, Any]:
        """meta.json; `sample`: the tokenizer sample's size asked for and the UTF-8 bytes of
        text the BPE was trained on (None when the tokenizer was loaded)."""
        text_tokens = enc.tokens - enc.documents
        split = _split_record(plan, self.val_fraction, val_tokens / enc.tokens)
        trained = tokenizer_spec is None
        source = str(Path(tokenizer_spec).expanduser().resolve()) if kind not in ("bpe", "bytes") else None
        return {
            "format": FORMAT,
            "vocab_size": encoder.vocab_size,
            "vocab_size_requested": vocab_size if trained else None,
            "dtype": "uint16" if encoder.vocab_size <= 1 << 16 else "uint32",
            "train_file": TRAIN_FILE,
            "val_file": VAL_FILE,
            "train_tokens": enc.tokens - val_tokens,
            "val_tokens": val_tokens,
            "documents": enc.documents,
            **counts,
            "split": split,
            "empty_documents": enc.empty,
            "empty_document_places": enc.empty_places,
            "eot_id": encoder.eot_id,
            "eot_token": EOT,
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_kind": kind,
            "tokenizer_source": source,
            "encoder": encoder.engine,
            "text_bytes": enc.text_bytes,
            "bytes_per_token": round(enc.text_bytes / text_tokens, 4) if text_tokens else None,
            "min_token_id": enc.min_id,
            "max_token_id": enc.max_id,
            "sources": enc.sources,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "tokenizer_sample": sample[0] if trained else None,
            "tokenizer_sample_bytes": sample[1],
            "separator": self.options.separator,
            "text_field": self.options.text_field,
            "text_column": self.options.text_column,
            "lmtools_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }


def _split_record(plan: dict, requested: float, given: float) -> dict[str, Any]:
    """meta.json's "split": the method first, then the shares, then the plan's own details."""
    return {
        "method": plan.pop("method"),
        "val_fraction_requested": requested,
        "val_fraction_given": round(given, 6),
        **plan,
    }


def _no_text(enc: _Encoded) -> DataError:
    if enc.empty == 0:
        return DataError("the corpus holds no documents")
    places = ", ".join(enc.empty_places) + (", ..." if enc.empty > len(enc.empty_places) else "")
    noun = "its 1 document is" if enc.empty == 1 else f"all {enc.empty} documents are"
    return DataError(f"the corpus holds no text: {noun} empty ({places})")


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
                trained_on += sum(map(_utf8_len, batch))
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


def _piece_batches(pieces: Iterable[Piece], chars: int) -> Iterator[list[Piece]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text) + 16  # + per-document overhead, for corpora of tiny documents
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_fast_path(encoder, batch: list[Piece]) -> None:
    """Compare tiktoken with `tokenizers` on a sample; fall back to `tokenizers` on a mismatch."""
    import numpy as np

    sample, size = [], 0
    for piece in batch:
        sample.append(piece.text[:CHECK_CHARS])
        size += len(sample[-1])
        if size >= CHECK_CHARS:
            break
    fast = encoder.encode_batch(sample)
    reference = encoder.encode_reference(sample)
    if not all(np.array_equal(a, b) for a, b in zip(fast, reference)):
        encoder.use_tokenizers()


def _encode(
    sources, options, encoder, stream: NpyWriter, seed: int, val_fraction: float, batch_chars: int, progress: Progress
) -> _Encoded:
    """The encode pass: read, encode in the background, append to `stream` in corpus order,
    and note what the split needs (the length of each document that val may take)."""
    import numpy as np

    enc = _Encoded(stream)
    low = np.uint64(_threshold(min(1.0, CANDIDATE_FACTOR * val_fraction))) if val_fraction > 0 else None
    pieces = iter_pieces(
        sources, options, on_bytes=lambda n: progress.advance(n), hash_files=True, on_source_done=enc.add_source
    )
    eot_id = encoder.eot_id

    def write(ids: np.ndarray) -> None:
        enc.add_ids(ids, eot_id, seed, low)
        progress.advance(tokens=len(ids))

    pending = None  # waiter of the batch being encoded
    checked = False
    for batch in _piece_batches(pieces, batch_chars):
        for piece in batch:
            enc.text_bytes += _utf8_len(piece.text)
        if not checked and encoder.engine == "tiktoken":
            _check_fast_path(encoder, batch)
            checked = True
        waiter = encoder.submit_documents(batch)
        if pending is not None:
            write(pending())
        pending = waiter
    if pending is not None:
        write(pending())
    return enc


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


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
