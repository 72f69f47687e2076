"""`prepare` on corpora shaped like real ones: one multi-megabyte text file, documents joined by
<|endoftext|>, a few huge documents, many small ones, folders with empty files, jsonl with
nulls. What the validation split holds, where documents start and end, and whether the
tokenizer.json written beside the data encodes every string as the token files do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

import lmtools.data.corpus as corpus
from lmtools.data.prepare import MIN_VAL_TOKENS, SHARE_TOLERANCE, SPAN_SNAP, doc_hashes, prepare_corpus
from lmtools.data.tokenizer import train_bpe
from lmtools.errors import DataError
from lmtools.layout import EOT
from texts import documents, eot_joined, prose, write_jsonl


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A 1000-id BPE trained once on the same kind of text (training on megabytes is slow)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(iter([[prose(300_000, seed=99)]]), 1000).save(str(path))
    return str(path)


def load(out):
    meta = json.loads((out / "meta.json").read_text())
    return meta, np.load(out / "train.npy"), np.load(out / "val.npy")


def split_docs(ids: np.ndarray, eot_id: int) -> list[np.ndarray]:
    bounds = np.flatnonzero(ids == eot_id)
    return np.split(ids, bounds + 1)[:-1] if len(bounds) else []


# ---------------------------------------------------------------------------------------------
# The validation split
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.01])
def test_one_multimegabyte_text_file_gets_the_share_asked_for(tmp_path, tokenizer_json, fraction):
    text = prose(3_000_000, seed=1)
    (tmp_path / "plays.txt").write_text(text, encoding="utf-8")
    meta = prepare_corpus([tmp_path / "plays.txt"], tmp_path / "out", tokenizer=tokenizer_json, val_fraction=fraction)
    meta, train, val = load(tmp_path / "out")
    split = meta["split"]
    assert split["method"] == "spans" and split["where"] == "tail"
    assert split["val_fraction_requested"] == fraction
    given = len(val) / (len(train) + len(val))
    assert abs(given - fraction) <= SPAN_SNAP * fraction + 1e-6
    assert split["val_fraction_given"] == pytest.approx(given, abs=1e-6)
    # The cut is at a line end, and the two splits together are the file, token for token.
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert split["cut_at"] == "line" and split["val_start"] == len(train)
    head = tok.decode(train.tolist(), skip_special_tokens=False)
    assert head.endswith("\n") and (head + tok.decode(val.tolist(), skip_special_tokens=False) == text + EOT)
    # The document ends in val, where it counts; train holds its start.
    assert meta["documents"] == 1 and (meta["train_documents"], meta["val_documents"]) == (0, 1)
    assert split["cuts_a_document"] is True


@pytest.mark.parametrize(
    "sizes, fraction",
    [
        ([1_000_000, 500_000, 200_000], 0.05),  # a few huge documents
        ([40_000] * 42, 0.01),  # each document is 2.4% of the corpus: none makes up 1%
    ],
)
def test_documents_too_big_for_the_share_give_a_tail_span(tmp_path, tokenizer_json, sizes, fraction):
    docs = documents(sizes, seed=3)
    (tmp_path / "c.txt").write_text(eot_joined(docs), encoding="utf-8")
    prepare_corpus([tmp_path / "c.txt"], tmp_path / "out", tokenizer=tokenizer_json, val_fraction=fraction)
    meta, train, val = load(tmp_path / "out")
    assert meta["split"]["method"] == "spans" and meta["documents"] == len(docs)
    given = len(val) / (len(train) + len(val))
    assert abs(given - fraction) <= SPAN_SNAP * fraction + 1e-6
    # Token for token, the stream is the documents, each followed by the end-of-text id.
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    stream = np.concatenate([train, val])
    # Each document after the first starts with the newline that followed the separator.
    expected = docs[:1] + ["\n" + d for d in docs[1:]]
    assert [tok.decode(d[:-1].tolist()) for d in split_docs(stream, meta["eot_id"])] == expected
    assert meta["val_documents"] == int((val == meta["eot_id"]).sum())
    assert meta["train_documents"] == int((train == meta["eot_id"]).sum())
    assert meta["split"]["cuts_a_document"] == (train[-1] != meta["eot_id"])


def test_many_documents_split_by_whole_documents_close_to_the_share(tmp_path, tokenizer_json):
    rng = np.random.default_rng(5)
    docs = documents([int(x) for x in rng.integers(200, 4000, 1500)], seed=11)
    (tmp_path / "stories.txt").write_text(eot_joined(docs), encoding="utf-8")
    prepare_corpus([tmp_path / "stories.txt"], tmp_path / "out", tokenizer=tokenizer_json, val_fraction=0.02, seed=4)
    meta, train, val = load(tmp_path / "out")
    split = meta["split"]
    assert split["method"] == "documents"
    given = len(val) / (len(train) + len(val))
    assert abs(given - 0.02) <= SHARE_TOLERANCE * 0.02
    # Whole documents, chosen by the seeded hash: the val documents are exactly those below it.
    picked = doc_hashes(4, 0, len(docs)) <= np.uint64(split["max_hash"])
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    decoded = [tok.decode(d[:-1].tolist()) for d in split_docs(val, meta["eot_id"])]
    expected = docs[:1] + ["\n" + d for d in docs[1:]]  # the newline after each separator
    assert decoded == [d for d, p in zip(expected, picked) if p]
    assert meta["val_documents"] == picked.sum() and meta["train_documents"] == (~picked).sum()
    # Another seed picks other documents.
    prepare_corpus([tmp_path / "stories.txt"], tmp_path / "other", tokenizer=tokenizer_json, val_fraction=0.02, seed=5)
    assert not np.array_equal(load(tmp_path / "other")[2], val)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=60),
    fraction=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.3, 0.7]),
    seed=st.integers(0, 5),
)
def test_the_share_given_is_the_share_asked_for(tmp_path_factory, sizes, fraction, seed):
    """Whatever the documents' sizes: the split is by documents within SHARE_TOLERANCE of the
    share, by the tail within SPAN_SNAP of it, or empty only for a corpus under two windows;
    and train followed by val is the corpus, token for token."""
    tmp = tmp_path_factory.mktemp("share")
    docs = [d for d in documents([max(n, 1) for n in sizes], seed=seed) if d.strip()]
    write_jsonl(tmp / "c.jsonl", docs)
    meta = prepare_corpus([tmp / "c.jsonl"], tmp / "out", tokenizer="bytes", val_fraction=fraction, seed=seed)
    _, train, val = load(tmp / "out")
    stream = np.concatenate([train, val])
    total = len(stream)
    target = max(fraction * total, MIN_VAL_TOKENS)
    method = meta["split"]["method"]
    in_order = np.concatenate([list(d.encode()) + [256] for d in docs]).astype(np.uint16)
    if fraction == 0 or total < 2 * MIN_VAL_TOKENS:
        assert method == "none" and len(val) == 0
        assert np.array_equal(stream, in_order)
    elif method == "documents":
        assert abs(len(val) - target) <= SHARE_TOLERANCE * target
        assert sorted(map(bytes, split_docs(stream, 256))) == sorted(map(bytes, split_docs(in_order, 256)))
    else:
        assert method == "spans" and abs(len(val) - round(target)) <= SPAN_SNAP * target + 1
        assert np.array_equal(stream, in_order)
    assert int((stream == 256).sum()) == len(docs) == meta["documents"]
    assert meta["train_documents"] + meta["val_documents"] == len(docs)


def test_a_corpus_too_small_for_a_window_gets_no_split_and_says_so(tmp_path, run_cli):
    (tmp_path / "tiny.txt").write_text("a few words only\n", encoding="utf-8")
    result = run_cli(
        "prepare",
        tmp_path / "tiny.txt",
        "--out",
        tmp_path / "out",
        "--tokenizer",
        "bytes",
        "--val_fraction",
        "0.1",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "val.npy is empty" in notes[0], result.output
    assert f"{MIN_VAL_TOKENS}-token validation window" in notes[0]
    meta, train, val = load(tmp_path / "out")
    assert meta["split"]["method"] == "none" and len(val) == 0 and len(train) == 18


def test_a_small_share_still_gets_one_window(tmp_path, run_cli):
    """1% of 2,000 tokens is 20: too short to evaluate on, so val takes one window."""
    (tmp_path / "small.txt").write_text(prose(2_000, seed=2), encoding="utf-8")
    result = run_cli("prepare", tmp_path / "small.txt", "--out", tmp_path / "out", "--tokenizer", "bytes", "--quiet")
    assert result.exit_code == 0, result.output
    meta, train, val = load(tmp_path / "out")
    assert meta["split"]["method"] == "spans"
    assert MIN_VAL_TOKENS * (1 - SPAN_SNAP) <= len(val) <= MIN_VAL_TOKENS * (1 + SPAN_SNAP)
    given = 100 * len(val) / (len(train) + len(val))
    assert f"val {given:.2f}% of tokens by the tail" in result.output  # what was given


# ---------------------------------------------------------------------------------------------
# <|endoftext|> and other separators
# ---------------------------------------------------------------------------------------------


def test_endoftext_separates_documents_and_the_tokenizer_agrees(tmp_path, tokenizer_json):
    docs = documents([3000, 10, 5000, 700], seed=21) + ["tail words"]
    text = EOT.join(docs) + EOT  # no newline after the separator: the stream is the file
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    meta = prepare_corpus([tmp_path / "c.txt"], tmp_path / "out", tokenizer=tokenizer_json, val_fraction=0.0)
    _, stream, _ = load(tmp_path / "out")
    assert meta["documents"] == len(docs) and meta["separator"] == EOT
    written = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    eot = meta["eot_id"]
    assert written.token_to_id(EOT) == eot
    # One way: what the tokenizer makes of each document is what prepare wrote for it, and of
    # the whole file (separators included) the whole token file.
    for ids, doc in zip(split_docs(stream, eot), docs, strict=True):
        assert ids[-1] == eot and written.encode(doc).ids == ids[:-1].tolist()
    assert written.encode(text).ids == stream.tolist()
    # The other way: decoding the token file gives the file back, separators spelled out.
    assert written.decode(stream.tolist(), skip_special_tokens=False) == text
    assert int((stream == eot).sum()) == len(docs)


def test_separator_none_and_other_separators_keep_the_literal_as_text(tmp_path, run_cli):
    text = f"one{EOT}two\n\nthree"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    bytes_of = list(text.encode())
    for sep, docs in (("none", [text]), ("\\n\\n", [f"one{EOT}two", "three"])):
        out = tmp_path / f"out-{len(docs)}"
        result = run_cli(
            "prepare",
            tmp_path / "c.txt",
            "--out",
            out,
            "--tokenizer",
            "bytes",
            "--separator",
            sep,
            "--val_fraction",
            "0",
            "--quiet",
        )
        assert result.exit_code == 0, result.output
        meta, train, _ = load(out)
        assert meta["separator"] == (None if sep == "none" else "\n\n")
        assert [bytes(d[:-1].astype(np.uint8)).decode() for d in split_docs(train, 256)] == docs
    assert train.tolist()[: len(f"one{EOT}two")] == bytes_of[: len(f"one{EOT}two")]


def test_jsonl_text_that_spells_the_separator_stays_text(tmp_path, tokenizer_json):
    """In jsonl and parquet a document is a record: text cannot smuggle in an end-of-text id.
    `tokenizers` encodes such text the same way with encode_special_tokens=True."""
    docs = [f"before {EOT} after", "plain"]
    write_jsonl(tmp_path / "c.jsonl", docs)
    meta = prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer=tokenizer_json, val_fraction=0.0)
    _, stream, _ = load(tmp_path / "out")
    written = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert int((stream == meta["eot_id"]).sum()) == 2
    written.encode_special_tokens = True
    assert [written.encode(d).ids for d in docs] == [d[:-1].tolist() for d in split_docs(stream, meta["eot_id"])]
    assert written.decode(stream.tolist(), skip_special_tokens=False) == EOT.join(docs) + EOT


def test_a_separator_across_read_blocks_is_found(tmp_path, tokenizer_json):
    """The reader streams a file in 1 MiB blocks: separators that straddle block boundaries
    (at every possible split of the 13 characters) still end documents."""
    block = corpus.READ_BLOCK
    filler = prose(5 * block, seed=8).encode("ascii", "replace").decode()  # 1 char = 1 byte
    parts, pos, docs = [], 0, []
    for k, split_at in enumerate([1, 5, 12, 7]):  # characters of EOT before the boundary
        end = (k + 1) * block - split_at
        docs.append(filler[pos:end])
        parts += [filler[pos:end], EOT]
        pos = end + len(EOT)
    docs.append(filler[pos : 5 * block])
    parts.append(docs[-1])
    text = "".join(parts)
    assert all(text[(k + 1) * block - s : (k + 1) * block - s + len(EOT)] == EOT for k, s in enumerate([1, 5, 12, 7]))
    (tmp_path / "big.txt").write_text(text, encoding="ascii")
    meta = prepare_corpus([tmp_path / "big.txt"], tmp_path / "out", tokenizer=tokenizer_json, val_fraction=0.0)
    _, stream, _ = load(tmp_path / "out")
    written = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    got = [written.decode(d[:-1].tolist()) for d in split_docs(stream, meta["eot_id"])]
    assert meta["documents"] == 5 and got == docs


# ---------------------------------------------------------------------------------------------
# Empty documents
# ---------------------------------------------------------------------------------------------


def test_empty_documents_are_skipped_and_counted(tmp_path, run_cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for name in ("pkg/__init__.txt", "pkg/empty.txt"):
        (src / name).write_text("")
    (src / "pkg" / "mod.txt").write_text("def f():\n    return 1\n")
    (src / "a.jsonl").write_text('{"text": "one"}\n{"text": null}\n{"text": ""}\n{"text": "four"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["r0", None, "", "r3"]}), src / "b.parquet")
    (src / "c.txt").write_text(f"x{EOT}\n{EOT}{EOT}y{EOT}\n")  # two empty parts between
    result = run_cli(
        "prepare", src, "--out", tmp_path / "out", "--tokenizer", "bytes", "--quiet", "--val_fraction", "0"
    )
    assert result.exit_code == 0, result.output
    meta, train, _ = load(tmp_path / "out")
    docs = [bytes(d[:-1].astype(np.uint8)).decode() for d in split_docs(train, 256)]
    assert docs == ["one", "four", "r0", "r3", "x", "y", "def f():\n    return 1\n"]
    assert meta["empty_documents"] == 8
    assert meta["empty_document_places"] == [
        f"{src / 'a.jsonl'}:2",
        f"{src / 'a.jsonl'}:3",
        f"{src / 'b.parquet'}: row 1",
        f"{src / 'b.parquet'}: row 2",
        f"{src / 'c.txt'}: part 2",
    ]
    summary = result.output.splitlines()[0]
    assert "8 documents empty, skipped (" in summary and f"{src / 'a.jsonl'}:2" in summary
    assert {s["path"]: s["empty_documents"] for s in meta["sources"]}[str(src / "pkg" / "empty.txt")] == 1


def test_a_corpus_without_text_is_one_line_exit_2(tmp_path, run_cli):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": null}\n{"text": ""}\n')
    (tmp_path / "d" / "c.txt").write_text(f"{EOT}\n{EOT}\n")  # one empty part between two
    result = run_cli("prepare", tmp_path / "d", "--out", tmp_path / "out", "--tokenizer", "bytes", "-q")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "holds no text: all 4 documents are empty" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_undecodable_bytes_name_the_file_and_offset(tmp_path):
    good = prose(1_500_000, seed=4).encode("ascii", "replace")
    bad_at = len(good)
    (tmp_path / "c.txt").write_bytes(good + b"\xff\xfe more text")
    with pytest.raises(DataError, match=r"c\.txt: not UTF-8 text .*offset (\d+)") as info:
        prepare_corpus([tmp_path / "c.txt"], tmp_path / "out", tokenizer="bytes")
    offset = int(info.value.args[0].split("offset ")[1].split(")")[0])
    assert bad_at - 3 <= offset <= bad_at
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def test_a_missing_input_is_reported_before_an_existing_out(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.txt").write_text("good text")
    assert run_cli("prepare", "good.txt", "--tokenizer", "bytes", "-q").exit_code == 0  # data/ exists now
    result = run_cli("prepare", "missing.txt", "-q")
    assert result.exit_code == 2
    assert "missing.txt: no such file" in result.output and "--force" not in result.output
    result = run_cli("prepare", "good.txt", "--tokenizer", "nope.json", "-q")
    assert result.exit_code == 2 and "nope.json" in result.output and "--force" not in result.output


def test_a_vocabulary_larger_than_the_corpus_allows_is_named(tmp_path, run_cli):
    (tmp_path / "c.txt").write_text(prose(20_000, seed=6), encoding="utf-8")
    result = run_cli("prepare", tmp_path / "c.txt", "--out", tmp_path / "out", "--vocab_size", "70000", "-q")
    assert result.exit_code == 0, result.output
    meta, _, _ = load(tmp_path / "out")
    assert 257 < meta["vocab_size"] < 70000 and meta["vocab_size_requested"] == 70000
    notes = [line for line in result.output.splitlines() if "ran out of merges" in line]
    assert len(notes) == 1 and f"{meta['vocab_size']:,} ids of the 70,000" in notes[0]
    assert meta["dtype"] == "uint16"
