"""Reading a corpus: which files it holds, and the documents in them, streamed in bounded memory.

A corpus is a list of inputs: `.txt`, `.jsonl` and `.parquet` files (`.txt.gz`, `.jsonl.gz`
too), folders (searched recursively for files with those suffixes, in sorted order) and glob
patterns. A document is one jsonl line, one parquet row, or each part of a text file between
separators (by default the literal `<|endoftext|>`; with no separator, the whole file).

Empty documents are skipped and counted, with their places (`SourceReader.empty`): an empty file,
a null or "" text, and, in a text file split by a separator, a part that holds only whitespace
between two separators (before the first or after the last separator such a part is just the
layout around the separators, and is dropped without being counted).

Documents are yielded as `Piece`s: a long document arrives as several pieces, cut only where
a cut cannot change how GPT-2's pre-tokenizer splits the text (see `safe_cut`), so memory stays
bounded by the piece size whatever the size of a file or a document.

`lmtools.data.tokenizer_sample` reads a sample of a corpus for training a tokenizer.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lmtools.errors import DataError
from lmtools.layout import EOT, NPY_MAGIC, PICKLE_PROTO, ZIP_MAGIC

READ_BLOCK = 1 << 20  # bytes read from a text file at a time
JSON_BLOCK = 4 << 20  # bytes pyarrow parses at a time (a longer line takes the slow path)
PIECE_CHARS = 1 << 20  # a document longer than this is cut into pieces of about this size
EMPTY_EXAMPLES = 5  # places of empty documents remembered for the report


@dataclass(frozen=True)
class Source:
    """One input file."""

    path: Path
    kind: str  # "text", "jsonl" or "parquet"
    compressed: bool  # gzip
    size: int  # bytes on disk

    def describe(self) -> dict:
        return {"path": str(self.path), "size": self.size}


class Piece(NamedTuple):
    """A run of text from one document; `doc_end` marks the document's last piece."""

    text: str
    doc_end: bool


@dataclass(frozen=True)
class ReadOptions:
    """How the files of a corpus are read into documents. `prepare` records these in meta.json
    (`to_record`) and a training run carries them in its checkpoint, so that `eval` reads held-out
    text exactly as the training data was read (`from_record`)."""

    text_field: str = "text"  # jsonl
    text_column: str = "text"  # parquet
    separator: str | None = EOT  # text files: split into documents here (None: one per file)
    # Text files: a line holding exactly this (a trailing "\r" aside) separates documents, at
    # the start and end of a file too. Set, it replaces `separator`.
    separator_line: str | None = None
    piece_chars: int = PIECE_CHARS

    RECORD_KEYS = ("separator", "separator_line", "text_field", "text_column")

    @property
    def splits_text(self) -> bool:
        """Whether a text file holds several documents."""
        return bool(self.separator_line or self.separator)

    @property
    def boundary(self) -> bytes | None:
        """Bytes after which a text file's document starts (where units and tokenizer-sample
        windows may begin): a separator line with the newlines around it, or the separator."""
        if self.separator_line:
            return b"\n" + self.separator_line.encode("utf-8") + b"\n"
        return self.separator.encode("utf-8") if self.separator else None

    def to_record(self) -> dict:
        return {key: getattr(self, key) for key in self.RECORD_KEYS}

    @classmethod
    def from_record(cls, record: dict | None) -> ReadOptions:
        """The options a meta.json or a checkpoint records (missing keys: the defaults; a
        meta.json from before `separator_line` existed has none)."""
        record = record or {}
        return cls(**{key: record[key] for key in cls.RECORD_KEYS if key in record})


@dataclass(frozen=True)
class Span:
    """The part of a file that one unit of work reads (see `lmtools.data.units`): bytes
    `start` .. `end` of a text or jsonl file, which begin and end at document boundaries, or
    row groups `start` .. `end` of a parquet file (`row_base`: the rows before them). The
    spans of a file also tile its bytes for hashing: `hash_start` .. `hash_end`."""

    start: int
    end: int
    hash_start: int
    hash_end: int
    row_base: int = 0


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------


