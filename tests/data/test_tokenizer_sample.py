"""The tokenizer's sample (`--tokenizer_sample N`): about N bytes of whole documents read from
evenly spread places of the corpus, and nothing else read; seeded; every input kind.

The corpora are multi-megabyte files of labelled documents ("Document 17." opens the 18th), so
that where a sampled document comes from can be read off it."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lmtools.data.corpus import ReadOptions, iter_pieces, resolve_sources
from lmtools.data.prepare import Progress, _train, prepare_corpus, read_meta
from lmtools.data.tokenizer_sample import DocumentSample
from lmtools.layout import EOT
from texts import documents, eot_joined, write_jsonl

MB = 1_000_000
DOCS = 4000  # about 4 KB each: a 16 MB corpus
LABEL = re.compile(r"\s*Document (\d+)\.")


def labelled(n: int, seed: int = 0) -> list[str]:
    """`n` documents of 1 to 7 KB of prose, each opening with its index."""
    base = documents([1000 + (k * 7919) % 6000 for k in range(600)], seed)
    return [f"Document {i}.\n{base[i % len(base)]}" for i in range(n)]


def label(text: str) -> int:
    return int(LABEL.match(text).group(1))


def whole_documents(pieces) -> list[str]:
    docs, parts = [], []
    for piece in pieces:
        parts.append(piece.text)
        if piece.doc_end:
            docs.append("".join(parts))
            parts = []
    return docs


def sampled(paths, sample_bytes: int, seed: int = 0, **options) -> tuple[DocumentSample, list[str]]:
    sample = DocumentSample(resolve_sources(paths), ReadOptions(**options), sample_bytes, seed)
    return sample, whole_documents(sample)


def all_documents(paths, **options) -> list[str]:
    return whole_documents(iter_pieces(resolve_sources(paths), ReadOptions(**options)))


def thirds(positions: list[int], total: int) -> set[int]:
    return {min(2, 3 * p // total) for p in positions}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """One 16 MB text file, the same as jsonl, as a folder of 40 text files, and as a folder of
    1000 files of one document each."""
    root = tmp_path_factory.mktemp("sample")
    docs = labelled(DOCS)
    (root / "big.txt").write_text(eot_joined(docs), encoding="utf-8")
    write_jsonl(root / "big.jsonl", docs)
    (root / "folder").mkdir()
    for j in range(40):
        part = docs[j * DOCS // 40 : (j + 1) * DOCS // 40]
        (root / "folder" / f"part{j:02}.txt").write_text(eot_joined(part), encoding="utf-8")
    (root / "files").mkdir()
    for i in range(1000):
        text = "".join(docs[4 * i : 4 * i + 4]).replace(f"Document {4 * i}.", f"Document {i}.", 1)
        (root / "files" / f"doc{i:04}.txt").write_text(text, encoding="utf-8")
    return {"root": root, "docs": docs}


# ---------------------------------------------------------------------------------------------
# What is read
# ---------------------------------------------------------------------------------------------

# Bytes the process reads from files (/proc/self/io rchar) while `_train` samples and trains
# (every library it needs imported first).
READ_COUNTER = """
import sys
import numpy, pyarrow, pyarrow.json, pyarrow.parquet, tokenizers
from lmtools.data.corpus import ReadOptions, resolve_sources
from lmtools.data.prepare import Progress, _train

def rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

path, sample, separator = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sources = resolve_sources([path])
options = ReadOptions(separator=None if separator == "none" else separator)
before = rchar()
_train(sources, options, 300, Progress(), sum(s.size for s in sources), sample, 0)
print(rchar() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux)")
@pytest.mark.parametrize("name, separator", [("big.txt", EOT), ("big.jsonl", EOT), ("files", "none")])
def test_a_1mb_sample_of_a_16mb_corpus_reads_under_3mb(corpus, name, separator):
    """Reading the whole corpus to keep a sample of it (16 MB here) fails this."""
    path = corpus["root"] / name
    size = sum(s.size for s in resolve_sources([path]))
    assert size > 16 * MB
    out = subprocess.run(
        [sys.executable, "-c", READ_COUNTER, str(path), str(MB), separator],
        capture_output=True,
        text=True,
        check=True,
    )
    read = int(out.stdout.split()[-1])
    assert 0.7 * MB < read < 3 * MB


