"""`lmtools prepare`: inputs, tokenizers, output files, exactness, the val split, errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtools.data.corpus import ReadOptions, SourceReader, resolve_sources, safe_cut
from lmtools.data.prepare import NpyWriter, prepare_corpus, read_meta
from lmtools.data.tokenizer import EOT, Encoder, bytes_to_unicode, load_tokenizer, train_bpe
from lmtools.errors import ConfigError, DataError
from texts import prose

PROSE = (
    "The quick brown fox jumps over the lazy dog. It's a sentence we'll use, isn't it?\n"
    "Numbers 12345 and 3.14159; symbols #@!$%^&*() and   runs of   spaces.\n\n"
    "Ünïcödé téxt: naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語, 한국어, "
    "emoji 😀🎉 and combining e\u0301.\n\tTabs\tand\r\nCRLF line ends.\n"
)


def decode_docs(tok, ids: np.ndarray, eot_id: int) -> list[str]:
    """Split a token array on the end-of-text id and decode each document."""
    docs, start = [], 0
    ids = np.asarray(ids)
    for end in np.flatnonzero(ids == eot_id):
        docs.append(tok.decode(ids[start:end].tolist(), skip_special_tokens=False))
        start = end + 1
    assert start == len(ids), "token file does not end with the end-of-text id"
    return docs


def load_stream_docs(out: Path) -> tuple[dict, list[str]]:
    """The documents of train.npy followed by val.npy, decoded as one stream (a tail split
    cuts a document in two: the stream is whole again)."""
    from tokenizers import Tokenizer

    meta = read_meta(out)
    tok = Tokenizer.from_file(str(out / meta["tokenizer"]))
    ids = np.concatenate([np.load(out / "train.npy"), np.load(out / "val.npy")])
    return meta, decode_docs(tok, ids, meta["eot_id"])


def check_split(out: Path, docs: list[str], seed: int) -> dict:
    """Whatever the method meta.json names, train and val hold exactly `docs` as it says."""
    import lmtools.data.prepare as prepare

    meta = read_meta(out)
    split = meta["split"]
    if split["method"] == "documents":
        _, train, val = load_dataset_docs(out)
        picked = prepare.doc_hashes(seed, 0, len(docs)) <= np.uint64(split["max_hash"])
        assert train == [d for d, p in zip(docs, picked) if not p]
        assert val == [d for d, p in zip(docs, picked) if p]
    else:
        assert load_stream_docs(out)[1] == docs
        if split["method"] == "none":
            assert meta["val_tokens"] == 0
        else:
            assert split["val_start"] == meta["train_tokens"]
    total = meta["train_tokens"] + meta["val_tokens"]
    assert split["val_fraction_given"] == round(meta["val_tokens"] / total, 6)
    assert meta["documents"] == len(docs)
    return meta


def load_dataset_docs(out: Path) -> tuple[dict, list[str], list[str]]:
    from tokenizers import Tokenizer

    meta = read_meta(out)
    tok = Tokenizer.from_file(str(out / meta["tokenizer"]))
    train = np.load(out / "train.npy", mmap_mode="r")
    val = np.load(out / "val.npy", mmap_mode="r")
    return meta, decode_docs(tok, train, meta["eot_id"]), decode_docs(tok, val, meta["eot_id"])


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 1}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small BPE (vocab 400) trained once, saved as tokenizer.json."""
    tok = train_bpe(iter([[PROSE * 3, "def f(x):\n    return x + 1\n" * 5]]), 400)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def test_all_input_kinds_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("plain text file\n", encoding="utf-8")
    with gzip.open(corpus / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped text ✓")
    write_jsonl(corpus / "c.jsonl", ["jsonl one", "", "jsonl three"])  # "" is skipped
    with gzip.open(corpus / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz jsonl"}) + "\n\n")
    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(10)], "n": list(range(10))}),
        corpus / "e.parquet",
        row_group_size=3,
    )
    (corpus / "notes.md").write_text("markdown is text, recognised by its content")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))  # skipped
    (corpus / ".hidden.txt").write_text("hidden files are skipped")

    meta = prepare_corpus([corpus], tmp_path / "out", tokenizer="bytes", val_fraction=0.0)
    _, train, val = load_dataset_docs(tmp_path / "out")
    # Folder order is sorted by path: a.txt, c.jsonl, d.jsonl.gz, e.parquet, notes.md, sub/b.txt.gz.
    assert train == (
        ["plain text file\n", "jsonl one", "jsonl three", "gz jsonl"]
        + [f"row {i}" for i in range(10)]
        + ["markdown is text, recognised by its content", "gzipped text ✓"]
    )
    assert val == []
    assert meta["train_documents"] == 16
    assert meta["skipped_files"] == {
        "binary": {"count": 1, "first": [str(corpus / "image.png")]},
        "hidden": {"count": 1, "first": [str(corpus / ".hidden.txt")]},
    }
    assert meta["empty_documents"] == 1
    assert meta["empty_document_places"] == [f"{corpus / 'c.jsonl'}:2"]
    assert [Path(s["path"]).name for s in meta["sources"]] == [
        "a.txt",
        "c.jsonl",
        "d.jsonl.gz",
        "e.parquet",
        "notes.md",
        "b.txt.gz",
    ]
    import hashlib

    for s in meta["sources"]:
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
        assert s["size"] == Path(s["path"]).stat().st_size


