"""`prepare` in parts: one process, worker processes over many units, and `--shard I/N` joined
with `--merge` all write the same dataset, bit for bit; a merge refuses shards that do not
make up one prepare, in one line, and never changes the shard folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import one_line_error, run_cli
from lmtools.data.prepare import merge_shards, prepare_corpus
from lmtools.data.tokenizer import train_bpe
from texts import documents, eot_joined, prose, write_jsonl

UNIT = 256 << 10  # small units: a few MB of corpus makes many of them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of a 3 MB <|endoftext|>-joined text file, a jsonl file and a parquet file of
    small row groups (about 5 MB in all), and a tokenizer.json trained on a part of it."""
    root = tmp_path_factory.mktemp("shards")
    folder = root / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(eot_joined(documents([3000 + 2 * i for i in range(900)], seed=1)), "utf-8")
    write_jsonl(folder / "b.jsonl", documents([2000 + 11 * i for i in range(400)], seed=2) + [""])
    rows = documents([1500 + 7 * i for i in range(500)], seed=3)
    pq.write_table(pa.table({"text": rows}), folder / "c.parquet", row_group_size=40)
    tok = root / "tokenizer.json"
    train_bpe(iter([[prose(300_000, seed=4)]]), 600).save(str(tok))
    return folder, tok


def shards_of(corpus, out: Path, count: int = 3) -> list[Path]:
    folder, tok = corpus
    dirs = []
    for i in range(count):
        record = prepare_corpus([folder], out / f"s{i}", tokenizer=tok, shard=(i, count), unit_bytes=UNIT, threads=1)
        assert record["shard"] == [i, count] and record["mine"]
        dirs.append(out / f"s{i}")
    return dirs


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def comparable(meta: dict, digests: bool = True) -> dict:
    meta = {k: v for k, v in meta.items() if k not in ("created", "dir", "merged_from")}
    if not digests:
        meta["sources"] = [{k: v for k, v in s.items() if not k.startswith("sha256")} for s in meta["sources"]]
    return meta


