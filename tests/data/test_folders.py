"""`lmtools prepare FOLDER` on folders shaped like the ones an operating system ships: a fortune
database (extensionless text with `%` lines between entries, binary `.dat` indexes, `.u8`
symlinks), documentation in .txt/.md/.rst/.html, German and Chinese text, byte-identical copies.

What is read (text by content), what is skipped and counted (and why), separator lines,
exact-duplicate documents, and checkpoints or token files named by mistake."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtools.data import dedup
from lmtools.data.corpus import ReadOptions, SourceReader, resolve_corpus, resolve_sources
from lmtools.data.prepare import merge_shards, prepare_corpus, read_meta
from lmtools.errors import DataError
from texts import prose

GERMAN = "Über allen Gipfeln ist Ruh, in allen Wipfeln spürest du kaum einen Hauch; die Vögelein schweigen im Walde."
CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"


def entries(n: int, seed: int, lang: str = "en") -> list[str]:
    """Fortune entries: a few lines each, some with an attribution, the last line ending in a newline."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if lang == "de":
            body = f"{GERMAN[: 20 + (i * 7) % 80]} ({i})"
        elif lang == "zh":
            body = f"{CHINESE[(i * 3) % 20 : (i * 3) % 20 + 12 + i % 17]}（{i}）"
        else:
            body = prose(int(rng.integers(40, 300)), seed=seed * 1000 + i).strip()
        if i % 3 == 0:
            body += "\n\t\t-- Anonymous"
        out.append(body + "\n")
    return out


def write_fortunes(path: Path, items: list[str], leading: bool = False) -> None:
    """A fortune file: entries with a line holding `%` after each (and one before the first when
    `leading`), plus its strfile index (binary) and a `.u8` link to it, as the package installs them."""
    text = ("%\n" if leading else "") + "".join(item + "%\n" for item in items)
    path.write_text(text, encoding="utf-8")
    offsets = np.cumsum([0] + [len((item + "%\n").encode()) for item in items])
    header = struct.pack(">IIIIIcxxx", 2, len(items), 400, 20, 0, b"%")
    path.with_name(path.name + ".dat").write_bytes(header + b"".join(struct.pack(">I", o) for o in offsets))
    os.symlink(path.name, path.with_name(path.name + ".u8"))


@pytest.fixture
def system_folder(tmp_path):
    """A folder of fortunes and documentation; returns (folder, the documents it holds, in order)."""
    root = tmp_path / "share"
    fortunes = root / "fortunes"
    fortunes.mkdir(parents=True)
    art, cookie = entries(120, 1), entries(80, 2)
    german, chinese = entries(40, 3, "de"), entries(40, 4, "zh")
    write_fortunes(fortunes / "art", art, leading=True)
    write_fortunes(fortunes / "cookie", cookie + art[:25])  # 25 entries again, word for word
    write_fortunes(fortunes / "de", german)
    write_fortunes(fortunes / "zh", chinese)
    (fortunes / "zz-copy").write_bytes((fortunes / "zh").read_bytes())  # a byte-identical file
    docs = root / "doc"
    docs.mkdir()
    (docs / "guide.md").write_text("# Guide\n\nRead *this* first.\n", encoding="utf-8")
    (docs / "index.html").write_text("<html><body><p>Hello, world.</p></body></html>\n", encoding="utf-8")
    (docs / "intro.rst").write_text("Intro\n=====\n\nAn introduction.\n", encoding="utf-8")
    (docs / "notes.txt").write_text("Plain notes.\n", encoding="utf-8")
    (docs / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (docs / "latin1.txt").write_bytes("Gr\xfc\xdfe aus K\xf6ln\n".encode("latin-1"))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.txt").write_text("hidden\n")
    # Sorted by path below the folder: doc/..., then fortunes/art, cookie, de, zh, zz-copy.
    documents = [
        "# Guide\n\nRead *this* first.\n",
        "<html><body><p>Hello, world.</p></body></html>\n",
        "Intro\n=====\n\nAn introduction.\n",
        "Plain notes.\n",
        *art,
        *cookie,
        *art[:25],
        *german,
        *chinese,
        *chinese,
    ]
    return root, documents


def dataset_docs(out: Path) -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer

    meta = read_meta(out)
    tok = Tokenizer.from_file(str(out / meta["tokenizer"]))
    split = []
    for name in ("train.npy", "val.npy"):
        ids = np.load(out / name)
        ends = np.flatnonzero(ids == meta["eot_id"])
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(int)
        split.append([tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends)])
    return split[0], split[1]