def test_globs_fields_columns_and_separator(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "x1.jsonl", ["one", "two"], field="body")
    write_jsonl(tmp_path / "x2.jsonl", ["three"], field="body")
    pq.write_table(pa.table({"content": ["four"]}), tmp_path / "y.parquet")
    (tmp_path / "z.txt").write_text("five<SEP>six<SEP><SEP>seven<SEP>", encoding="utf-8")
    prepare_corpus(
        [str(tmp_path / "x*.jsonl"), tmp_path / "y.parquet", tmp_path / "z.txt"],
        tmp_path / "out",
        tokenizer="bytes",
        val_fraction=0.0,
        text_field="body",
        text_column="content",
        separator="<SEP>",
    )
    _, train, _ = load_dataset_docs(tmp_path / "out")
    assert train == ["one", "two", "three", "four", "five", "six", "seven"]


def test_long_documents_are_cut_only_where_tokens_do_not_change(trained):
    enc = Encoder(load_tokenizer(trained)[0], "tokenizer.json", threads=1)
    text = (PROSE + "  \n\n  x  \n") * 20
    whole = enc.encode_batch([text])[0]
    for limit in range(50, 400, 7):
        cut = safe_cut(text, limit)
        assert 0 < cut <= limit
        parts = enc.encode_batch([text[:cut], text[cut:]])
        assert np.array_equal(np.concatenate(parts), whole), limit


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300),
    sep=st.sampled_from([None, "\n\n", "<|endoftext|>", "é"]),
)
def test_reader_pieces_rebuild_documents(tmp_path_factory, text, sep):
    path = tmp_path_factory.mktemp("r") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    if not text:
        return
    options = ReadOptions(separator=sep, piece_chars=16)
    import lmtools.data.corpus as corpus

    old = corpus.READ_BLOCK
    corpus.READ_BLOCK = 7  # blocks that split characters and separators
    try:
        source = resolve_sources([path])[0]
        docs, current = [], []
        pieces = list(SourceReader(source, options))
    finally:
        corpus.READ_BLOCK = old
    for piece in pieces:
        current.append(piece.text)
        if piece.doc_end:
            docs.append("".join(current))
            current = []
    assert current == []
    # Parts holding only whitespace are the layout around separators, not documents.
    expected = [text] if sep is None else [d for d in text.split(sep) if d.strip()]
    assert docs == expected


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_gpt2_vocab_and_merges_files(tmp_path, trained):
    """A vocab.json + merges.txt pair with GPT-2's id layout (bytes in GPT-2's order)."""
    spec = json.loads(Path(trained).read_text())
    b2u = bytes_to_unicode()
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    vocab = {c: i for i, c in enumerate(b2u.values())}  # GPT-2 order, not byte order
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab[EOT] = len(vocab)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    for spec_ in (folder, folder / "vocab.json"):
        tok, kind = load_tokenizer(spec_)
        assert kind == "gpt2" and tok.token_to_id(EOT) == vocab[EOT]
        enc = Encoder(tok, kind)
        assert enc.engine == "tiktoken"
        assert np.array_equal(enc.encode_batch([PROSE])[0], enc.encode_reference([PROSE])[0])
    write_jsonl(tmp_path / "c.jsonl", [PROSE, EOT + " x", "é"])
    meta = prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer=str(folder), val_fraction=0.0)
    assert meta["tokenizer_kind"] == "gpt2" and meta["encoder"] == "tiktoken"
    _, train, _ = load_dataset_docs(tmp_path / "out")
    assert train == [PROSE, EOT + " x", "é"]