def _kind_of(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    if name.endswith(".jsonl"):
        return "jsonl", compressed
    if name.endswith(".parquet"):
        return "parquet", compressed
    return "text", compressed


# Why a file found in a folder or by a glob is left out, as the summary and meta.json name it.
SKIP_REASONS = {
    "binary": "binary",
    "not_utf8": "not UTF-8",
    "excluded": "excluded by --include/--exclude",
    "same_file": "links to (or repeats of) a file already read",
    "hidden": "hidden",
    "folder_link": "links to folders (not followed)",
}
SKIPPED_EXAMPLES = 5  # paths remembered per reason


@dataclass
class Corpus:
    """The files of a corpus in reading order, and those left out, by reason."""

    sources: list[Source]
    skipped: dict[str, dict] = field(default_factory=dict)  # reason -> {"count", "first": [paths]}

    def skip(self, reason: str, path: Path | str) -> None:
        entry = self.skipped.setdefault(reason, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < SKIPPED_EXAMPLES:
            entry["first"].append(str(path))

    def skipped_text(self) -> str | None:
        """ "12 files skipped: 8 binary, 4 hidden", or None."""
        total = sum(e["count"] for e in self.skipped.values())
        if not total:
            return None
        order = [r for r in SKIP_REASONS if r in self.skipped] + [r for r in self.skipped if r not in SKIP_REASONS]
        parts = ", ".join(f"{self.skipped[r]['count']} {SKIP_REASONS.get(r, r)}" for r in order)
        return f"{total} file{'s' if total != 1 else ''} skipped: {parts}"


class _Patterns:
    """--include / --exclude: shell patterns matched against a file's name and its path below
    the folder searched (or as given); `*` matches across folders."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]):
        self.include, self.exclude = list(include), list(exclude)

    def admits(self, path: Path, relative: str) -> bool:
        names = (path.name, relative)
        if self.include and not any(fnmatch.fnmatchcase(n, p) for p in self.include for n in names):
            return False
        return not any(fnmatch.fnmatchcase(n, p) for p in self.exclude for n in names)


def _walk(folder: Path, corpus: Corpus, patterns: _Patterns) -> list[tuple[Path, str]]:
    """The files below `folder` (path, path relative to it), sorted; hidden entries and links
    to folders are counted, not entered."""
    found = []
    for root, dirs, files in os.walk(folder):
        kept = []
        for d in dirs:
            if d.startswith("."):
                corpus.skip("hidden", Path(root) / d)
            elif os.path.islink(os.path.join(root, d)):
                corpus.skip("folder_link", Path(root) / d)
            else:
                kept.append(d)
        dirs[:] = sorted(kept)
        for name in files:
            path = Path(root) / name
            if name.startswith("."):
                corpus.skip("hidden", path)
                continue
            relative = path.relative_to(folder).as_posix()
            if not patterns.admits(path, relative):
                corpus.skip("excluded", path)
                continue
            found.append((path, relative))
    return sorted(found, key=lambda item: item[1])


def resolve_corpus(
    inputs: Iterable[str | os.PathLike], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> Corpus:
    """Expand files, folders and globs into the ordered list of input files.

    A file named alone is read whatever its name and must be text, jsonl or parquet: anything
    else is an error (`check_named_file`). Files found in a folder or by a glob are recognised
    by name (.jsonl, .parquet, .gz) or by content (text: UTF-8 without NUL bytes at its head):
    the others, hidden ones, those --include/--exclude leave out and a second path to a file
    already read are skipped and counted by reason (`Corpus.skipped`). Raises DataError for an
    input that names nothing, a folder or glob without a readable file, or a gzipped parquet.
    Empty files are kept: the reader counts them as empty documents.
    """
    corpus = Corpus([])
    patterns = _Patterns(include, exclude)
    found: list[tuple[Path, bool]] = []  # (path, named alone)
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            before = len(found)
            found.extend((p, False) for p, _ in _walk(path, corpus, patterns))
            if len(found) == before:
                raise DataError(f"{text}: the folder holds no file to read{_because(corpus)}")
        elif path.is_file():
            if patterns.admits(path, text):
                found.append((path, True))
            else:
                corpus.skip("excluded", path)
        elif path.exists():
            raise DataError(f"{text}: not a regular file or folder")
        elif glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise DataError(f"{text}: no file matches this pattern")
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    found.extend((p, False) for p, _ in _walk(m, corpus, patterns))
                elif m.is_file():
                    if patterns.admits(m, match):
                        found.append((m, False))
                    else:
                        corpus.skip("excluded", m)
        else:
            raise DataError(f"{text}: no such file or folder")

    seen = set()
    for path, named in found:
        key = path.resolve()
        if key in seen:
            corpus.skip("same_file", path)
            continue
        seen.add(key)
        kind, compressed = _kind_of(path)
        if kind == "parquet" and compressed:
            raise DataError(f"{path}: gzipped parquet is not supported; parquet compresses itself")
        if named:
            check_named_file(path)
        elif (reason := _not_readable(path, kind, compressed)) is not None:
            corpus.skip(reason, path)
            continue
        corpus.sources.append(Source(path, kind, compressed, path.stat().st_size))
    if not corpus.sources:
        first = next((e["first"][0] for e in corpus.skipped.values()), None)
        where = f"; the first: {first}" if first else ""
        raise DataError(f"no file to read{_because(corpus)}{where}")
    return corpus


def resolve_sources(inputs: Iterable[str | os.PathLike]) -> list[Source]:
    """The files of `resolve_corpus(inputs)`."""
    return resolve_corpus(inputs).sources


def _because(corpus: Corpus) -> str:
    text = corpus.skipped_text()
    return f" ({text})" if text else ""


def _head(path: Path, compressed: bool) -> bytes | None:
    """The first BINARY_PROBE bytes (decompressed), or None when they cannot be read."""
    try:
        if compressed:
            with gzip.open(path, "rb") as fh:
                return fh.read(BINARY_PROBE)
        with open(path, "rb") as fh:
            return fh.read(BINARY_PROBE)
    except (OSError, EOFError, zlib.error):
        return None


def _not_readable(path: Path, kind: str, compressed: bool) -> str | None:
    """Why a file found in a folder is no corpus file ("binary", "not_utf8"), or None."""
    if kind == "parquet":
        with open(path, "rb") as fh:
            return None if fh.read(4) == b"PAR1" else "binary"
    head = _head(path, compressed)
    if head is None or b"\x00" in head:
        return "binary"
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=len(head) < BINARY_PROBE)
    except UnicodeDecodeError:
        return "not_utf8"
    return None


# Files that are no text, recognised by their first bytes, named as what they are.
_KNOWN_BINARY = (
    (ZIP_MAGIC, "a zip archive (a PyTorch checkpoint is one)"),
    (NPY_MAGIC, "a NumPy file (token files are read by `lmtools train --train_data`, not prepared again)"),
    (bytes([PICKLE_PROTO]), "a Python pickle (an old PyTorch checkpoint)"),
    (b"\x7fELF", "an executable"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
)


def check_named_file(path: Path) -> None:
    """A file named on its own must be a corpus file: a checkpoint or a token file is named as
    what it is, before any work."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    for magic, what in _KNOWN_BINARY:
        if head.startswith(magic):
            if magic == ZIP_MAGIC and _is_torch_zip(path):
                what = "a PyTorch checkpoint; start a run from its weights with `lmtools train --init_from`"
            raise DataError(f"{path}: binary ({what}), not a text, .jsonl or .parquet file")


def _is_torch_zip(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("data.pkl") for name in zf.namelist()[:64])
    except (zipfile.BadZipFile, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# Cutting long documents into pieces
# ---------------------------------------------------------------------------------------------


def safe_cut(text: str, limit: int) -> int:
    """A cut position in (0, limit] that leaves pre-tokenization unchanged, or `limit`.

    GPT-2's pattern (``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``)
    always ends a match between a non-space and a following whitespace character: no
    alternative crosses from a non-space into whitespace, and the one lookahead only looks one
    character past a run of whitespace. Encoding the two sides separately therefore gives the
    same tokens as encoding the whole. `str.isspace` is a superset of the regex's `\\s`, so a
    character it calls non-space is non-space for the regex too. We prefer newlines, then
    spaces; a piece with neither (a megabyte without whitespace) is cut at `limit`, which
    keeps the bytes exact and only changes how that spot is tokenized.
    """
    floor = limit // 2
    for ch in ("\n", " "):
        i = text.rfind(ch, floor, limit)
        while i > floor:
            if not text[i - 1].isspace():
                return i
            i = text.rfind(ch, floor, i)
    return limit


def pieces_of(text: str, piece_chars: int) -> Iterator[Piece]:
    """One whole document as pieces."""
    while len(text) > piece_chars:
        cut = safe_cut(text, piece_chars)
        yield Piece(text[:cut], False)
        text = text[cut:]
    yield Piece(text, True)


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Passes reads through, feeding every byte to a hash and reporting progress."""

    def __init__(self, raw, hasher, on_bytes: Callable[[int], None] | None, limit: int | None = None, lines=False):
        self._raw = raw
        self._hasher = hasher
        self._on_bytes = on_bytes
        self._left = limit  # bytes that may still be read (None: to the end of the file)
        self.newlines = 0 if lines else None  # counted when asked for (jsonl spans)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left is not None:
            if self._left <= 0:
                return 0
            buffer = memoryview(buffer)[: self._left]
        n = self._raw.readinto(buffer)
        if n:
            view = memoryview(buffer)[:n]
            if self._left is not None:
                self._left -= n
            if self._hasher is not None:
                self._hasher.update(view)
            if self.newlines is not None:
                self.newlines += bytes(view).count(b"\n")
            if self._on_bytes is not None:
                self._on_bytes(n)
        return n

    def drain(self) -> None:
        """Read to the end, so that the hash covers the whole file (gzip may stop early)."""
        while self.readinto(bytearray(READ_BLOCK)):
            pass


def not_utf8_error(source: Source, offset: int) -> DataError:
    where = "decompressed byte" if source.compressed else "byte"
    return DataError(
        f"{source.path}: not UTF-8 text (undecodable {where} near offset {offset}); convert it to UTF-8 or leave it out"
    )


# Binary input is looked for before the long passes, in a few places of each file: the head
# (git's heuristic reads the first 8000 bytes) and one place per 64 MB, so that a binary file in
# a folder is refused at once rather than hours into the encode. The passes check every byte.
BINARY_PROBE = 8000
BINARY_PROBE_EVERY = 64 << 20


def check_not_binary(sources: Sequence[Source]) -> None:
    """A DataError for the first uncompressed text or jsonl input with a NUL byte at its head or
    at one of the places probed in it (about 8 KB per 64 MB read)."""
    for source in sources:
        if source.compressed or source.kind == "parquet":
            continue
        with open(source.path, "rb") as fh:
            for offset in range(0, max(source.size, 1), BINARY_PROBE_EVERY):
                fh.seek(offset)
                if b"\x00" in fh.read(BINARY_PROBE):
                    raise binary_error(source)


def binary_error(source: Source) -> DataError:
    return DataError(f"{source.path}: looks binary (holds NUL bytes), not text; leave it out")


def bad_gzip_error(source: Source, exc: Exception) -> DataError:
    return DataError(f"{source.path}: not a readable gzip file ({exc})")


def place_text(path: Path, kind: str, number: int) -> str:
    """Where an empty document is, as the report names it: a file, a part of a text file, a
    line of a jsonl file or a row of a parquet file (numbers from 1, rows from 0)."""
    if kind == "file":
        return str(path)
    if kind == "line":
        return f"{path}:{number}"
    return f"{path}: {kind} {number}"


class SourceReader:
    """Streams the documents of one source, or of one `Span` of it, as pieces; hashes the
    bytes it reads as it goes.

    A span that starts inside a file starts just after a separator or a line end. The places
    of empty documents are numbered from the span's start (`empty_at`); `separators` and
    `lines` say how far the numbering moves over the span, so that whoever reads the spans of
    a file in order can number them from the file's start. Error messages are numbered from
    the file's start already.
    """

    def __init__(
        self,
        source: Source,
        options: ReadOptions,
        on_bytes: Callable[[int], None] | None = None,
        hash_file: bool = True,
        span: Span | None = None,
    ):
        self.source = source
        self.options = options
        self.on_bytes = on_bytes
        self.span = span
        self.hasher = hashlib.sha256() if hash_file else None
        self.documents = 0
        self.empty = 0  # empty documents skipped
        self.empty_at: list[tuple[str, int]] = []  # where the first few of them are
        self.separators = 0  # text: separators read
        self.lines = 0  # jsonl: line ends read (counted in spans only)
        self._position = self._reported = 0  # bytes read in this pass / reported so far
        self._line_base: int | None = None

    @property
    def empty_places(self) -> list[str]:
        return [place_text(self.source.path, kind, n) for kind, n in self.empty_at]

    @property
    def _starts_inside(self) -> bool:
        return self.span is not None and self.span.start > 0

    def line_base(self) -> int:
        """Line ends before the span (read when an error message needs a line number)."""
        if self._line_base is None:
            start = self.span.start if self._starts_inside else 0
            self._line_base = sum(block.count(b"\n") for block in _byte_range(self.source.path, 0, start))
        return self._line_base

    def _advance(self, n: int) -> None:
        # A file read again (see _jsonl) reports only the bytes beyond the first reading.
        self._position += n
        if self.on_bytes is not None and self._position > self._reported:
            self.on_bytes(self._position - self._reported)
            self._reported = self._position

    def _restart(self) -> None:
        self._position = 0
        if self.hasher is not None:
            self.hasher = hashlib.sha256()

    def sha256(self) -> str | None:
        return self.hasher.hexdigest() if self.hasher is not None else None

    def __iter__(self) -> Iterator[Piece]:
        reader = {"text": self._text, "jsonl": self._jsonl, "parquet": self._parquet}
        for piece in reader[self.source.kind]():
            if piece.doc_end:
                self.documents += 1
            yield piece

    def _skip_empty(self, kind: str, number: int = 0) -> None:
        self.empty += 1
        if len(self.empty_at) < EMPTY_EXAMPLES:
            self.empty_at.append((kind, number))

    # -- text ---------------------------------------------------------------------------------

    def _open(self):
        raw = open(self.source.path, "rb", buffering=0)
        limit = None
        if self.span is not None:
            raw.seek(self.span.start)
            limit = self.span.end - self.span.start
        lines = self.span is not None and self.source.kind == "jsonl" and not self.source.compressed
        counting = _CountingReader(raw, self.hasher, self._advance, limit, lines=lines)
        buffered = io.BufferedReader(counting, READ_BLOCK)
        stream = gzip.GzipFile(fileobj=buffered, mode="rb") if self.source.compressed else buffered
        return raw, counting, stream

    def _blocks(self) -> Iterator[bytes]:
        raw, counting, stream = self._open()
        with raw:
            try:
                while block := stream.read(READ_BLOCK):
                    yield block
            except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
                if self.source.compressed:
                    raise bad_gzip_error(self.source, exc) from None
                raise
            counting.drain()

    def _text(self) -> Iterator[Piece]:
        splitter = _splitter(self.options)
        piece_chars = self.options.piece_chars
        keep = splitter.reach if splitter else 0  # a separator may straddle two blocks
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        buf = ""
        offset = 0
        open_doc = False  # pieces of the current document have been yielded already
        parts_seen = 0  # separators met so far
        inside = self._starts_inside  # the span starts just after a separator
        line_start = True  # buf starts at the start of a line (a file, a span and a separator line end there)
        blocks = self._blocks()
        while True:
            block = next(blocks, None)
            final = block is None
            if not final:
                if b"\x00" in block:
                    raise binary_error(self.source)
            try:
                buf += decoder.decode(block or b"", final)
            except UnicodeDecodeError as exc:
                base = self.span.start if self.span is not None else 0
                raise not_utf8_error(self.source, max(0, base + offset + exc.start - 3)) from None
            offset += len(block or b"")
            if splitter is not None:
                parts, buf = splitter.split(buf, line_start, final)
                if parts:
                    line_start = True
                for part in parts:
                    if open_doc or has_text(part):
                        yield Piece(part, True)
                    elif parts_seen or inside:  # between two separators
                        self._skip_empty("part", parts_seen + 1)
                    open_doc = False
                    parts_seen += 1
                    self.separators = parts_seen
            while len(buf) - keep > piece_chars:
                cut = safe_cut(buf, piece_chars)
                if (
                    not open_doc
                    and splitter is not None
                    and len(buf) < 16 * piece_chars
                    and not has_text(buf, len(buf) - keep)
                ):
                    break  # maybe only whitespace between two separators: wait and see
                yield Piece(buf[:cut], False)
                buf = buf[cut:]
                open_doc = True
                line_start = False
            if final:
                break
        if open_doc or (buf if splitter is None else has_text(buf)):
            yield Piece(buf, True)
        elif not parts_seen and not inside:  # the whole file is empty
            self._skip_empty("file")

    # -- jsonl --------------------------------------------------------------------------------

    def _jsonl(self) -> Iterator[Piece]:
        """jsonl through pyarrow's JSON reader (a C++ parser, several times faster than
        `json.loads` per line, which matters: the reader shares the cores with the encoder).
        Anything it rejects or finds odd sends the file through `json.loads` from the start,
        which skips the documents already yielded and names the exact line of an error. Null and
        empty texts take that path too, so that they are reported by line."""
        done = 0
        try:
            for text in self._jsonl_arrow():
                yield from pieces_of(text, self.options.piece_chars)
                done += 1
            return
        except Exception as exc:  # noqa: BLE001 - the careful reader below reports it
            if isinstance(exc, DataError):
                raise
        self._restart()
        records = itertools.islice(self._jsonl_python(), done, None)
        for lineno, text in records:
            if text:
                yield from pieces_of(text, self.options.piece_chars)
            else:
                self._skip_empty("line", lineno)

    def _jsonl_arrow(self) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.json as pj

        field = self.options.text_field
        parse = pj.ParseOptions(
            explicit_schema=pa.schema([(field, pa.large_string())]),
            unexpected_field_behavior="ignore",
        )
        read = pj.ReadOptions(use_threads=True, block_size=JSON_BLOCK)
        raw, counting, stream = self._open()
        with raw:
            for batch in pj.open_json(stream, read_options=read, parse_options=parse):
                values = batch.column(0)
                if values.null_count:
                    raise ValueError("missing or null text field")
                texts = values.to_pylist()  # raises on invalid UTF-8
                for text in texts:
                    if not text:
                        raise ValueError("an empty text")
                    if not text.isascii():
                        text.encode("utf-8")  # raises on surrogates
                yield from texts
            counting.drain()
            self.lines = counting.newlines or 0

    def _jsonl_python(self) -> Iterator[tuple[int, str | None]]:
        """(line number in the span, text) of each JSON line; text None for a null."""
        raw, counting, stream = self._open()
        with raw:
            lineno = 0
            try:
                for line in stream:
                    lineno += 1
                    if b"\x00" in line:
                        raise binary_error(self.source)
                    if line.strip():
                        yield lineno, json_line_text(line, _Line(self, lineno), self.options.text_field)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise bad_gzip_error(self.source, exc) from None
            counting.drain()
            self.lines = counting.newlines or 0

    # -- parquet ------------------------------------------------------------------------------

    def _parquet(self) -> Iterator[Piece]:
        import pyarrow as pa

        column = self.options.text_column
        path = self.source.path
        pf = open_parquet(self.source, column)
        span = self.span
        groups = range(pf.num_row_groups) if span is None else range(span.start, span.end)
        total_rows = max(1, sum(pf.metadata.row_group(g).num_rows for g in groups))
        total_bytes = self.source.size if span is None else span.hash_end - span.hash_start
        rows = reported = 0
        row = 0 if span is None else span.row_base
        try:
            for batch in pf.iter_batches(batch_size=4096, row_groups=list(groups), columns=[column]):
                for text in batch.column(0).to_pylist():
                    if text:
                        check_encodable(text, f"{path}: row {row}")
                        yield from pieces_of(text, self.options.piece_chars)
                    else:
                        self._skip_empty("row", row)
                    row += 1
                rows += batch.num_rows
                if self.on_bytes is not None:
                    done = total_bytes * rows // total_rows
                    self.on_bytes(done - reported)
                    reported = done
        except pa.ArrowException as exc:
            raise DataError(f"{path}: cannot read the parquet file ({exc})") from None
        if self.hasher is not None:
            start, end = (0, self.source.size) if span is None else (span.hash_start, span.hash_end)
            self.hasher = _hash_bytes(path, start, end)


class _LiteralSplitter:
    """Documents end at each occurrence of a string."""

    def __init__(self, separator: str):
        self.separator = separator
        self.reach = len(separator) - 1

    def split(self, buf: str, line_start: bool, final: bool) -> tuple[list[str], str]:
        parts = buf.split(self.separator)
        return parts[:-1], parts[-1]


class _LineSplitter:
    """Documents end at each line that holds exactly the separator line (a trailing "\\r"
    aside); the line and its newline belong to no document. The file's first line and its
    last (with or without a newline) count too."""

    def __init__(self, line: str):
        body = re.escape(line) + r"\r?"
        self._within = re.compile(r"(?m)^" + body + r"\n")  # a line whose end has been read
        self._at_end = re.compile(r"(?m)^" + body + r"(?:\n|\Z)")  # the file's last line too
        self.reach = len(line) + 2

    def split(self, buf: str, line_start: bool, final: bool) -> tuple[list[str], str]:
        parts, start = [], 0
        for match in (self._at_end if final else self._within).finditer(buf):
            if match.start() == 0 and not line_start:
                continue  # buf starts inside a line (a long document was cut there)
            parts.append(buf[start : match.start()])
            start = match.end()
        return parts, buf[start:]


def _splitter(options: ReadOptions) -> _LiteralSplitter | _LineSplitter | None:
    if options.separator_line:
        return _LineSplitter(options.separator_line)
    return _LiteralSplitter(options.separator) if options.separator else None


def _byte_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    """Bytes start .. end of a file, READ_BLOCK at a time."""
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0 and (block := fh.read(min(READ_BLOCK, left))):
            yield block
            left -= len(block)


def _hash_bytes(path: Path, start: int, end: int):
    """sha256 of bytes start .. end of a file."""
    hasher = hashlib.sha256()
    for block in _byte_range(path, start, end):
        hasher.update(block)
    return hasher


class _Line:
    """A line of a jsonl span as error messages name it, counted from the file's start only
    when a message is written."""

    def __init__(self, reader: SourceReader, lineno: int):
        self._reader, self._lineno = reader, lineno

    def __str__(self) -> str:
        return f"{self._reader.source.path}:{self._lineno + self._reader.line_base()}"


_NON_SPACE = re.compile(r"\S")  # \s is what str.isspace calls whitespace


def has_text(text: str, end: int | None = None) -> bool:
    """Whether text[:end] holds anything but whitespace (without copying it)."""
    return _NON_SPACE.search(text, 0, len(text) if end is None else end) is not None


def check_encodable(text: str, where: str) -> None:
    # JSON escapes can spell lone surrogates ("\ud800"), which UTF-8 cannot hold.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: the text holds an unpaired surrogate, which is not valid Unicode") from None


def json_line_text(line: bytes, where: str, field: str) -> str | None:
    """The text of one non-blank JSON line (None for a null), or a DataError naming `where`."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; convert the file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not a JSON line ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: a JSON line nested too deeply to read") from None
    if not isinstance(obj, dict) or field not in obj:
        names = ", ".join(map(repr, obj)) if isinstance(obj, dict) else "none"
        raise DataError(f"{where}: no field {field!r} (fields: {names}); choose one with --text_field")
    text = obj[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} holds {type(text).__name__}, not a string")
    if text:
        check_encodable(text, where)
    return text


def open_parquet(source: Source, column: str):
    """A `pyarrow.parquet.ParquetFile` whose `column` holds strings, or a DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = source.path
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(
            f"{path}: no column {column!r} (columns: {', '.join(map(repr, names))}); choose one with --text_column"
        )
    kind = pf.schema_arrow.field(column).type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or getattr(pa.types, "is_string_view", lambda _: False)(kind)
    ):
        raise DataError(f"{path}: column {column!r} holds {kind}, not strings")
    return pf


def iter_pieces(
    sources: Iterable[Source],
    options: ReadOptions,
    on_bytes: Callable[[int], None] | None = None,
    hash_files: bool = False,
    on_source_done: Callable[[SourceReader], None] | None = None,
) -> Iterator[Piece]:
    """All documents of all sources in order, as pieces."""
    for source in sources:
        reader = SourceReader(source, options, on_bytes, hash_file=hash_files)
        yield from reader
        if on_source_done is not None:
            on_source_done(reader)


def piece_batches(pieces: Iterable[Piece], chars: int) -> Iterator[list[Piece]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text) + 16  # + per-document overhead, for corpora of tiny documents
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))