def test_a_system_folder_reads_its_text_and_counts_what_it_skips(system_folder, tmp_path, run_cli):
    root, documents = system_folder
    out = tmp_path / "out"
    result = run_cli(
        "prepare", root, "--out", out, "--separator_line", "%", "--vocab_size", "400", "--val_fraction", "0.1"
    )
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    unique = list(dict.fromkeys(documents))
    assert len(documents) - len(unique) == 25 + 40
    train, val = dataset_docs(out)
    # Every entry once, `%` lines in none, and no text in both train and val.
    assert sorted(train + val) == sorted(unique)
    assert not any(d.startswith("%") or "\n%\n" in d for d in train + val)
    assert not set(train) & set(val) and len(val) > 5
    assert meta["duplicate_documents"] == 65
    assert meta["separator_line"] == "%" and meta["separator"] is None
    fortunes = root / "fortunes"
    assert meta["skipped_files"] == {
        "hidden": {"count": 1, "first": [str(root / ".cache")]},
        "binary": {
            "count": 5,
            "first": [str(root / "doc" / "logo.png")]
            + [str(fortunes / f"{n}.dat") for n in ("art", "cookie", "de", "zh")],
        },
        "not_utf8": {"count": 1, "first": [str(root / "doc" / "latin1.txt")]},
        "same_file": {"count": 4, "first": [str(fortunes / f"{n}.u8") for n in ("art", "cookie", "de", "zh")]},
    }
    summary = result.stdout.splitlines()[-1]
    assert "65 documents repeating an earlier one removed" in summary
    assert (
        "11 files skipped: 5 binary, 1 not UTF-8, 4 links to (or repeats of) a file already read, 1 hidden" in summary
    )


def test_include_and_exclude_choose_files_by_name_or_path(system_folder, tmp_path):
    root, _ = system_folder
    corpus = resolve_corpus([root], include=["*.md", "*.rst", "fortunes/de"], exclude=["*.rst"])
    assert [s.path.relative_to(root).as_posix() for s in corpus.sources] == ["doc/guide.md", "fortunes/de"]
    assert corpus.skipped["excluded"]["count"] == 17  # the 19 files but those two (the hidden folder aside)
    assert "hidden" in corpus.skipped
    # A pattern that leaves nothing is one error that says why.
    with pytest.raises(DataError, match=r"share: the folder holds no file to read \(20 files skipped: 19 excluded by"):
        prepare_corpus([root], tmp_path / "out", include=["*.pdf"])


def test_keep_duplicates_keeps_every_entry(system_folder, tmp_path):
    root, documents = system_folder
    meta = prepare_corpus(
        [root / "fortunes"], tmp_path / "out", separator_line="%", tokenizer="bytes", keep_duplicates=True
    )
    train, val = dataset_docs(tmp_path / "out")
    assert sorted(train + val) == sorted(documents[4:])
    assert meta["duplicate_documents"] == 0 and meta["keep_duplicates"] is True