def test_tokenizer_json_with_a_normalizer_falls_back_to_tokenizers(tmp_path, trained):
    from tokenizers import normalizers

    tok, _ = load_tokenizer(trained)
    tok.normalizer = normalizers.Lowercase()
    path = tmp_path / "lower.json"
    tok.save(str(path))
    write_jsonl(tmp_path / "c.jsonl", ["Hello World", "ABC"])
    meta = prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer=str(path), val_fraction=0.0)
    assert meta["encoder"] == "tokenizers"
    _, train, _ = load_dataset_docs(tmp_path / "out")
    assert train == ["hello world", "abc"]


def test_bytes_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    meta = prepare_corpus([tmp_path / "a.txt"], tmp_path / "out", tokenizer="bytes")
    assert meta["vocab_size"] == 257 and meta["eot_id"] == 256
    assert meta["tokenizer_kind"] == "bytes" and meta["dtype"] == "uint16"
    ids = np.load(tmp_path / "out" / "train.npy")
    assert ids.tolist() == list("héllo".encode()) + [256]
    assert meta["bytes_per_token"] == 1.0


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------

documents = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
        st.sampled_from(["", EOT, f"x{EOT}y", "  \n", "émoji 😀", PROSE]),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    docs=documents,
    seed=st.integers(0, 3),
    tokenizer=st.sampled_from(["trained", "bytes"]),
    keep_duplicates=st.booleans(),
)
def test_round_trip_is_exact(tmp_path_factory, trained, docs, seed, tokenizer, keep_duplicates):
    tmp = tmp_path_factory.mktemp("rt")
    write_jsonl(tmp / "c.jsonl", docs)
    kept = [d for d in docs if d]  # empty documents are skipped
    tokenizer = str(trained) if tokenizer == "trained" else "bytes"
    if not kept:
        with pytest.raises(DataError, match="no text"):
            prepare_corpus([tmp / "c.jsonl"], tmp / "out", seed=seed, tokenizer=tokenizer)
        return
    # Without --keep_duplicates a document that repeats an earlier one exactly is left out.
    unique = kept if keep_duplicates else list(dict.fromkeys(kept))
    meta = prepare_corpus(
        [tmp / "c.jsonl"],
        tmp / "out",
        seed=seed,
        val_fraction=0.3,
        tokenizer=tokenizer,
        batch_chars=64,
        keep_duplicates=keep_duplicates,
    )
    check_split(tmp / "out", unique, seed)
    assert meta["empty_documents"] == len(docs) - len(kept)
    assert meta["duplicate_documents"] == len(kept) - len(unique)
    text_bytes = sum(len(d.encode()) for d in unique)
    assert meta["text_bytes"] == text_bytes


def test_trained_round_trip_with_long_documents(tmp_path):
    """The default path: train a BPE, documents longer than a piece, one doc per file."""
    docs = [PROSE * 30, "short", PROSE[::-1] * 7]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8", newline="")
    meta = prepare_corpus(
        [tmp_path / f"{i}.txt" for i in range(3)],
        tmp_path / "out",
        vocab_size=320,
        val_fraction=0.5,
        batch_chars=1000,
        piece_chars=500,
    )
    assert meta["tokenizer_kind"] == "bpe" and meta["vocab_size"] == 320
    check_split(tmp_path / "out", docs, 0)
    assert meta["train_tokens"] and meta["val_tokens"]


# ---------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------