def test_bytes_read_are_counted_and_the_sample_holds_about_n_bytes(corpus):
    sample, docs = sampled([corpus["root"] / "big.txt"], MB)
    assert sample.planned == MB
    assert MB <= sample.bytes_read < 1.5 * MB
    assert 0.85 * MB < sum(len(d.encode()) for d in docs) < 1.15 * MB


def test_the_training_phase_counts_the_sample_not_the_corpus(corpus):
    class Recorder(Progress):
        def __init__(self):
            self.phases: list[list] = []

        def phase(self, name, total_bytes):
            self.phases.append([name, total_bytes, 0])

        def advance(self, nbytes=0, tokens=0):
            self.phases[-1][2] += nbytes

    sources = resolve_sources([corpus["root"] / "big.txt"])
    progress = Recorder()
    _, trained_on = _train(sources, ReadOptions(), 300, progress, sum(s.size for s in sources), 2 * MB, 0)
    name, total, advanced = progress.phases[0]
    assert name == "train tokenizer" and total == advanced  # the sample's size (equal windows)
    assert 2 * MB - 100 < total <= 2 * MB
    assert progress.phases[1][0] == "learn merges"
    assert 1.7 * MB < trained_on < 2.3 * MB


# ---------------------------------------------------------------------------------------------
# Seeded, and spread over the corpus
# ---------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_sample_and_tokenizer_another_seed_another_sample(corpus):
    path = [corpus["root"] / "big.txt"]
    _, first = sampled(path, MB, seed=0)
    _, again = sampled(path, MB, seed=0)
    _, other = sampled(path, MB, seed=1)
    assert first == again
    assert len({label(d) for d in first} & {label(d) for d in other}) < len(first) / 4
    sources = resolve_sources(path)
    size = sources[0].size
    tokenizers = [_train(sources, ReadOptions(), 400, Progress(), size, MB, 0)[0].to_str() for _ in range(2)]
    assert tokenizers[0] == tokenizers[1]


