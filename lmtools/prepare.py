"""`prepare`: a text corpus -> train.npy, val.npy, tokenizer.json and meta.json in one folder.

The corpus is streamed twice at most (once to train the tokenizer, once to encode it), in
batches of documents, so memory stays bounded whatever its size. Each document is followed
by the end-of-text id; the validation split takes whole documents, chosen by a hash of
(seed, document index). Token files are written as .npy by streaming: the header is written
with the length left open and patched at the end.

Nothing looks complete before it is: every file is written under a temporary name in the
output folder, flushed, fsynced and renamed, and meta.json comes last. A folder without
meta.json is not a dataset, and a failed run leaves an existing dataset as it was.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtools.corpus import (
    PIECE_CHARS,
    Piece,
    ReadOptions,
    SourceReader,
    iter_pieces,
    resolve_sources,
)
from lmtools.errors import ConfigError, DataError
from lmtools.fsutil import fsync_dir

if TYPE_CHECKING:
    import numpy as np

__all__ = ["prepare_corpus", "read_meta", "Progress", "META_FILE"]

META_FILE = "meta.json"
# BPE training reads 2-3 MB/s and holds word counts in memory: past this it trains on a sample.
DEFAULT_TOKENIZER_SAMPLE = 1_000_000_000
TRAIN_FILE = "train.npy"
VAL_FILE = "val.npy"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "lmtools.prepare/1"

BATCH_CHARS = 8 << 20  # characters of text encoded per batch
CHECK_CHARS = 256 << 10  # characters of the first batch encoded both ways to check the fast path


class Progress:
    """What `prepare_corpus` reports as it works. The CLI draws it; the default is silent."""

    def phase(self, name: str, total_bytes: int | None) -> None:
        """A step starts: "train tokenizer" and "encode" read the corpus (`total_bytes`);
        "learn merges" (the BPE trainer's own work after reading) has no total."""

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

    def tail(self, n: int, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
        """The last n tokens, in chunks (for moving the last document to the other split)."""
        import numpy as np

        start = self.count - n
        while start < self.count:
            m = min(chunk, self.count - start)
            self._file.seek(self._header_len + start * self.dtype.itemsize)
            yield np.frombuffer(self._file.read(m * self.dtype.itemsize), dtype=self.dtype)
            start += m
        self._file.seek(0, os.SEEK_END)

    def last_document_start(self, eot_id: int, chunk: int = 1 << 20) -> int:
        """Where the last document starts: after the second-to-last end-of-text id."""
        import numpy as np

        end = self.count - 1  # the last token is the last document's end-of-text id
        while end > 0:
            start = max(0, end - chunk)
            self._file.seek(self._header_len + start * self.dtype.itemsize)
            ids = np.frombuffer(self._file.read((end - start) * self.dtype.itemsize), self.dtype)
            hits = np.flatnonzero(ids == eot_id)
            if len(hits):
                self._file.seek(0, os.SEEK_END)
                return start + int(hits[-1]) + 1
            end = start
        self._file.seek(0, os.SEEK_END)
        return 0

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
        self._file.close()


# ---------------------------------------------------------------------------------------------
# The validation split
# ---------------------------------------------------------------------------------------------


def val_flags(seed: int | str, start: int, count: int, fraction: float) -> np.ndarray:
    """Which of documents start .. start+count-1 go to the validation split.

    Document i is in val when splitmix64(i * golden + key(seed)) < fraction * 2**64: a hash of
    (seed, document index), so the split needs no document count in advance, and a corpus
    that grows at the end keeps the split of its first documents.
    """
    import numpy as np

    if fraction <= 0 or count <= 0:
        return np.zeros(max(count, 0), dtype=bool)
    key = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")
    z = np.arange(start, start + count, dtype=np.uint64)
    z = z * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)  # wraps modulo 2**64, on purpose
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def in_val(seed: int, index: int, fraction: float) -> bool:
    """Whether document `index` goes to the validation split (see `val_flags`)."""
    return bool(val_flags(seed, index, 1, fraction)[0])


@dataclass
class _Split:
    writer: NpyWriter
    tokens: int = 0
    documents: int = 0


@dataclass
class _Stats:
    text_bytes: int = 0
    min_id: int | None = None
    max_id: int | None = None
    sources: list[dict] = field(default_factory=list)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


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
    separator: str | None = None,
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
    tokenizer_sample: train the BPE on about this many bytes of whole documents, sampled
        across the corpus (0: on all of it). The default, 1 GB, bounds the time and memory of
        BPE training on multi-gigabyte corpora and changes nothing on smaller ones.
    separator: for text files, split each file into documents at this string (else one
        document per file).
    batch_chars, piece_chars: characters encoded per batch, and the size of the pieces long
        documents are cut into (tuning knobs; they never change the tokens).
    Raises DataError / ConfigError for anything the user can fix; leaves `out` untouched then.
    """
    from lmtools.tokenizer import Encoder, check_vocab_size, default_threads, load_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val_fraction {val_fraction} must be in [0, 1)")
    if separator == "":
        raise ConfigError("--separator must not be empty")
    threads = threads or default_threads()
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be at least 1")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if tokenizer_sample < 0:
        raise ConfigError(f"--tokenizer_sample {tokenizer_sample} must be >= 0 (0: all)")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if (out / META_FILE).exists() and not force:
        raise DataError(
            f"{out} already holds a prepared dataset; pass --force to overwrite it "
            "or choose another --out"
        )

    sources = resolve_sources(inputs)
    options = ReadOptions(text_field=text_field, text_column=text_column, separator=separator,
                          piece_chars=piece_chars)
    progress = progress or Progress()
    total_bytes = sum(s.size for s in sources)

    if tokenizer is None:
        tok = _train(sources, options, vocab_size, progress, total_bytes, tokenizer_sample, seed)
        kind = "bpe"
    else:
        tok, kind = load_tokenizer(tokenizer)
    encoder = Encoder(tok, kind, threads=threads)

    import numpy as np

    vocab = encoder.vocab_size
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.tmp" for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE)}
    splits: dict[str, _Split] = {}
    try:
        splits = {
            "train": _Split(NpyWriter(tmp[TRAIN_FILE], dtype)),
            "val": _Split(NpyWriter(tmp[VAL_FILE], dtype)),
        }
        progress.phase("encode", total_bytes)
        stats = _encode(sources, options, encoder, splits, seed, val_fraction, batch_chars,
                        progress)
        progress.done()
        _ensure_both_splits(splits, val_fraction, encoder.eot_id)
        for s in splits.values():
            s.writer.finish()
        tok.save(str(tmp[TOKENIZER_FILE]))
        _fsync_file(tmp[TOKENIZER_FILE])

        from lmtools import __version__

        train, val = splits["train"], splits["val"]
        text_tokens = train.tokens + val.tokens - train.documents - val.documents
        meta = {
            "format": FORMAT,
            "vocab_size": vocab,
            "dtype": dtype.name,
            "train_file": TRAIN_FILE,
            "val_file": VAL_FILE,
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_documents": train.documents,
            "val_documents": val.documents,
            "eot_id": encoder.eot_id,
            "eot_token": "<|endoftext|>",
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_kind": kind,
            "tokenizer_source": (str(Path(tokenizer).expanduser().resolve())
                                 if kind not in ("bpe", "bytes") else None),
            "encoder": encoder.engine,
            "text_bytes": stats.text_bytes,
            "bytes_per_token": round(stats.text_bytes / text_tokens, 4) if text_tokens else None,
            "min_token_id": stats.min_id,
            "max_token_id": stats.max_id,
            "sources": stats.sources,
            "seed": seed,
            "val_fraction": val_fraction,
            "tokenizer_sample": tokenizer_sample if tokenizer is None else None,
            "separator": separator,
            "text_field": text_field,
            "text_column": text_column,
            "lmtools_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp[META_FILE].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync_file(tmp[META_FILE])
        _commit(out, tmp)
    except BaseException:
        for s in splits.values():
            s.writer.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if created_out:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    finally:
        encoder.close()
    meta["dir"] = str(out.resolve())
    return meta


def _train(sources, options, vocab_size, progress: Progress, total_bytes: int,
           sample_bytes: int, seed: int):
    from lmtools.tokenizer import train_bpe

    progress.phase("train tokenizer", total_bytes)
    failure: list[BaseException] = []

    def batches() -> Iterator[list[str]]:
        # An exception raised inside an iterator that Rust consumes may come back changed;
        # keep the original to re-raise it.
        try:
            pieces = iter_pieces(sources, options, on_bytes=lambda n: progress.advance(n))
            if 0 < sample_bytes < total_bytes:
                pieces = _sample(pieces, sample_bytes / total_bytes, seed)
            yield from _text_batches(pieces, 1 << 20)
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
    return tok


def _sample(pieces: Iterable[Piece], fraction: float, seed: int) -> Iterator[Piece]:
    """Whole documents, each kept with probability `fraction` (a hash of its index, as for
    the val split but with another key), so the sample spreads over the whole corpus. The
    first document is always kept, so that a tiny sample is never empty."""
    key, block = f"sample:{seed}", 4096
    index, flags, flags_block = 0, None, -1
    for piece in pieces:
        b = index // block
        if b != flags_block:
            flags, flags_block = val_flags(key, b * block, block, fraction), b
        if index == 0 or flags[index - b * block]:
            yield piece
        if piece.doc_end:
            index += 1


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


def _encode(sources, options, encoder, splits, seed, val_fraction, batch_chars, progress):
    """The encode pass: read, encode in the background, split, write; returns statistics."""
    import numpy as np

    stats = _Stats()

    def source_done(reader: SourceReader) -> None:
        stats.sources.append({**reader.source.describe(), "sha256": reader.sha256(),
                              "documents": reader.documents})

    pieces = iter_pieces(sources, options, on_bytes=lambda n: progress.advance(n),
                         hash_files=True, on_source_done=source_done)
    eot_id = encoder.eot_id
    next_doc = 0  # index of the document that the next batch starts in

    def write(ids: np.ndarray, ends: int) -> None:
        """Route a batch's tokens to train or val, document by document."""
        nonlocal next_doc
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            stats.min_id = lo if stats.min_id is None else min(stats.min_id, lo)
            stats.max_id = hi if stats.max_id is None else max(stats.max_id, hi)
        # ends + 1 flags: the batch may stop inside a document, which the next batch finishes.
        flags = val_flags(seed, next_doc, ends + 1, val_fraction)
        if flags.any():
            # Each document's tokens, its end-of-text id included, follow its flag.
            bounds = np.flatnonzero(ids == eot_id) + 1
            lengths = np.diff(bounds, prepend=0, append=len(ids))
            to_val = np.repeat(flags, lengths)
            val_docs = int(flags[:ends].sum())
            routed = {"train": (ids[~to_val], ends - val_docs), "val": (ids[to_val], val_docs)}
        else:
            routed = {"train": (ids, ends)}
        for name, (part, documents) in routed.items():
            splits[name].writer.append(part)
            splits[name].tokens += len(part)
            splits[name].documents += documents
        next_doc += ends
        progress.advance(tokens=len(ids))

    pending = None  # (waiter, document ends) of the batch being encoded
    checked = False
    for batch in _piece_batches(pieces, batch_chars):
        for piece in batch:
            stats.text_bytes += _utf8_len(piece.text)
        if not checked and encoder.engine == "tiktoken":
            _check_fast_path(encoder, batch)
            checked = True
        waiter = encoder.submit_documents(batch)
        if pending is not None:
            write(pending[0](), pending[1])
        pending = (waiter, sum(p.doc_end for p in batch))
    if pending is not None:
        write(pending[0](), pending[1])
    return stats


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


def _ensure_both_splits(splits: dict[str, _Split], val_fraction: float, eot_id: int) -> None:
    """Train is never empty, and with two or more documents val is not either (if asked for).

    Moves the last document of one split to the other; deterministic, and it costs one
    document's worth of I/O.
    """
    train, val = splits["train"], splits["val"]
    if train.documents == 0 and val.documents > 0:
        _move_last_document(val, train, eot_id)
    if train.documents >= 2 and val.documents == 0 and val_fraction > 0:
        _move_last_document(train, val, eot_id)


def _move_last_document(src: _Split, dst: _Split, eot_id: int) -> None:
    start = src.writer.last_document_start(eot_id)
    n = src.tokens - start
    for chunk in src.writer.tail(n):
        dst.writer.append(chunk)
    src.writer.truncate(start)
    src.tokens -= n
    src.documents -= 1
    dst.tokens += n
    dst.documents += 1


# ---------------------------------------------------------------------------------------------
# Committing
# ---------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit(out: Path, tmp: dict[str, Path]) -> None:
    """Rename the finished files into place, meta.json last.

    An old meta.json goes first, so a crash between the renames leaves a folder that does not
    claim to be a dataset rather than one whose meta describes other token files.
    """
    (out / META_FILE).unlink(missing_ok=True)
    fsync_dir(out)
    for name in (TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE):
        os.replace(tmp[name], out / name)
    fsync_dir(out)
