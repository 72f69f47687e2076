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

`DocumentSample` reads about N bytes of whole documents from evenly spread places of a corpus
and nothing else (what a tokenizer trains on), entering each file at an offset and skipping to
the next document boundary.
"""

from __future__ import annotations

import bisect
import codecs
import glob
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lmtools.errors import DataError
from lmtools.layout import EOT

# Suffixes picked up when searching a folder (an explicitly named file is read whatever its name).
CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")

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
    text_field: str = "text"  # jsonl
    text_column: str = "text"  # parquet
    separator: str | None = EOT  # text files: split into documents here (None: one per file)
    piece_chars: int = PIECE_CHARS


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


def _in_folder(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(CORPUS_SUFFIXES):
                found.append(Path(root) / name)
    return sorted(found)


def resolve_sources(inputs: Iterable[str | os.PathLike]) -> list[Source]:
    """Expand files, folders and globs into the ordered list of input files.

    Raises DataError for an input that names nothing, a folder without corpus files, or a
    parquet file that is gzipped. Empty files are kept: the reader counts them as empty documents.
    """
    paths: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found = _in_folder(path)
            if not found:
                raise DataError(f"{text}: the folder holds no {', '.join(CORPUS_SUFFIXES)} files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise DataError(f"{text}: not a regular file or folder")
        elif glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise DataError(f"{text}: no file matches this pattern")
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    paths.extend(_in_folder(m))
                elif m.is_file():
                    paths.append(m)
        else:
            raise DataError(f"{text}: no such file or folder")
    if not paths:
        raise DataError("no input files: name .txt, .jsonl or .parquet files, folders or globs")

    sources, seen = [], set()
    for path in paths:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        kind, compressed = _kind_of(path)
        if kind == "parquet" and compressed:
            raise DataError(f"{path}: gzipped parquet is not supported; parquet compresses itself")
        sources.append(Source(path, kind, compressed, path.stat().st_size))
    return sources


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


def _pieces_of(text: str, piece_chars: int) -> Iterator[Piece]:
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

    def __init__(self, raw, hasher, on_bytes: Callable[[int], None] | None):
        self._raw = raw
        self._hasher = hasher
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            if self._hasher is not None:
                self._hasher.update(memoryview(buffer)[:n])
            if self._on_bytes is not None:
                self._on_bytes(n)
        return n

    def drain(self) -> None:
        """Read to the end, so that the hash covers the whole file (gzip may stop early)."""
        while self.readinto(bytearray(READ_BLOCK)):
            pass


def _not_utf8(source: Source, offset: int) -> DataError:
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
                    raise _binary(source)


def _binary(source: Source) -> DataError:
    return DataError(f"{source.path}: looks binary (holds NUL bytes), not text; leave it out")


def _bad_gzip(source: Source, exc: Exception) -> DataError:
    return DataError(f"{source.path}: not a readable gzip file ({exc})")


class SourceReader:
    """Streams the documents of one source as pieces; hashes the file as it goes."""

    def __init__(
        self,
        source: Source,
        options: ReadOptions,
        on_bytes: Callable[[int], None] | None = None,
        hash_file: bool = True,
    ):
        self.source = source
        self.options = options
        self.on_bytes = on_bytes
        self.hasher = hashlib.sha256() if hash_file else None
        self.documents = 0
        self.empty = 0  # empty documents skipped
        self.empty_places: list[str] = []  # where the first few of them are
        self._position = self._reported = 0  # bytes read in this pass / reported so far

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

    def _skip_empty(self, place: str) -> None:
        self.empty += 1
        if len(self.empty_places) < EMPTY_EXAMPLES:
            self.empty_places.append(place)

    # -- text ---------------------------------------------------------------------------------

    def _open(self):
        raw = open(self.source.path, "rb", buffering=0)
        counting = _CountingReader(raw, self.hasher, self._advance)
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
                    raise _bad_gzip(self.source, exc) from None
                raise
            counting.drain()

    def _text(self) -> Iterator[Piece]:
        sep = self.options.separator or None
        piece_chars = self.options.piece_chars
        keep = len(sep) - 1 if sep else 0  # a separator may straddle two blocks
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        buf = ""
        offset = 0
        open_doc = False  # pieces of the current document have been yielded already
        parts_seen = 0  # separators met so far
        blocks = self._blocks()
        while True:
            block = next(blocks, None)
            final = block is None
            if not final:
                if b"\x00" in block:
                    raise _binary(self.source)
            try:
                buf += decoder.decode(block or b"", final)
            except UnicodeDecodeError as exc:
                raise _not_utf8(self.source, max(0, offset + exc.start - 3)) from None
            offset += len(block or b"")
            if sep is not None:
                parts = buf.split(sep)
                buf = parts.pop()
                for part in parts:
                    if open_doc or _has_text(part):
                        yield Piece(part, True)
                    elif parts_seen:  # between two separators
                        self._skip_empty(f"{self.source.path}: part {parts_seen + 1}")
                    open_doc = False
                    parts_seen += 1
            while len(buf) - keep > piece_chars:
                cut = safe_cut(buf, piece_chars)
                if (
                    not open_doc
                    and sep is not None
                    and len(buf) < 16 * piece_chars
                    and not _has_text(buf, len(buf) - keep)
                ):
                    break  # maybe only whitespace between two separators: wait and see
                yield Piece(buf[:cut], False)
                buf = buf[cut:]
                open_doc = True
            if final:
                break
        if open_doc or (buf if sep is None else _has_text(buf)):
            yield Piece(buf, True)
        elif not parts_seen:  # the whole file is empty
            self._skip_empty(str(self.source.path))

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
                yield from _pieces_of(text, self.options.piece_chars)
                done += 1
            return
        except Exception as exc:  # noqa: BLE001 - the careful reader below reports it
            if isinstance(exc, DataError):
                raise
        self._restart()
        records = itertools.islice(self._jsonl_python(), done, None)
        for lineno, text in records:
            if text:
                yield from _pieces_of(text, self.options.piece_chars)
            else:
                self._skip_empty(f"{self.source.path}:{lineno}")

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

    def _jsonl_python(self) -> Iterator[tuple[int, str | None]]:
        """(line number, text) of each JSON line; text None for a null."""
        raw, counting, stream = self._open()
        with raw:
            lineno = 0
            try:
                for line in stream:
                    lineno += 1
                    if b"\x00" in line:
                        raise _binary(self.source)
                    if line.strip():
                        yield lineno, json_line_text(line, f"{self.source.path}:{lineno}", self.options.text_field)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise _bad_gzip(self.source, exc) from None
            counting.drain()

    # -- parquet ------------------------------------------------------------------------------

    def _parquet(self) -> Iterator[Piece]:
        import pyarrow as pa

        column = self.options.text_column
        path = self.source.path
        pf = open_parquet(self.source, column)
        total_rows = max(1, pf.metadata.num_rows)
        rows = reported = 0
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=4096, columns=[column]):
                for text in batch.column(0).to_pylist():
                    if text:
                        _check_encodable(text, f"{path}: row {row}")
                        yield from _pieces_of(text, self.options.piece_chars)
                    else:
                        self._skip_empty(f"{path}: row {row}")
                    row += 1
                rows += batch.num_rows
                if self.on_bytes is not None:
                    done = self.source.size * rows // total_rows
                    self.on_bytes(done - reported)
                    reported = done
        except pa.ArrowException as exc:
            raise DataError(f"{path}: cannot read the parquet file ({exc})") from None
        if self.hasher is not None:
            with open(path, "rb") as f:
                self.hasher = hashlib.file_digest(f, "sha256")


_NON_SPACE = re.compile(r"\S")  # \s is what str.isspace calls whitespace


def _has_text(text: str, end: int | None = None) -> bool:
    """Whether text[:end] holds anything but whitespace (without copying it)."""
    return _NON_SPACE.search(text, 0, len(text) if end is None else end) is not None


def _check_encodable(text: str, where: str) -> None:
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
        _check_encodable(text, where)
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


# ---------------------------------------------------------------------------------------------
# Sampling: about N bytes of whole documents from evenly spread places, without reading the rest
# ---------------------------------------------------------------------------------------------

SAMPLE_WINDOWS = 256  # a large sample is read from about this many places
MIN_SAMPLE_WINDOWS = 16  # and a small one from at least this many
MAX_WINDOW = 4 << 20  # bytes: past this, more places rather than longer reads
SMALL_WINDOW = 64 << 10  # a window shorter than this only when the sample needs 16 of them
GROWING_READ = 4 << 10  # reads past a window start this small and double, up to READ_BLOCK
GZIP_CHUNK = 16 << 10  # compressed bytes inflated at a time (the granularity of a gzip prefix)
LONG_LINE = 64 << 20  # a jsonl line (which cannot be cut) is read this far past its window at most


def sample_windows(sizes: Sequence[int], sample_bytes: int, seed: int) -> list[tuple[int, int]]:
    """(start, length) of the byte ranges a sample of `sample_bytes` reads, in the corpus seen
    as its files end to end: one range in each of `count` equal strata, at a seeded place in
    it, so that the ranges never overlap and cover the beginning, the middle and the end.

    Many short ranges spread the sample; each costs a seek and about one document that is
    read only to find where the next one starts. 256 ranges of up to 4 MiB balance the two
    (a 1 GB sample: 4 MiB ranges; 20 MB: 80 KB); a small sample still gets 16.
    """
    total = sum(sizes)
    sample_bytes = min(sample_bytes, total)
    if sample_bytes <= 0:
        return []
    window = min(MAX_WINDOW, max(sample_bytes // SAMPLE_WINDOWS, min(SMALL_WINDOW, sample_bytes // MIN_SAMPLE_WINDOWS)))
    count = max(1, sample_bytes // max(1, window))
    if sample_bytes == total:  # the whole corpus: windows that tile it
        bounds = [i * total // count for i in range(count + 1)]
        return [(a, b - a) for a, b in itertools.pairwise(bounds)]
    length = sample_bytes // count
    stride = total / count
    rng = random.Random(f"sample:{seed}")
    starts = (int(i * stride + rng.random() * (stride - length)) for i in range(count))
    return [(min(start, total - length), length) for start in starts]


def _ranges_by_source(sizes: Sequence[int], windows: list[tuple[int, int]]) -> list[list[tuple[int, int, bool]]]:
    """For each file, the (lo, hi, window_inside) parts of the windows that fall in it, in file
    offsets; `window_inside` when the whole window lies in that file. A window that runs past
    the end of a file goes on at the start of the next one."""
    ranges: list[list[tuple[int, int, bool]]] = [[] for _ in sizes]
    bounds = list(itertools.accumulate(sizes, initial=0))
    for start, length in windows:
        end = start + length
        i = bisect.bisect_right(bounds, start) - 1
        while i < len(sizes) and bounds[i] < end:
            lo, hi = max(start, bounds[i]) - bounds[i], min(end, bounds[i + 1]) - bounds[i]
            if hi > lo:
                ranges[i].append((lo, hi, start >= bounds[i] and end <= bounds[i + 1]))
            i += 1
    return ranges


class _Splitter:
    """Cuts a stream of bytes into the parts between delimiters, keeping the file offset of
    each; without a delimiter, everything stays pending (the stream is one document)."""

    def __init__(self, delimiter: bytes | None, offset: int):
        self.delimiter = delimiter
        self.pending = bytearray()
        self.start = offset  # file offset of pending[0]
        self._searched = 0  # no delimiter starts in pending[:_searched]

    @property
    def end(self) -> int:
        return self.start + len(self.pending)

    def drop(self) -> None:
        """Forget the pending part (but a delimiter's first bytes that may end it)."""
        keep = len(self.delimiter) - 1 if self.delimiter else 0
        gone = len(self.pending) - keep
        if gone > 0:
            del self.pending[:gone]
            self.start += gone
            self._searched = 0

    def feed(self, block: bytes) -> list[tuple[int, bytes]]:
        """(offset, bytes) of the parts that `block` completes."""
        self.pending += block
        if not self.delimiter:
            return []
        parts, pos, width = [], 0, len(self.delimiter)
        while (k := self.pending.find(self.delimiter, max(pos, self._searched))) >= 0:
            parts.append((self.start + pos, bytes(self.pending[pos:k])))
            pos = k + width
        del self.pending[:pos]
        self.start += pos
        self._searched = max(0, len(self.pending) - width + 1)
        return parts


class DocumentSample:
    """About `sample_bytes` of the corpus, as whole documents read from evenly spread places
    (see `sample_windows`), and nothing else read: what the BPE trains on.

    A window takes the documents that start inside it, each read to its end, or at most
    `overrun` bytes past the window (a longer text is cut there at a safe point); a jsonl line,
    which cannot be cut, is read up to LONG_LINE past it (a longer one is left out). A window
    meets a document of L bytes with a chance of about window / L, so the expected bytes read
    past windows stay under the windows' own length whatever these limits, which only bound
    the worst case and the memory held. Each input kind finds where documents start from any
    offset:

    - text split by a separator: a document starts after each separator, and a window that
      starts mid-file skips to the first one; a window wholly inside one long document reads
      that part of it (a huge single-document file is sampled as parts spread over it);
    - text with no separator (each file one document): a file is read when its start falls in
      a window, and a window inside one file reads that part of it;
    - jsonl: a document starts after each newline;
    - .gz: a compressed stream cannot be entered in the middle, so a compressed file gives a
      prefix as long, in compressed bytes, as the windows that fall in it (small files whole);
    - parquet: whole row groups, evenly spread, as many as the file's share needs (only they
      are read), and within them evenly spread rows.

    Expected bytes read: the sample plus about one document per window, and under three times
    the sample on any corpus (a window reads itself, past itself the end of its last document,
    and before its first document at most itself). The same seed and files give the same
    sample. A file that is not UTF-8, holds NUL bytes or is a bad gzip stream is reported from
    the bytes read. If no window meets the start of a document with text (jsonl lines far
    longer than the windows), the documents that start in the sample's length at the start of
    the corpus are the sample instead.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        options: ReadOptions,
        sample_bytes: int,
        seed: int,
        on_bytes: Callable[[int], None] | None = None,
    ):
        self.sources, self.options, self.seed, self.on_bytes = list(sources), options, seed, on_bytes
        windows = sample_windows([s.size for s in self.sources], sample_bytes, seed)
        self.windows = len(windows)
        self.window = max((length for _, length in windows), default=0)
        self.overrun = max(self.window, sample_bytes // 16)
        self.planned = sum(length for _, length in windows)  # bytes of the corpus the windows cover
        self.bytes_read = 0  # bytes of the input files read so far (compressed, for .gz)
        self._ranges = _ranges_by_source([s.size for s in self.sources], windows)

    def __iter__(self) -> Iterator[Piece]:
        found = False
        for text in self._read(self._ranges):
            found = True
            yield from _pieces_of(text, self.options.piece_chars)
        if not found and self.planned:  # the first documents, as one window at the start
            first = _ranges_by_source([s.size for s in self.sources], [(0, self.planned)])
            on_bytes, self.on_bytes = self.on_bytes, None  # progress counted the windows already
            for text in self._read(first):
                yield from _pieces_of(text, self.options.piece_chars)
            self.on_bytes = on_bytes

    def _read(self, ranges_by_source: list[list[tuple[int, int, bool]]]) -> Iterator[str]:
        for index, (source, ranges) in enumerate(zip(self.sources, ranges_by_source, strict=True)):
            if not ranges:
                continue
            if source.kind == "parquet":
                yield from self._parquet_rows(source, ranges, index)
            elif source.compressed and self._delimiter(source) is None:
                yield from self._gzip_document(source, ranges)
            else:
                parts = self._gzip_prefix(source, ranges) if source.compressed else self._windows(source, ranges)
                yield from self._texts(source, parts)

    def _advance(self, nbytes: int) -> None:
        if self.on_bytes is not None and nbytes:
            self.on_bytes(nbytes)

    def _limit(self, source: Source) -> int:
        """How far past its window a document is read: a text is cut there, a line dropped."""
        return max(self.overrun, LONG_LINE) if source.kind == "jsonl" else self.overrun

    def _delimiter(self, source: Source) -> bytes | None:
        if source.kind == "jsonl":
            return b"\n"
        return self.options.separator.encode("utf-8") if self.options.separator else None

    # -- from offsets of plain files -----------------------------------------------------------

    def _windows(self, source: Source, ranges: list[tuple[int, int, bool]]) -> Iterator[tuple[int, bytes, bool]]:
        """(offset, bytes, whole) of the documents (or parts, whole=False) in `ranges`. Where a
        range's reading stopped is remembered, so a document is never read twice."""
        delimiter = self._delimiter(source)
        with open(source.path, "rb", buffering=0) as f:
            cursor, at_boundary = 0, True
            for lo, hi, window_inside in ranges:
                start = max(lo, cursor)
                if start < hi:
                    known = start == 0 or (at_boundary and start == cursor)
                    if delimiter is None:
                        reading = self._whole_file(source, f, start, hi, known, window_inside)
                    else:
                        reading = self._range(source, f, (cursor, start, hi), known, window_inside, delimiter)
                    cursor, at_boundary = yield from reading
                self._advance(hi - lo)

    def _reads(self, source: Source, f, offset: int, first: int) -> Iterator[bytes]:
        """Blocks of the (unbuffered) file from `offset`: `first` bytes, then small ones that
        double (past a window, only the end of one document is wanted)."""
        size, grow = first, GROWING_READ
        f.seek(offset)
        while block := f.read(size):
            self.bytes_read += len(block)
            if b"\x00" in block:
                raise _binary(source)
            yield block
            size, grow = grow, min(2 * grow, READ_BLOCK)

    def _range(
        self,
        source: Source,
        f,
        where: tuple[int, int, int],
        known: bool,
        window_inside: bool,
        delimiter: bytes,
    ) -> Iterator[tuple[int, bytes, bool]]:
        """The documents that start in [start, hi) of a delimited file (`where`: floor, start,
        hi; the file before `floor` is read already); returns where reading stopped and whether
        that is a document boundary."""
        floor, start, hi = where
        # A delimiter that ends at `start` or later marks a document starting in the range.
        read_from = start if known else max(floor, start - len(delimiter))
        splitter = _Splitter(delimiter, read_from)
        skipping = not known  # the bytes up to the first delimiter end an earlier document
        first = True
        for block in self._reads(source, f, read_from, hi - read_from):
            for offset, data in splitter.feed(block):
                if skipping:
                    skipping = False
                elif offset >= hi:
                    return offset, True
                else:
                    yield offset, data, True
            if first and skipping:  # no document starts in the range: it lies inside one
                if window_inside and source.kind == "text":
                    yield start, block[start - read_from :], False
                return read_from + len(block), False
            first = False
            if splitter.start >= hi:
                return splitter.start, True
            if splitter.end >= hi + self._limit(source):
                cut = hi + self._limit(source)
                if source.kind == "text":
                    yield splitter.start, bytes(splitter.pending[: cut - splitter.start]), False
                return cut, False
        if not skipping and splitter.pending and splitter.start < hi:
            yield splitter.start, bytes(splitter.pending), True
        return splitter.end, True

    def _whole_file(
        self, source: Source, f, start: int, hi: int, known: bool, window_inside: bool
    ) -> Iterator[tuple[int, bytes, bool]]:
        """A text file that is one document: whole when its start is in the range (up to
        `overrun` past it), else the range itself when the window lies inside the file."""
        if not known:
            if window_inside:
                yield start, next(self._reads(source, f, start, hi - start), b""), False
            return hi, False
        limit = hi + self.overrun
        data = bytearray()
        for block in self._reads(source, f, 0, hi):
            data += block
            if len(data) >= limit:
                yield 0, bytes(data[:limit]), False
                return limit, False
        yield 0, bytes(data), True
        return len(data), True

    # -- from the start of compressed files ----------------------------------------------------

    def _gunzip(self, source: Source) -> Iterator[tuple[bytes, int]]:
        """(inflated block, compressed bytes read so far) of a gzip file, member after member."""
        with open(source.path, "rb", buffering=0) as f:
            inflate, consumed = zlib.decompressobj(wbits=31), 0
            while chunk := f.read(GZIP_CHUNK):
                consumed += len(chunk)
                self.bytes_read += len(chunk)
                while chunk:
                    if inflate.eof:
                        if not chunk.strip(b"\x00"):  # padding after the last member
                            break
                        inflate = zlib.decompressobj(wbits=31)
                    try:
                        out = inflate.decompress(chunk)
                    except zlib.error as exc:
                        raise _bad_gzip(source, exc) from None
                    chunk = inflate.unused_data if inflate.eof else b""
                    if out:
                        if b"\x00" in out:
                            raise _binary(source)
                        yield out, consumed

    def _gzip_prefix(self, source: Source, ranges: list[tuple[int, int, bool]]) -> Iterator[tuple[int, bytes, bool]]:
        """The documents that start in the file's first `budget` compressed bytes, where
        `budget` is the length of the windows that fall in the file (offsets: inflated)."""
        budget = sum(hi - lo for lo, hi, _ in ranges)
        yield from self._gzip_documents(source, budget)
        self._advance(budget)

    def _gzip_documents(self, source: Source, budget: int) -> Iterator[tuple[int, bytes, bool]]:
        splitter = _Splitter(self._delimiter(source), 0)
        hi = None  # inflated offset where the budget ran out
        skipping = False  # inside a document longer than the limit, cut or left out
        for block, consumed in self._gunzip(source):
            for offset, data in splitter.feed(block):
                if hi is not None and offset >= hi:
                    return
                if not skipping:
                    yield offset, data, True
                skipping = False
            if hi is None and consumed >= budget:
                hi = splitter.end
            if hi is not None and splitter.start >= hi:
                return
            if len(splitter.pending) >= self._limit(source):
                if not skipping and source.kind == "text":
                    yield splitter.start, bytes(splitter.pending[: self.overrun]), False
                if hi is not None:
                    return
                skipping = True
                splitter.drop()
        if splitter.pending and not skipping:
            yield splitter.start, bytes(splitter.pending), True

    def _gzip_document(self, source: Source, ranges: list[tuple[int, int, bool]]) -> Iterator[str]:
        """A gzipped text file that is one document: the text of its first `budget` compressed
        bytes (all of it when that is the whole file), in pieces, cut at safe points."""
        budget = sum(hi - lo for lo, hi, _ in ranges)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        text, done = "", 0
        for block, consumed in self._gunzip(source):
            try:
                text += decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise _not_utf8(source, max(0, done + exc.start - 3)) from None
            done += len(block)
            if consumed >= budget and consumed < source.size:
                yield text[: safe_cut(text, len(text))]
                break
            if len(text) > self.options.piece_chars:
                cut = safe_cut(text, self.options.piece_chars)
                yield text[:cut]
                text = text[cut:]
        else:
            try:
                yield text + decoder.decode(b"", True)
            except UnicodeDecodeError as exc:
                raise _not_utf8(source, max(0, done + exc.start - 3)) from None
        self._advance(budget)

    # -- bytes to text -------------------------------------------------------------------------

    def _texts(self, source: Source, parts: Iterable[tuple[int, bytes, bool]]) -> Iterator[str]:
        """The text of each document (a jsonl line's field) or part, empty ones left out."""
        field, separated = self.options.text_field, bool(self.options.separator)
        for offset, data, whole in parts:
            if source.kind == "jsonl":
                where = f"{source.path}: the line at byte {offset}"
                text = json_line_text(data, where, field) if data.strip() else None
            elif whole:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(source, offset + exc.start) from None
                if separated and not _has_text(text):
                    continue
            else:
                text = _part_text(source, data, offset)
            if text:
                yield text

    # -- parquet -------------------------------------------------------------------------------

    def _parquet_rows(self, source: Source, ranges: list[tuple[int, int, bool]], index: int) -> Iterator[str]:
        """Rows of evenly spread row groups, enough of them for the file's share of the sample
        (a row group is the least parquet reads), and evenly spread rows within them."""
        import numpy as np
        import pyarrow as pa

        column = self.options.text_column
        pf = open_parquet(source, column)
        share = sum(hi - lo for lo, hi, _ in ranges) / max(1, source.size)
        sizes = _column_sizes(pf, column)
        rng = random.Random(f"sample:{self.seed}:{index}")
        groups = _spread(len(sizes), share, rng)
        keep = min(1.0, share * sum(sizes) / max(1, sum(sizes[g] for g in groups)))
        try:
            for group in groups:
                self.bytes_read += sizes[group]
                row, phase = 0, rng.random()
                for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=[column]):
                    k = np.arange(row, row + batch.num_rows, dtype=np.float64)
                    picked = np.flatnonzero(np.floor((k + 1) * keep + phase) > np.floor(k * keep + phase))
                    for i, text in zip(picked, batch.column(0).take(pa.array(picked)).to_pylist()):
                        if text:
                            _check_encodable(text, f"{source.path}: row group {group}, row {row + i}")
                            yield text
                    row += batch.num_rows
        except pa.ArrowException as exc:
            raise DataError(f"{source.path}: cannot read the parquet file ({exc})") from None
        self._advance(sum(hi - lo for lo, hi, _ in ranges))


def _part_text(source: Source, data: bytes, offset: int) -> str:
    """The text of a part of a long document read from any offset: from the first character
    that starts there, cut after the last whole character and, when there is one in the last
    half, at a safe cut (see `safe_cut`), so that the part splits into the same words."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:  # continuation bytes
        skip += 1
    try:
        text = codecs.getincrementaldecoder("utf-8")("strict").decode(data[skip:], False)
    except UnicodeDecodeError as exc:
        raise _not_utf8(source, offset + skip + exc.start) from None
    return text[: safe_cut(text, len(text))] if len(text) > 1 else text


def _column_sizes(pf, column: str) -> list[int]:
    """Compressed bytes of `column` in each row group of a parquet file."""
    meta = pf.metadata
    index = next(j for j in range(meta.num_columns) if meta.schema.column(j).path == column)
    return [meta.row_group(g).column(index).total_compressed_size for g in range(meta.num_row_groups)]


def _spread(count: int, share: float, rng: random.Random) -> list[int]:
    """`share` of `count` items (at least one), one at a seeded place in each equal stratum."""
    if count == 0:
        return []
    picks = min(count, max(1, math.ceil(share * count)))
    return sorted({int((i + rng.random()) * count / picks) for i in range(picks)})