@pytest.mark.parametrize("name, separator", [("big.txt", EOT), ("big.jsonl", EOT), ("folder", EOT), ("files", None)])
def test_the_sample_holds_documents_from_the_start_middle_and_end(corpus, name, separator):
    path = corpus["root"] / name
    _, docs = sampled([path], MB, separator=separator)
    count = 1000 if name == "files" else DOCS
    labels = [label(d) for d in docs]
    assert thirds(labels, count) == {0, 1, 2}
    assert len(set(labels)) == len(labels)  # none twice
    # In each tenth of the corpus, some of the sample (16 windows of 1/16 MB).
    assert len({10 * i // count for i in labels}) == 10


def test_one_huge_document_gives_parts_spread_over_it(corpus):
    """With no separator, the 16 MB file is one document: the sample is parts of it."""
    path = corpus["root"] / "big.txt"
    text = path.read_text(encoding="utf-8")
    sample, parts = sampled([path], MB, separator=None)
    assert len(parts) == 16 and all(len(p) < 2 * sample.window for p in parts)
    assert 0.9 * MB < sum(map(len, parts)) <= MB
    places = [text.find(p) for p in parts]
    assert -1 not in places  # each part is a run of the file, character for character
    assert thirds(places, len(text)) == {0, 1, 2}


def test_a_sample_as_large_as_the_corpus_is_all_of_it(tmp_path):
    docs = labelled(300)
    write_jsonl(tmp_path / "c.jsonl", docs)
    size = (tmp_path / "c.jsonl").stat().st_size
    _, got = sampled([tmp_path / "c.jsonl"], size)
    assert got == docs
    meta = prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "out", vocab_size=300, tokenizer_sample=size)
    assert meta["tokenizer_sample"] == size and meta["tokenizer_sample_bytes"] == meta["text_bytes"]


# ---------------------------------------------------------------------------------------------
# Every input kind trains a working tokenizer from a sample
# ---------------------------------------------------------------------------------------------


def write_corpus(root: Path, kind: str, docs: list[str]) -> tuple[Path, dict]:
    """`docs` as one input of this kind; returns it and the prepare options that read it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "txt":
        path = root / "c.txt"
        path.write_text(eot_joined(docs), encoding="utf-8")
    elif kind == "txt folder":  # five files
        path = root / "folder"
        path.mkdir()
        for j in range(5):
            part = docs[j * len(docs) // 5 : (j + 1) * len(docs) // 5]
            (path / f"{j}.txt").write_text(eot_joined(part), encoding="utf-8")
    elif kind == "one document per file":
        path = root / "files"
        path.mkdir()
        for i, doc in enumerate(docs):
            (path / f"{i:04}.txt").write_text(doc, encoding="utf-8")
        return path, {"separator": None}
    elif kind == "jsonl":
        path = write_jsonl(root / "c.jsonl", docs)
    elif kind in ("txt.gz", "jsonl.gz"):
        plain = root / "plain"
        if kind == "txt.gz":
            plain.write_text(eot_joined(docs), encoding="utf-8")
        else:
            write_jsonl(plain, docs)
        path = root / f"c.{kind}"
        path.write_bytes(gzip.compress(plain.read_bytes(), 6))
        plain.unlink()
    else:
        path = root / "c.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=64)
    return path, {}


KINDS = ["txt", "one document per file", "jsonl", "txt.gz", "jsonl.gz", "parquet"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind_trains_a_working_tokenizer_from_a_sample(tmp_path, kind):
    docs = labelled(800, seed=1)  # about 3 MB of text
    path, options = write_corpus(tmp_path, kind, docs)
    size = sum(s.size for s in resolve_sources([path]))
    meta = prepare_corpus([path], tmp_path / "out", vocab_size=400, tokenizer_sample=size // 5, **options)
    assert meta["vocab_size"] == 400
    assert meta["tokenizer_sample"] == size // 5
    # A fifth of the bytes on disk: of the text, a fifth or, compressed, a fifth of it inflated.
    assert 0.1 * meta["text_bytes"] < meta["tokenizer_sample_bytes"] < 0.3 * meta["text_bytes"]
    assert meta["bytes_per_token"] > 2.0
    out = tmp_path / "out"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = np.concatenate([np.load(out / "train.npy"), np.load(out / "val.npy")])
    decoded = tok.decode(ids.tolist(), skip_special_tokens=False).split(EOT)[:-1]
    assert sorted(label(d) for d in decoded) == list(range(len(docs)))
    assert read_meta(out)["tokenizer_sample_bytes"] == meta["tokenizer_sample_bytes"]


def test_a_gzip_file_gives_a_prefix_and_small_gzip_files_whole(tmp_path):
    docs = labelled(800, seed=2)
    path, _ = write_corpus(tmp_path, "txt.gz", docs)
    budget = path.stat().st_size // 4
    sample, got = sampled([path], budget)
    first = [label(d) for d in got]
    assert first == list(range(len(first))) and 0 < len(first) < len(docs)
    assert budget <= sample.bytes_read < budget + (64 << 10)
    # 100 small files of 8 documents: the windows take whole files, spread over the folder.
    for j in range(100):
        (tmp_path / f"p{j:03}.txt.gz").write_bytes(gzip.compress(eot_joined(docs[8 * j : 8 * j + 8]).encode()))
    files = sorted(tmp_path.glob("p*.txt.gz"))
    _, got = sampled(files, sum(f.stat().st_size for f in files) // 3)
    labels = [label(d) for d in got]
    per_file = np.bincount(np.array(labels) // 8, minlength=100)
    assert (per_file == 8).sum() >= 10  # whole files (a window's edges may cut two more)
    assert thirds(labels, len(docs)) == {0, 1, 2}


def test_parquet_reads_only_the_row_groups_it_samples(tmp_path):
    import pyarrow.parquet as pq

    docs = labelled(2000, seed=3)
    path, _ = write_corpus(tmp_path, "parquet", docs)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups > 30
    sample, got = sampled([path], path.stat().st_size // 10)
    assert sample.bytes_read < 0.2 * path.stat().st_size
    labels = [label(d) for d in got]
    assert thirds(labels, len(docs)) == {0, 1, 2} and all(docs[label(d)] == d for d in got)


# ---------------------------------------------------------------------------------------------
# Errors in the bytes read
# ---------------------------------------------------------------------------------------------


def test_bad_bytes_in_the_sample_are_reported_as_the_full_reader_reports_them(tmp_path):
    """Every tenth document is damaged, so that any sample meets one."""
    from lmtools.errors import DataError

    docs = labelled(400, seed=4)

    def damaged(bad: str) -> list[str]:
        return [d + bad if i % 10 == 5 else d for i, d in enumerate(docs)]

    def sample_of(path: Path):
        return sampled([path], path.stat().st_size // 2)

    (tmp_path / "bad.txt").write_bytes(eot_joined(damaged("\udce9")).encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8 text \(undecodable byte near offset \d+"):
        sample_of(tmp_path / "bad.txt")
    (tmp_path / "nul.txt").write_text(eot_joined(damaged("\x00")), encoding="utf-8")
    with pytest.raises(DataError, match=r"nul\.txt: looks binary"):
        sample_of(tmp_path / "nul.txt")
    lines = [json.dumps({"text": d}) if i % 10 != 5 else '{"text": "unclosed' for i, d in enumerate(docs)]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: the line at byte \d+: not a JSON line"):
        sample_of(tmp_path / "bad.jsonl")
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(eot_joined(docs).encode())[:5000] + b"garbage" * 1000)
    with pytest.raises(DataError, match=r"bad\.txt\.gz: not a readable gzip file"):
        sample_of(tmp_path / "bad.txt.gz")


# ---------------------------------------------------------------------------------------------
# Property: whole documents, about N bytes
# ---------------------------------------------------------------------------------------------

ALPHABET = list("abcdefgh ijklmnop\nqrstuvwxyz.,é日ß") + ["\u00a0", "🎉"]


def random_documents(count: int, seed: int) -> list[str]:
    """`count` documents of 1 to 30 characters (at most 193 bytes as a jsonl line), each
    starting with a letter, some with non-ASCII text, spaces and newlines."""
    rng = np.random.default_rng(seed)
    return ["x" + "".join(rng.choice(ALPHABET, int(rng.integers(0, 30)))) for _ in range(count)]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(200, 3000),
    text_seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["txt", "txt folder", "jsonl", "txt.gz", "parquet"]),
    share=st.floats(0.02, 1.2),
    seed=st.integers(0, 3),
)
def test_sampled_documents_are_whole_documents_of_the_corpus(tmp_path_factory, count, text_seed, kind, share, seed):
    """A sample of N >= 4096 bytes reads windows of at least N / 16 bytes, longer than any
    document here: every document it holds is whole, and it holds about N bytes of them."""
    docs = random_documents(count, text_seed)
    root = tmp_path_factory.mktemp("prop")
    path, _ = write_corpus(root, kind, docs)
    size = sum(s.size for s in resolve_sources([path]))
    n = max(4096, int(share * size))
    reference = all_documents([path])
    sample, got = sampled([path], n, seed)
    event(f"{kind}, {'whole corpus' if n >= size else 'sample'}")
    assert set(got) <= set(reference) and len(got) <= len(reference)
    if n >= size:
        assert got == reference
    elif kind != "txt.gz" and kind != "parquet":
        # Each window takes the documents that start in it: their records (a document and its
        # separator, or a line) add up to the window's length within one record (and the
        # newline that ends each of the folder's files).
        if kind == "jsonl":
            records = {d: len(json.dumps({"text": d}).encode()) + 1 for d in reference}
        else:
            records = {d: len(d.encode()) + len(EOT) for d in reference}
        taken = sum(records[d] for d in got)
        assert abs(taken - sample.planned) <= sample.windows * (max(records.values()) + 1) + 5
        assert sample.planned > n - sample.windows
    elif kind == "txt.gz":
        assert got == reference[: len(got)]  # a prefix