def assert_same_files(a: Path, b: Path) -> None:
    for name in ("train.npy", "val.npy", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_one_process_worker_processes_and_merged_shards_write_the_same_dataset(tmp_path, corpus):
    folder, tok = corpus
    one = prepare_corpus([folder], tmp_path / "one", tokenizer=tok, threads=1)
    many = prepare_corpus([folder], tmp_path / "many", tokenizer=tok, threads=2, unit_bytes=UNIT)
    merged = merge_shards(shards_of(corpus, tmp_path), tmp_path / "merged")
    assert_same_files(tmp_path / "one", tmp_path / "many")
    assert_same_files(tmp_path / "one", tmp_path / "merged")
    assert comparable(one, digests=False) == comparable(many, digests=False) == comparable(merged, digests=False)
    assert comparable(many) == comparable(merged)  # the same units: the same digests too
    assert merged["merged_from"] == [str((tmp_path / f"s{i}").resolve()) for i in range(3)]
    assert json.loads((tmp_path / "merged" / "meta.json").read_text())["merged_from"] == merged["merged_from"]
    assert one["split"]["method"] == "documents" and one["val_tokens"] > 0 and one["val_documents"] > 0
    assert one["empty_documents"] == 1 and one["empty_document_places"] == [f"{folder / 'b.jsonl'}:401"]
    assert many["empty_document_places"] == one["empty_document_places"]
    # One unit per file: each file's own sha256. Many units: the digest of each unit's bytes,
    # the ranges tiling the file.
    for a, b in zip(one["sources"], many["sources"]):
        data = Path(a["path"]).read_bytes()
        assert a["sha256"] == hashlib.sha256(data).hexdigest() and "sha256_parts" not in a
        parts = b["sha256_parts"]
        assert len(parts) > 1 and "sha256" not in b
        assert [p[0] for p in parts] == [0] + [p[1] for p in parts[:-1]] and parts[-1][1] == len(data)
        assert all(hashlib.sha256(data[lo:hi]).hexdigest() == digest for lo, hi, digest in parts)
    # The shard folders are read, never written, by the merge.
    before = {i: snapshot(tmp_path / f"s{i}") for i in range(3)}
    merge_shards([tmp_path / f"s{i}" for i in range(3)], tmp_path / "again")
    assert {i: snapshot(tmp_path / f"s{i}") for i in range(3)} == before
    assert_same_files(tmp_path / "one", tmp_path / "again")


@pytest.mark.slow
def test_shards_as_background_processes_then_merge_equal_one_prepare(tmp_path, corpus):
    folder, tok = corpus
    env = dict(os.environ, LMTOOLS_PREPARE_UNIT_BYTES=str(UNIT))

    def cli(*args) -> list[str]:
        return [sys.executable, "-m", "lmtools.cli", "prepare", *map(str, args), "-q"]

    procs = [
        subprocess.Popen(
            cli(folder, "--tokenizer", tok, "--shard", f"{i}/3", "--out", tmp_path / f"s{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(3)
    ]
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.startswith(f"{tmp_path / f's{i}'}: shard {i}/3, ") and "--merge" in out
    merged = subprocess.run(
        cli("--merge", *(tmp_path / f"s{i}" for i in range(3)), "--out", tmp_path / "merged"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert merged.returncode == 0, merged.stderr
    plain = subprocess.run(cli(folder, "--tokenizer", tok, "--out", tmp_path / "plain"), capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert_same_files(tmp_path / "plain", tmp_path / "merged")
    meta = {name: json.loads((tmp_path / name / "meta.json").read_text()) for name in ("plain", "merged")}
    assert comparable(meta["plain"], digests=False) == comparable(meta["merged"], digests=False)


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory, corpus) -> list[Path]:
    return shards_of(corpus, tmp_path_factory.mktemp("three"))


@pytest.mark.parametrize(
    "pick, needle",
    [
        (lambda s, other: s[:2], "--merge: shard 2/3 is missing; name the 3 shard folders of the prepare once each"),
        (lambda s, other: [s[0], s[1], s[1]], "--merge: shard 1/3 is given twice; name the 3 shard folders"),
        (lambda s, other: [s[0], s[1], other], "a shard of another prepare than"),
        (lambda s, other: [s[0], s[1], other.parent / "empty"], "not a finished shard (no shard.json)"),
    ],
    ids=["missing", "twice", "another-prepare", "unfinished"],
)
def test_a_merge_of_shards_that_are_not_one_prepare_is_one_line(tmp_path, corpus, three_shards, pick, needle):
    folder, tok = corpus
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text(eot_joined(documents([2000] * 400, seed=9)), "utf-8")
    other = tmp_path / "other"
    prepare_corpus([other_corpus], other, tokenizer=tok, shard=(2, 3), unit_bytes=UNIT, threads=1)
    (tmp_path / "empty").mkdir()
    before = [snapshot(s) for s in three_shards]
    result = run_cli("prepare", "--merge", *pick(three_shards, other), "--out", tmp_path / "out")
    one_line_error(result, needle)
    assert not (tmp_path / "out").exists()
    assert [snapshot(s) for s in three_shards] == before


def test_shards_of_another_count_are_refused(tmp_path, corpus, three_shards):
    folder, tok = corpus
    two = prepare_corpus([folder], tmp_path / "of-two", tokenizer=tok, shard=(1, 2), unit_bytes=UNIT, threads=1)
    assert two["shard"] == [1, 2]
    result = run_cli(
        "prepare", "--merge", three_shards[0], tmp_path / "of-two", three_shards[2], "--out", tmp_path / "o"
    )
    one_line_error(result, "a shard of another prepare than")
    assert not (tmp_path / "o").exists()


def test_a_dataset_folder_is_not_a_shard(tmp_path, corpus, three_shards):
    folder, tok = corpus
    prepare_corpus([folder / "a.txt"], tmp_path / "data", tokenizer=tok, threads=1)
    result = run_cli("prepare", "--merge", tmp_path / "data", "--out", tmp_path / "o")
    one_line_error(result, f"{tmp_path / 'data'}: not a finished shard")


@pytest.mark.parametrize("value", ["3/3", "-1/2", "a/b", "1", "0/0", "1/", "/2", " "])
def test_bad_shard_values_are_one_line(tmp_path, corpus, value):
    folder, tok = corpus
    result = run_cli("prepare", folder, "--tokenizer", tok, "--shard", value, "--out", tmp_path / "o")
    one_line_error(result, "--shard")
    assert not (tmp_path / "o").exists()


def test_a_shard_needs_a_given_tokenizer(tmp_path, corpus):
    folder, _ = corpus
    result = run_cli("prepare", folder, "--shard", "0/2", "--out", tmp_path / "o")
    one_line_error(result, "--shard needs --tokenizer")
    assert not (tmp_path / "o").exists()


def test_merge_takes_no_shard(tmp_path, three_shards):
    result = run_cli("prepare", "--merge", *three_shards, "--shard", "0/3", "--out", tmp_path / "o")
    one_line_error(result, "--merge joins shard folders; it takes no --shard")


def test_inspect_names_a_shard_folder_as_one(three_shards):
    result = run_cli("inspect", three_shards[0])
    one_line_error(result, f"{three_shards[0]} is a shard folder of `lmtools prepare --shard`, not a dataset")


def test_worker_processes_encode_with_tokenizers_where_tiktoken_cannot(tmp_path, corpus):
    from tokenizers import Tokenizer, normalizers

    folder, tok = corpus
    nfc = Tokenizer.from_file(str(tok))
    nfc.normalizer = normalizers.NFC()  # no tiktoken for this one: `tokenizers` encodes
    nfc.save(str(tmp_path / "nfc.json"))
    one = prepare_corpus([folder], tmp_path / "one", tokenizer=tmp_path / "nfc.json", threads=1)
    many = prepare_corpus([folder], tmp_path / "many", tokenizer=tmp_path / "nfc.json", threads=2, unit_bytes=UNIT)
    assert one["encoder"] == many["encoder"] == "tokenizers"
    assert_same_files(tmp_path / "one", tmp_path / "many")