def test_meta_and_files(tmp_path, trained):
    write_jsonl(tmp_path / "c.jsonl", [PROSE, "b", "c", "d"])
    meta = prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer=str(trained), seed=5)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.npy", "val.npy"]
    on_disk = json.loads((out / "meta.json").read_text())
    for key in (
        "vocab_size",
        "dtype",
        "train_tokens",
        "val_tokens",
        "train_documents",
        "val_documents",
        "eot_id",
        "tokenizer",
        "tokenizer_kind",
        "bytes_per_token",
        "min_token_id",
        "max_token_id",
        "sources",
        "seed",
        "val_fraction",
        "lmtools_version",
        "created",
    ):
        assert key in on_disk, key
    train = np.load(out / "train.npy", mmap_mode="r")
    val = np.load(out / "val.npy", mmap_mode="r")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    # 1% of the tokens is less than a validation window: val gets one window, from the tail.
    assert meta["split"]["method"] == "spans" and meta["val_tokens"] >= 64
    both = np.concatenate([train, val])
    assert both.min() == meta["min_token_id"] and both.max() == meta["max_token_id"]
    assert meta["max_token_id"] == meta["eot_id"] < meta["vocab_size"]
    assert read_meta(out)["dir"] == str(out.resolve())
    assert read_meta(out / "train.npy")["train_tokens"] == meta["train_tokens"]
    assert read_meta(tmp_path / "c.jsonl") is None


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("sizes", [[], [0], [5, 0, 3], [70000]])
def test_npy_writer(tmp_path, dtype, sizes):
    w = NpyWriter(tmp_path / "a.npy", np.dtype(dtype))
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60000, n).astype(np.uint32) for n in sizes]
    for p in parts:
        w.append(p)
    w.finish()
    got = np.load(tmp_path / "a.npy", mmap_mode="r")
    want = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    assert got.dtype == dtype and np.array_equal(got, want)


def test_val_split_is_deterministic_and_seeded(tmp_path):
    docs = [f"document number {i}" for i in range(200)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    runs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        prepare_corpus([tmp_path / "c.jsonl"], tmp_path / name, tokenizer="bytes", seed=seed, val_fraction=0.1)
        runs.append(load_dataset_docs(tmp_path / name)[2])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert 5 <= len(runs[0]) <= 40
    a, b = (tmp_path / name / "train.npy" for name in "ab")
    assert a.read_bytes() == b.read_bytes()


def test_one_document_goes_to_train(tmp_path):
    (tmp_path / "a.txt").write_text("only one")
    meta = prepare_corpus([tmp_path / "a.txt"], tmp_path / "out", tokenizer="bytes", val_fraction=0.5)
    assert (meta["train_documents"], meta["val_documents"]) == (1, 0)
    assert np.load(tmp_path / "out" / "val.npy").shape == (0,)
    assert meta["split"]["method"] == "none" and "too few" in meta["split"]["reason"]


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 2, nothing half-written
# ---------------------------------------------------------------------------------------------


def make_dataset(tmp_path: Path, run_cli) -> Path:
    out = tmp_path / "ds"
    (tmp_path / "good.txt").write_text("good text")
    result = run_cli("prepare", tmp_path / "good.txt", "--out", out, "--tokenizer", "bytes")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: None, ["missing.txt"], "no such file"),
        (lambda p: (p / "e.txt").write_bytes(b""), ["e.txt"], "empty"),
        (lambda p: (p / "b.txt").write_bytes(b"\x7fELF\x00\x01\x02"), ["b.txt"], "binary"),
        (lambda p: (p / "u.txt").write_bytes(b"caf\xe9 latin-1"), ["u.txt"], "UTF-8"),
        (lambda p: write_jsonl(p / "f.jsonl", ["x"], field="body"), ["f.jsonl"], "'text'"),
        (lambda p: (p / "j.jsonl").write_text('{"text": "a"}\n{oops\n'), ["j.jsonl"], ":2:"),
        (
            lambda p: __import__("pyarrow.parquet").parquet.write_table(
                __import__("pyarrow").table({"body": ["x"]}), p / "c.parquet"
            ),
            ["c.parquet"],
            "column 'text'",
        ),
        (lambda p: (p / "x.parquet").write_text("not parquet"), ["x.parquet"], "parquet"),
        (lambda p: (p / "g.txt.gz").write_bytes(b"not gzip at all"), ["g.txt.gz"], "gzip"),
        (lambda p: (p / "ok.txt").write_text("x"), ["ok.txt", "--vocab_size", "100"], "too small"),
        (lambda p: (p / "ok.txt").write_text("x"), ["ok.txt", "--tokenizer", "nope.json"], "no such file"),
        (lambda p: (p / "ok.txt").write_text("x"), ["ok.txt", "--val-fraction", "1.5"], "val_fraction"),
        (lambda p: (p / "empty").mkdir(), ["empty"], "holds no"),
        (lambda p: None, ["nothing*.txt"], "no file matches"),
    ],
)
def test_user_errors_exit_2_and_keep_the_dataset(tmp_path, monkeypatch, setup, args, message, run_cli):
    monkeypatch.chdir(tmp_path)
    out = make_dataset(tmp_path, run_cli)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    setup(tmp_path)
    result = run_cli("prepare", *args, "--out", out, "--force", "--quiet")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # intact, no temp files