def test_duplicates_across_parts_and_shards_are_found_as_in_one_process(system_folder, tmp_path, monkeypatch):
    root, documents = system_folder
    tok = tmp_path / "tok"
    prepare_corpus([root], tok, separator_line="%", vocab_size=300)
    one = prepare_corpus(
        [root], tmp_path / "one", separator_line="%", tokenizer=tok / "tokenizer.json", unit_bytes=1000, threads=2
    )
    assert one["duplicate_documents"] == 65
    for i in range(3):
        prepare_corpus(
            [root],
            tmp_path / f"s{i}",
            separator_line="%",
            tokenizer=tok / "tokenizer.json",
            unit_bytes=1000,
            shard=(i, 3),
            threads=1,
        )
    # Hash buckets of a few documents each: the passes that keep memory bounded find the same.
    monkeypatch.setattr(dedup, "BUCKET_DOCS", 16)
    merged = merge_shards([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    assert merged["duplicate_documents"] == 65
    for name in ("train.npy", "val.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes()


@settings(max_examples=60, deadline=None)
@given(
    hashes=st.lists(st.integers(0, 6), min_size=0, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=4),
    bucket=st.integers(1, 8),
)
def test_duplicate_documents_are_every_repeat_after_the_first(hashes, cuts, bucket):
    bounds = sorted({0, len(hashes), *[min(c, len(hashes)) for c in cuts]})
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        table = np.zeros((b - a, 3), dtype=np.uint64)
        table[:, 0] = [h * 0x9E3779B97F4A7C15 % 2**64 for h in hashes[a:b]]  # spread over buckets
        table[:, 1] = [h % 2 for h in hashes[a:b]]
        parts.append(table)
    old = dedup.BUCKET_DOCS
    dedup.BUCKET_DOCS = bucket
    try:
        found = dedup.duplicate_documents([lambda t=t: t for t in parts], [len(t) for t in parts])
    finally:
        dedup.BUCKET_DOCS = old
    seen, expected = set(), []
    for h in hashes:
        expected.append(h in seen)
        seen.add(h)
    got = np.zeros(len(hashes), dtype=bool)
    for (a, _), dup in zip(zip(bounds, bounds[1:]), found):
        got[a + dup] = True
        assert list(dup) == sorted(dup)
    assert got.tolist() == expected


# ---------------------------------------------------------------------------------------------
# Separator lines
# ---------------------------------------------------------------------------------------------

entry_text = st.text(st.sampled_from(list("ab %\r\n\t") + ["é", "中", "😀"]), min_size=0, max_size=30)


def read_documents(path: Path, options: ReadOptions, unit_bytes: int | None = None) -> tuple[list[str], int]:
    from lmtools.data.units import plan_units

    source = resolve_sources([path])[0]
    spans = [None] if unit_bytes is None else [u.span for u in plan_units([source], options, unit_bytes)]
    docs, empty, current = [], 0, ""
    for span in spans:
        reader = SourceReader(source, options, span=span)
        for piece in reader:
            current += piece.text
            if piece.doc_end:
                docs.append(current)
                current = ""
        empty += reader.empty
    return docs, empty


def split_at_lines(text: str, line: str) -> list[str]:
    """What a separator line means, written the plain way: the text cut into lines at "\\n", each
    compared with `line` (a trailing "\\r" aside); the documents are the runs of other lines
    that hold more than whitespace."""
    docs, current = [], ""
    for raw in re.split(r"(?<=\n)", text):
        if raw.removesuffix("\n").removesuffix("\r") == line:
            docs.append(current)
            current = ""
        else:
            current += raw
    docs.append(current)
    return [d for d in docs if d.strip()]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(entry_text, min_size=1, max_size=8),
    leading=st.booleans(),
    trailing=st.sampled_from(["%\n", "%", "%\r\n", ""]),
    crlf=st.booleans(),
    block=st.sampled_from([1, 2, 3, 7, 1 << 20]),
    piece=st.sampled_from([4, 9, 1 << 20]),
    unit=st.sampled_from([None, 8, 20]),
)
def test_a_separator_line_splits_wherever_it_stands(
    tmp_path_factory, monkeypatch, items, leading, trailing, crlf, block, piece, unit
):
    from lmtools.data import corpus

    nl = "\r\n" if crlf else "\n"
    lines = [item if item.endswith("\n") or not item else item + nl for item in items]
    text = ("%" + nl if leading else "") + ("%" + nl).join(lines) + trailing
    path = tmp_path_factory.mktemp("sep") / "f"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(corpus, "READ_BLOCK", block)
    options = ReadOptions(separator=None, separator_line="%", piece_chars=piece)
    docs, _ = read_documents(path, options, unit)
    assert docs == split_at_lines(text, "%")


def test_a_literal_separator_leaves_the_percent_lines_the_issue_saw(tmp_path):
    path = tmp_path / "f"
    path.write_text("%\nfirst\n%\nsecond\n%\n", encoding="utf-8")
    literal, _ = read_documents(path, ReadOptions(separator="\n%\n"))
    assert literal[0] == "%\nfirst"  # the file's first line is no separator to a literal "\n%\n"
    by_line, _ = read_documents(path, ReadOptions(separator=None, separator_line="%"))
    assert by_line == ["first\n", "second\n"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--separator_line", ""], "--separator_line '' must be one non-empty line of text"),
        (["--separator_line", "a\\nb"], None),  # a backslash-n is two characters: a line
        (["--separator_line", "%", "--separator", "x"], "give --separator or --separator_line, not both"),
    ],
)
def test_separator_line_options(tmp_path, run_cli, args, message):
    (tmp_path / "f").write_text("one\n%\ntwo\n", encoding="utf-8")
    result = run_cli("prepare", tmp_path / "f", "--out", tmp_path / "out", "--tokenizer", "bytes", "--quiet", *args)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output


# ---------------------------------------------------------------------------------------------
# Files named by mistake; the tail split
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_or_token_file_named_alone_is_named_before_any_work(tmp_path, run_cli):
    import torch

    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "iteration": 3}, tmp_path / "checkpoint.pt")
    np.save(tmp_path / "train.npy", np.arange(10, dtype=np.uint16))
    for name, what in (
        (
            "checkpoint.pt",
            "binary (a PyTorch checkpoint; start a run from its weights with `lmtools train --init_from`)",
        ),
        (
            "train.npy",
            "binary (a NumPy file (token files are read by `lmtools train --train_data`, not prepared again))",
        ),
    ):
        result = run_cli("prepare", tmp_path / name, "--out", tmp_path / "out")
        assert result.exit_code == 2
        assert result.output.strip() == (f"error: {tmp_path / name}: {what}, not a text, .jsonl or .parquet file")
        assert "tokenizer" not in result.output and not (tmp_path / "out").exists()


def test_a_tail_split_says_what_it_is(tmp_path, run_cli):
    (tmp_path / "one.txt").write_text(prose(60_000, seed=5), encoding="utf-8")  # one document
    result = run_cli("prepare", tmp_path / "one.txt", "--out", tmp_path / "out", "--tokenizer", "bytes", "--quiet")
    assert result.exit_code == 0, result.output
    assert read_meta(tmp_path / "out")["split"]["method"] == "spans"
    assert "note: val.npy is the tail of the corpus, not a seeded choice of documents" in result.stderr
    assert "the end of the last file in path order" in result.stderr


def test_meta_json_records_how_text_was_read(system_folder, tmp_path):
    root, _ = system_folder
    prepare_corpus([root / "doc"], tmp_path / "out", tokenizer="bytes")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert ReadOptions.from_record(meta) == ReadOptions()
    assert {k: meta[k] for k in ReadOptions.RECORD_KEYS} == ReadOptions().to_record()
