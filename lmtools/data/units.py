"""The corpus cut into units of work: what `prepare` encodes in parallel, commits one at a
time (so that an interrupted prepare resumes), and deals out to `--shard I/N`.

A unit is a `Span` of one file: a whole file, or bytes of a large text or jsonl file cut at
document boundaries (after a separator, after a line end), or row groups of a large parquet
file. The cuts depend on the files and on the unit size alone, never on the number of
processes or shards, so any way of running the units gives the same tokens in the same order.
Files that cannot be cut are one unit: gzip (no seeking), a text file without separators (one
document), and a file whose separators are too far apart.

The unit size grows with the corpus (a 256th of it, within 4 MB .. 64 MB): enough units for
every core and for resuming a long prepare, few enough to keep the bookkeeping small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmtools.data.corpus import ReadOptions, Source, Span, open_parquet

UNIT_MIN = 4 << 20
UNIT_MAX = 64 << 20
UNITS_WANTED = 256
SCAN_BLOCK = 1 << 16


@dataclass(frozen=True)
class Unit:
    index: int  # place in the corpus order
    source: int  # index of its file in the source list
    span: Span

    @property
    def weight(self) -> int:
        """Bytes of its file that it stands for."""
        return self.span.hash_end - self.span.hash_start

    def to_json(self) -> list:
        s = self.span
        return [self.index, self.source, s.start, s.end, s.hash_start, s.hash_end, s.row_base]

    @staticmethod
    def from_json(data: list) -> Unit:
        index, source, *span = data
        return Unit(index, source, Span(*span))


def unit_bytes_for(total_bytes: int) -> int:
    return max(UNIT_MIN, min(UNIT_MAX, total_bytes // UNITS_WANTED))


def plan_units(sources: Sequence[Source], options: ReadOptions, unit_bytes: int) -> list[Unit]:
    """The units of all sources, in corpus order."""
    units: list[Unit] = []
    for i, source in enumerate(sources):
        for span in _spans(source, options, unit_bytes):
            units.append(Unit(len(units), i, span))
    return units


def shard_units(units: Sequence[Unit], shard: int, shards: int) -> list[Unit]:
    """Shard `shard` of `shards`: a contiguous run of units, the corpus's bytes dealt out
    evenly (a unit goes where the middle of its bytes falls)."""
    total = sum(u.weight for u in units) or 1
    mine, before = [], 0
    for u in units:
        # floor(middle * shards / total), in integers: exact for any corpus and shard count
        if min((2 * before + u.weight) * shards // (2 * total), shards - 1) == shard:
            mine.append(u)
        before += u.weight
    return mine


def _spans(source: Source, options: ReadOptions, unit_bytes: int) -> list[Span]:
    size = source.size
    if source.kind == "parquet":  # spans of row groups
        return _parquet_spans(source, options, unit_bytes)
    whole = [Span(0, size, 0, size)]
    if source.compressed or size <= unit_bytes:
        return whole
    if source.kind == "jsonl":
        delimiter = b"\n"
    elif options.boundary:
        delimiter = options.boundary
    else:
        return whole  # one document
    cuts = _cuts(source, delimiter, unit_bytes)
    bounds = [0, *cuts, size]
    return [Span(a, b, a, b) for a, b in zip(bounds, bounds[1:])]


def _cuts(source: Source, delimiter: bytes, unit_bytes: int) -> list[int]:
    """Byte offsets just after a delimiter, one near each multiple of `unit_bytes`.

    A delimiter that can overlap itself ("\\n\\n" in "\\n\\n\\n") is taken only where no
    occurrence starts in the bytes just before it: the reader, which splits from the start of
    the file, splits there too (every split it makes before that point ends at or before it).
    """
    cuts: list[int] = []
    n = len(delimiter)
    with open(source.path, "rb") as fh:
        target = unit_bytes
        while target < source.size:
            at = _next_boundary(fh, max(target, cuts[-1] if cuts else 0), delimiter, source.size)
            if at is None:
                break
            end = at + n
            if end >= source.size:
                break
            cuts.append(end)
            target = max(target + unit_bytes, end + unit_bytes // 2)
    return cuts


def _next_boundary(fh, position: int, delimiter: bytes, size: int) -> int | None:
    """The first occurrence of `delimiter` at or after `position` that no earlier occurrence
    overlaps; None when there is none before the end of the file."""
    n = len(delimiter)
    start = max(0, position - (n - 1))
    while start < size:
        fh.seek(start)
        block = fh.read(SCAN_BLOCK + 2 * (n - 1))
        if len(block) < n:
            return None
        i = block.find(delimiter, max(0, position - start))
        while i != -1:
            if i + n > len(block):
                break
            # The block starts n - 1 bytes before `position` (or at the file's start), so
            # the bytes just before i are in it.
            if not any(block.startswith(delimiter, j) for j in range(max(0, i - n + 1), i)):
                return start + i
            i = block.find(delimiter, i + 1)
        # Move on past every start examined (find returns whole occurrences only), keeping
        # n - 1 bytes of context before the next place searched. At least one byte on: a block
        # no longer than the context (a small SCAN_BLOCK, the file's end) moved nothing before.
        position = max(position + 1, start + len(block) - n + 1)
        start = position - (n - 1)
    return None


def _parquet_spans(source: Source, options: ReadOptions, unit_bytes: int) -> list[Span]:
    """Row groups gathered into units of about `unit_bytes` (by their compressed size; all of
    them in one for a small file); each unit hashes an equal share of the file's bytes."""
    meta = open_parquet(source, options.text_column).metadata
    groups: list[tuple[int, int, int]] = []  # first group, end group, rows before them
    first = size = rows = rows_before = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        rows += rg.num_rows
        if size >= unit_bytes:
            groups.append((first, g + 1, rows_before))
            first, rows_before, size, rows = g + 1, rows_before + rows, 0, 0
    if first < meta.num_row_groups:
        groups.append((first, meta.num_row_groups, rows_before))
    if len(groups) <= 1:
        return [Span(0, meta.num_row_groups, 0, source.size)]
    k = len(groups)
    return [Span(a, b, source.size * i // k, source.size * (i + 1) // k, base) for i, (a, b, base) in enumerate(groups)]