def test_existing_dataset_needs_force(tmp_path, run_cli):
    out = make_dataset(tmp_path, run_cli)
    before = (out / "train.npy").read_bytes()
    (tmp_path / "new.txt").write_text("new and longer text")
    result = run_cli("prepare", tmp_path / "new.txt", "--out", out, "--tokenizer", "bytes")
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "train.npy").read_bytes() == before
    result = run_cli("prepare", tmp_path / "new.txt", "--out", out, "--tokenizer", "bytes", "--force")
    assert result.exit_code == 0, result.output
    assert read_meta(out)["train_tokens"] == len("new and longer text") + 1


def test_failure_midway_leaves_no_files(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="b.txt"):
        prepare_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", tokenizer="bytes")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_raise_config_errors(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="257"):
        prepare_corpus([tmp_path / "a.txt"], tmp_path / "o", vocab_size=256)
    with pytest.raises(ConfigError, match="separator"):
        prepare_corpus([tmp_path / "a.txt"], tmp_path / "o", separator="")


def test_surrogates_in_json_are_a_data_error(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "bad \\ud800 here"}\n')
    with pytest.raises(DataError, match="surrogate"):
        prepare_corpus([tmp_path / "s.jsonl"], tmp_path / "o", tokenizer="bytes")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_trains_and_reports(tmp_path, run_cli):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(PROSE + str(i), encoding="utf-8")
    result = run_cli(
        "prepare",
        tmp_path,
        "--out",
        tmp_path / "out",
        "--vocab-size",
        "300",
        "--separator",
        "\\n\\n",
        "--val_fraction",
        "0.2",
        "--seed",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert "prepare: encode" in result.output  # plain progress lines when not a terminal
    meta = read_meta(tmp_path / "out")
    assert meta["separator"] == "\n\n" and meta["seed"] == 3 and meta["vocab_size"] == 300
    # Each file's first paragraphs are the same text: kept once.
    assert meta["train_documents"] + meta["val_documents"] == 6 - meta["duplicate_documents"]
    assert meta["duplicate_documents"] == 2


def test_help_documents_documents_and_both_flag_spellings(run_cli):

    result = run_cli("prepare", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--text_field", "--text-field", "--vocab_size", "--separator", "--force"):
        assert flag in result.output
    assert "one per text file" in result.output


def test_prepare_modules_import_no_heavy_libraries():
    code = (
        "import sys, lmtools; before = set(sys.modules)\n"
        "import lmtools.data.prepare, lmtools.data.corpus, lmtools.data.tokenizer\n"
        "new = set(sys.modules) - before\n"
        "heavy = [m for m in new if m.split('.')[0] in "
        "('torch', 'numpy', 'tokenizers', 'tiktoken', 'pyarrow')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("tokenizer", ["trained", "bytes"])
def test_round_trip_when_cuts_fall_inside_the_special_spelling(tmp_path, trained, tokenizer):
    docs = [EOT * 40, "a" + EOT * 25 + "  b", "x" * 333, PROSE + EOT + PROSE]
    write_jsonl(tmp_path / "c.jsonl", docs)
    prepare_corpus(
        [tmp_path / "c.jsonl"],
        tmp_path / "out",
        val_fraction=0.0,
        piece_chars=37,
        batch_chars=100,
        tokenizer=str(trained) if tokenizer == "trained" else "bytes",
    )
    _, train, _ = load_dataset_docs(tmp_path / "out")
    assert train == docs


@pytest.mark.parametrize("block", [64, 1 << 20])
def test_jsonl_fast_path_falls_back_without_losing_or_repeating_documents(tmp_path, monkeypatch, block):
    import lmtools.data.corpus as corpus

    monkeypatch.setattr(corpus, "JSON_BLOCK", block)
    docs = [f"doc {i} é" for i in range(20)] + ["L" * 500] + [f"after {i}" for i in range(5)]
    lines = [json.dumps({"text": d, "meta": {"n": i}}) for i, d in enumerate(docs)]
    lines.insert(3, "")  # a blank line is no document
    lines.insert(7, "   ")
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = resolve_sources([tmp_path / "c.jsonl"])[0]
    if block > 500:  # no line is longer than a block: the fast path reads it all
        monkeypatch.setattr(SourceReader, "_jsonl_python", None)
    reader = SourceReader(source, ReadOptions(), hash_file=True)
    got = [p.text for p in reader]
    assert got == docs
    import hashlib

    assert reader.sha256() == hashlib.sha256((tmp_path / "c.jsonl").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"body": "x"}', ":3: no field 'text'"),
        ('{"text": 5}', ":3: field 'text' holds int"),
        ('{"text": "a\\ud800"}', ":3: the text holds an unpaired surrogate"),
        ('{"text": "a"', ":3: not a JSON line"),
        ('["text"]', ":3: no field 'text'"),
        ('{"text": "nul \x00"}', "binary"),
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", ":3: a JSON line nested too deeply"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        list(SourceReader(resolve_sources([path])[0], ReadOptions()))


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=":2: not UTF-8"):
        list(SourceReader(resolve_sources([path])[0], ReadOptions()))


def test_val_fraction_is_respected_on_average():
    from lmtools.data.prepare import val_flags

    flags = val_flags(7, 0, 20000, 0.1)
    assert 1800 < flags.sum() < 2200
    assert np.array_equal(flags[500:600], val_flags(7, 500, 100, 0.1))  # position-independent
    assert not val_flags(7, 0, 100, 0.0).any()


def test_progress_displays(monkeypatch, capsys):
    """The rich bar (terminal) and the plain lines (pipe) both survive a whole run's calls."""
    import io

    from rich.console import Console

    import lmtools.cli.prepare as cli

    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False, raising=False)
    plain = cli._progress(quiet=False)
    plain.INTERVAL = 0.0
    for name, total in (("train tokenizer", 100), ("learn merges", None), ("encode", 100)):
        plain.phase(name, total)
        plain.advance(50, tokens=10)
        plain.done()
    err = capsys.readouterr().err
    assert "prepare: encode:  50.0%" in err and "prepare: learn merges" in err

    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True, raising=False)
    console = Console(file=io.StringIO(), force_terminal=True)
    bar = cli._progress(quiet=False, console=console)
    for name, total in (("train tokenizer", 100), ("learn merges", None), ("encode", 100)):
        bar.phase(name, total)
        bar.advance(50, tokens=10)
        bar.done()
    bar.stop()
    assert "tok/s" in console.file.getvalue()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    docs=st.lists(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\x1e"), min_size=1, max_size=200),
        min_size=1,
        max_size=8,
    ),
    form=st.sampled_from(["txt", "txt.gz", "parquet"]),
    piece_chars=st.sampled_from([8, 64, 1 << 20]),
)
def test_round_trip_of_text_and_parquet_files(tmp_path_factory, trained, docs, form, piece_chars):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("rt")
    path = tmp / f"c.{form}"
    if form == "parquet":
        pq.write_table(pa.table({"text": docs}), path, row_group_size=3)
    else:
        data = "\x1e".join(docs).encode("utf-8")
        path.write_bytes(gzip.compress(data) if form.endswith(".gz") else data)
    # Between separators, a part of only whitespace is an empty document (a row is not).
    kept = [d for d in docs if form == "parquet" or d.strip()]
    args = dict(tokenizer=str(trained), val_fraction=0.0, separator="\x1e", piece_chars=piece_chars, batch_chars=128)
    args["keep_duplicates"] = True  # the documents as they are, repeats too
    if not kept:
        with pytest.raises(DataError, match="no text"):
            prepare_corpus([path], tmp / "out", **args)
        return
    prepare_corpus([path], tmp / "out", **args)
    _, train, _ = load_dataset_docs(tmp / "out")
    assert train == kept


