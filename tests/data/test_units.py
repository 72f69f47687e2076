"""Units of work (`lmtools.data.units`): reading a file span by span, in order, gives the same
documents, counts and empty places as reading it whole; the spans of a file tile its bytes and
start just after a delimiter the whole-file reader splits at; `shard_units` deals the units
out as contiguous runs, each unit once."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmtools.data.corpus as corpus
import lmtools.data.units as units_module
from lmtools.data.corpus import ReadOptions, Source, SourceReader, Span
from lmtools.data.parts import empty_places
from lmtools.data.units import Unit, plan_units, shard_units
from lmtools.layout import EOT

SEPARATORS = ["\n\n", "%%", "aaa", EOT, "\n%\n"]
# Fragments that make separator-like runs: halves of separators, separators themselves, runs
# that overlap them, whitespace and non-ASCII text.
FRAGMENTS = [
    "a",
    "aa",
    "%",
    "\n",
    " ",
    "\t",
    "<|",
    "|>",
    "endoftext",
    "<|endoftext",
    "é",
    "東京",
    "word",
    "the cat",
    "x",
    "\n%",
    "%\n",
    "%%%",
    "aaaaa",
    "\n\n\n",
    "\n%\n%\n",
    EOT + EOT,
]

documents_st = st.lists(
    st.one_of(
        st.just(""),
        st.sampled_from([" ", "\n", " \n\t ", "\n\n\n"]),  # whitespace only
        st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=40).map("".join),
    ),
    min_size=0,
    max_size=60,
)

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@contextlib.contextmanager
def knobs(scan_block: int | None = None):
    """All empty places remembered (not only the first few), and the scanner's block size as
    given, so that blocks end inside and around delimiters of a file of a few KB."""
    saved = corpus.EMPTY_EXAMPLES, units_module.SCAN_BLOCK
    corpus.EMPTY_EXAMPLES = 10**9
    if scan_block is not None:
        units_module.SCAN_BLOCK = scan_block
    try:
        yield
    finally:
        corpus.EMPTY_EXAMPLES, units_module.SCAN_BLOCK = saved


def source_of(path, kind: str) -> Source:
    return Source(path, kind, False, path.stat().st_size)


def read_documents(reader: SourceReader) -> list[str]:
    docs, open_doc = [], []
    for piece in reader:
        open_doc.append(piece.text)
        if piece.doc_end:
            docs.append("".join(open_doc))
            open_doc = []
    assert open_doc == [], "a document without its last piece"
    return docs


def whole_and_spans(source: Source, options: ReadOptions, unit_bytes: int):
    """(what one reader over the whole file saw, what the readers of the units saw together)."""
    whole = SourceReader(source, options)
    whole_docs = read_documents(whole)
    units = plan_units([source], options, unit_bytes)
    docs, records = [], []
    empty = documents = 0
    manual_places = []
    separators = lines = 0
    for unit in units:
        reader = SourceReader(source, options, span=unit.span)
        docs += read_documents(reader)
        documents += reader.documents
        empty += reader.empty
        assert reader.sha256() == sha256_range(source.path, unit.span.hash_start, unit.span.hash_end)
        records.append(
            {"unit": unit.index, "empty_at": reader.empty_at, "separators": reader.separators, "lines": reader.lines}
        )
        # Numbered from the file's start by hand as well: the parts and lines of the units before.
        for kind, n in reader.empty_at:
            manual_places.append((kind, n + {"part": separators, "line": lines}.get(kind, 0)))
        separators += reader.separators
        lines += reader.lines
    places = empty_places(records, units, [source], 10**9)
    seen = {
        "docs": docs,
        "documents": documents,
        "empty": empty,
        "places": places,
        "manual": manual_places,
    }
    expected = {
        "docs": whole_docs,
        "documents": whole.documents,
        "empty": whole.empty,
        "places": whole.empty_places,
        "manual": whole.empty_at,
    }
    assert whole.documents == len(whole_docs)
    return expected, seen, units


def sha256_range(path, start: int, end: int) -> str:
    return hashlib.sha256(path.read_bytes()[start:end]).hexdigest()


def check_tiling(source: Source, units: list[Unit], delimiter: bytes | None) -> None:
    data = source.path.read_bytes()
    spans = [u.span for u in units]
    assert [u.index for u in units] == list(range(len(units)))
    assert spans[0].hash_start == 0 and spans[-1].hash_end == len(data)
    assert all(a.hash_end == b.hash_start for a, b in zip(spans, spans[1:]))
    if not data:
        assert spans == [Span(0, 0, 0, 0)]
        return
    if delimiter is None:
        return
    n = len(delimiter)
    for span in spans:
        assert (span.start, span.end) == (span.hash_start, span.hash_end)
        assert span.end > span.start
        if span.start > 0:
            at = span.start - n
            assert data[at : span.start] == delimiter
            # No occurrence overlaps it from before: the whole-file reader splits here too.
            assert not any(data.startswith(delimiter, j) for j in range(max(0, at - n + 1), at))


# ---------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(
    docs=documents_st,
    separator=st.sampled_from(SEPARATORS),
    lead=st.sampled_from(["", "\n", "  "]),
    trail=st.booleans(),
    unit_bytes=st.integers(64, 5000),
    scan_block=st.sampled_from([1, 5, 64, 1 << 16]),
    piece_chars=st.sampled_from([16, 100, 1 << 20]),
)
def test_text_spans_read_as_the_whole_file(tmp_path, docs, separator, lead, trail, unit_bytes, scan_block, piece_chars):
    text = lead + separator.join(docs) + (separator if trail else "")
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    source = source_of(path, "text")
    options = ReadOptions(separator=separator, piece_chars=piece_chars)
    with knobs(scan_block):
        expected, seen, units = whole_and_spans(source, options, unit_bytes)
    assert seen == expected
    check_tiling(source, units, separator.encode("utf-8"))


@pytest.mark.parametrize("separator", SEPARATORS)
def test_text_spans_cut_a_long_file_of_separator_runs(tmp_path, separator):
    """Hundreds of KB of documents between runs of separators and their overlaps, cut with the
    real scanner block (64 KB) into many units: the same documents as the whole file."""
    rng = random.Random(separator)
    chunks, size = [], 0
    while size < 400_000:
        chunks.append(rng.choice(FRAGMENTS * 3 + [separator, separator * 3, "a" * rng.randint(1, 9), " \n "]))
        size += len(chunks[-1])
    path = tmp_path / "long.txt"
    path.write_bytes("".join(chunks).encode("utf-8"))
    source = source_of(path, "text")
    options = ReadOptions(separator=separator)
    with knobs():
        expected, seen, units = whole_and_spans(source, options, 20_000)
    assert len(units) >= 10
    assert seen == expected and seen["documents"] > 100
    check_tiling(source, units, separator.encode("utf-8"))


def test_files_that_cannot_be_cut_are_one_unit(tmp_path):
    big = ("word " * 2000 + EOT) * 5
    (tmp_path / "a.txt").write_text(big)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(big.encode()))
    (tmp_path / "c.txt").write_text("x" * 20_000)  # no separator in it
    sources = [source_of(tmp_path / "a.txt", "text"), Source(tmp_path / "b.txt.gz", "text", True, 0)]
    sources[1] = Source(sources[1].path, "text", True, sources[1].path.stat().st_size)
    plain = plan_units(sources, ReadOptions(), 1000)
    assert [u.source for u in plain].count(0) == 5 and [u.source for u in plain].count(1) == 1
    assert plain[-1].span == Span(0, sources[1].size, 0, sources[1].size)
    no_sep = plan_units(sources[:1], ReadOptions(separator=None), 1000)
    assert [u.span for u in no_sep] == [Span(0, sources[0].size, 0, sources[0].size)]
    lone = source_of(tmp_path / "c.txt", "text")
    assert [u.span for u in plan_units([lone], ReadOptions(), 1000)] == [Span(0, 20_000, 0, 20_000)]


# ---------------------------------------------------------------------------------------------
# jsonl files
# ---------------------------------------------------------------------------------------------

record_st = st.one_of(
    st.just(None),  # a blank line
    st.sampled_from(["", "   "]).map(lambda blank: ("blank", blank)),
    st.one_of(st.just(""), st.none(), documents_st.map(lambda d: "%%".join(d))).map(lambda t: ("text", t)),
)


@PROPERTY
@given(
    records=st.lists(record_st, max_size=80),
    ascii_only=st.booleans(),
    final_newline=st.booleans(),
    unit_bytes=st.integers(64, 5000),
    scan_block=st.sampled_from([1, 7, 1 << 16]),
)
def test_jsonl_spans_read_as_the_whole_file(tmp_path, records, ascii_only, final_newline, unit_bytes, scan_block):
    lines = []
    for record in records:
        if record is None:
            lines.append("")
        elif record[0] == "blank":
            lines.append(record[1])
        else:
            lines.append(json.dumps({"id": len(lines), "text": record[1]}, ensure_ascii=ascii_only))
    body = "\n".join(lines) + ("\n" if final_newline and lines else "")
    path = tmp_path / "c.jsonl"
    path.write_bytes(body.encode("utf-8"))
    source = source_of(path, "jsonl")
    with knobs(scan_block):
        expected, seen, units = whole_and_spans(source, ReadOptions(), unit_bytes)
    assert seen == expected
    texts = [r[1] for r in records if r is not None and r[0] == "text"]
    assert seen["documents"] + seen["empty"] == len(texts)
    assert seen["docs"] == [t for t in texts if t]
    check_tiling(source, units, b"\n")


# ---------------------------------------------------------------------------------------------
# parquet files
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.one_of(st.none(), st.just(""), documents_st.map(" ".join)), min_size=1, max_size=120),
    row_group_size=st.integers(1, 12),
    unit_bytes=st.integers(64, 2000),
)
def test_parquet_spans_read_as_the_whole_file(tmp_path, texts, row_group_size, unit_bytes):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, row_group_size=row_group_size)
    source = source_of(path, "parquet")
    with knobs():
        expected, seen, units = whole_and_spans(source, ReadOptions(), unit_bytes)
    assert seen == expected
    assert seen["docs"] == [t for t in texts if t]
    assert seen["places"] == [f"{path}: row {i}" for i, t in enumerate(texts) if not t]
    check_tiling(source, units, None)
    # Row groups: contiguous from the first to the last, each unit's row_base its rows before.
    meta = pq.ParquetFile(path).metadata
    spans = [u.span for u in units]
    assert spans[0].start == 0 and spans[-1].end == meta.num_row_groups
    assert all(a.end == b.start and a.start < a.end for a, b in zip(spans, spans[1:]))
    for span in spans:
        assert span.row_base == sum(meta.row_group(g).num_rows for g in range(span.start))


def test_a_parquet_file_of_many_row_groups_makes_many_units(tmp_path):
    texts = [f"row {i} " + "word " * (i % 50) for i in range(3000)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    source = source_of(path, "parquet")
    units = plan_units([source], ReadOptions(), 2000)
    assert len(units) >= 5
    with knobs():
        expected, seen, _ = whole_and_spans(source, ReadOptions(), 2000)
    assert seen == expected and seen["docs"] == texts
    assert [u.span for u in plan_units([source], ReadOptions(), 10**9)] == [Span(0, 60, 0, source.size)]


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.integers(0, 1000), max_size=60), shards=st.integers(1, 8))
def test_shards_are_contiguous_runs_that_hold_every_unit_once(weights, shards):
    units, at = [], 0
    for i, w in enumerate(weights):
        units.append(Unit(i, 0, Span(at, at + w, at, at + w)))
        at += w
    dealt = [shard_units(units, i, shards) for i in range(shards)]
    assert [u for run in dealt for u in run] == units  # in order, each exactly once
    total = sum(weights)
    largest = max(weights, default=0)
    for run in dealt:
        indices = [u.index for u in run]
        assert indices == list(range(indices[0], indices[0] + len(run)) if run else [])  # contiguous
        assert sum(u.weight for u in run) <= total / shards + largest
    # The same units dealt again give the same shards (nothing depends on the call).
    assert [shard_units(units, i, shards) for i in range(shards)] == dealt


def test_one_shard_is_all_units_and_a_unit_goes_where_its_middle_falls():
    units = [Unit(i, 0, Span(100 * i, 100 * i + 100, 100 * i, 100 * i + 100)) for i in range(10)]
    assert shard_units(units, 0, 1) == units
    assert [[u.index for u in shard_units(units, i, 4)] for i in range(4)] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
