"""A tokenizer's training sample: about N bytes of whole documents from evenly spread places of a
corpus, and nothing else read (`DocumentSample`). Each file is entered at an offset and read from
the next document boundary on: the next separator of a text file, the next line of a jsonl file;
a file that is one document is read whole, or in stretches when it is huge; a gzip file, which
cannot seek, gives its first bytes; a parquet file, evenly spread row groups.
"""

from __future__ import annotations

import bisect
import codecs
import itertools
import math
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from lmtools.data.corpus import (
    READ_BLOCK,
    Piece,
    ReadOptions,
    Source,
    bad_gzip_error,
    binary_error,
    check_encodable,
    has_text,
    json_line_text,
    not_utf8_error,
    open_parquet,
    pieces_of,
    safe_cut,
)
from lmtools.errors import DataError

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
            yield from pieces_of(text, self.options.piece_chars)
        if not found and self.planned:  # the first documents, as one window at the start
            first = _ranges_by_source([s.size for s in self.sources], [(0, self.planned)])
            on_bytes, self.on_bytes = self.on_bytes, None  # progress counted the windows already
            for text in self._read(first):
                yield from pieces_of(text, self.options.piece_chars)
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
        return self.options.boundary  # a separator line's own line ends up in a sampled text: harmless

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
                raise binary_error(source)
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
                        raise bad_gzip_error(source, exc) from None
                    chunk = inflate.unused_data if inflate.eof else b""
                    if out:
                        if b"\x00" in out:
                            raise binary_error(source)
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
                raise not_utf8_error(source, max(0, done + exc.start - 3)) from None
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
                raise not_utf8_error(source, max(0, done + exc.start - 3)) from None
        self._advance(budget)

    # -- bytes to text -------------------------------------------------------------------------

    def _texts(self, source: Source, parts: Iterable[tuple[int, bytes, bool]]) -> Iterator[str]:
        """The text of each document (a jsonl line's field) or part, empty ones left out."""
        field, separated = self.options.text_field, self.options.splits_text
        for offset, data, whole in parts:
            if source.kind == "jsonl":
                where = f"{source.path}: the line at byte {offset}"
                text = json_line_text(data, where, field) if data.strip() else None
            elif whole:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise not_utf8_error(source, offset + exc.start) from None
                if separated and not has_text(text):
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
                            check_encodable(text, f"{source.path}: row group {group}, row {row + i}")
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
        raise not_utf8_error(source, offset + skip + exc.start) from None
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