def test_tokenizer_sample_trains_on_part_of_the_corpus(tmp_path):
    import lmtools.data.prepare as prepare

    docs = [f"document {i}: " + "lorem ipsum dolor sit amet " * 4 for i in range(400)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    seen = []
    original = prepare._text_batches

    def spy(pieces, chars):
        for batch in original(pieces, chars):
            seen.extend(batch)
            yield batch

    prepare._text_batches = spy
    try:
        size = (tmp_path / "c.jsonl").stat().st_size
        meta = prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "out", vocab_size=300, tokenizer_sample=size // 4)
    finally:
        prepare._text_batches = original
    assert 50 < len(seen) < 150  # about a quarter, spread out
    assert min(docs.index(d) for d in seen) < 100 and max(docs.index(d) for d in seen) > 300
    assert meta["tokenizer_sample"] == size // 4
    assert meta["tokenizer_sample_bytes"] == sum(len(d) for d in seen)
    _, train, val = load_dataset_docs(tmp_path / "out")
    assert sorted(train + val) == sorted(docs)  # everything is still encoded


# ---------------------------------------------------------------------------------------------
# Binary input is found before the long passes
# ---------------------------------------------------------------------------------------------

# `lmtools prepare ARGS` in this process, then the bytes it read from files (/proc/self/io rchar).
PREPARE_READING = """
import sys
from lmtools.cli import main
try:
    main(["prepare", *sys.argv[1:]])
except SystemExit as exc:
    code = exc.code
with open("/proc/self/io") as f:
    print(code, next(int(line.split()[1]) for line in f if line.startswith("rchar")))
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux)")
def test_a_binary_file_named_alone_is_refused_before_the_text_is_read(tmp_path):
    # The reading pass met the NUL bytes of the last file after encoding all the others.
    binary = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64
    texts = []
    for i in range(4):
        texts.append(tmp_path / f"{i}.txt")
        texts[-1].write_text(prose(4_000_000, seed=i), encoding="utf-8")
    (tmp_path / "z.txt").write_bytes(binary)
    read = {}
    for name, inputs in (("alone", [tmp_path / "z.txt"]), ("corpus", [*texts, tmp_path / "z.txt"])):
        out = tmp_path / f"out-{name}"
        args = [*map(str, inputs), "--out", str(out), "--tokenizer", "bytes"]
        result = subprocess.run([sys.executable, "-c", PREPARE_READING, *args], capture_output=True, text=True)
        code, read[name] = map(int, result.stdout.split()[-2:])
        assert code == 2 and "z.txt: binary (an executable), not a text, .jsonl or .parquet file" in result.stderr, (
            result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()
    # Beside what a prepare of the binary file alone reads (libraries): at most a few KB of each
    # text file, not the 16 MB of text.
    assert read["corpus"] - read["alone"] < 1_000_000, read


def test_a_binary_file_found_in_a_folder_is_skipped_and_counted(tmp_path, run_cli):
    binary = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64
    for name, texts in (("alone", 0), ("corpus", 2)):
        (tmp_path / name).mkdir()
        for i in range(texts):
            (tmp_path / name / f"{i}.txt").write_text(prose(20_000, seed=i), encoding="utf-8")
        (tmp_path / name / "z.txt").write_bytes(binary)
    # Nothing but a binary file: one line that names it.
    result = run_cli("prepare", tmp_path / "alone", "--out", tmp_path / "out-alone", "--tokenizer", "bytes")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: no file to read (1 file skipped: 1 binary); the first: {tmp_path / 'alone' / 'z.txt'}"
    )
    assert not (tmp_path / "out-alone").exists()
    # Beside text: left out, counted in the summary and in meta.json.
    result = run_cli("prepare", tmp_path / "corpus", "--out", tmp_path / "out", "--tokenizer", "bytes", "--quiet")
    assert result.exit_code == 0, result.output
    assert "1 file skipped: 1 binary (meta.json: skipped_files)" in result.output
    meta = read_meta(tmp_path / "out")
    assert meta["skipped_files"] == {"binary": {"count": 1, "first": [str(tmp_path / "corpus" / "z.txt")]}}
    assert [Path(s["path"]).name for s in meta["sources"]] == ["0.txt", "1.txt"]


def test_binary_input_is_looked_for_at_the_head_and_every_64_mb(tmp_path, monkeypatch):
    from lmtools.data import corpus

    monkeypatch.setattr(corpus, "BINARY_PROBE_EVERY", 100_000)
    text = bytearray(prose(1_000_000, seed=1).encode("utf-8"))
    for at, found in ((0, True), (7_999, True), (300_004, True), (8_000, False), (350_000, False)):
        data = bytearray(text)
        data[at] = 0
        (tmp_path / "t.txt").write_bytes(bytes(data))
        sources = resolve_sources([tmp_path / "t.txt"])
        if found:
            with pytest.raises(DataError, match="looks binary"):
                corpus.check_not_binary(sources)
        else:
            corpus.check_not_binary(sources)  # left to the reading pass, which checks every byte
            with pytest.raises(DataError, match="looks binary"):
                prepare_corpus([tmp_path / "t.txt"], tmp_path / "out", tokenizer="bytes")
