"""`lmtools eval` on text reads it as the checkpoint's training data was read by `prepare`
(separator, separator line, jsonl field, parquet column), so that a held-out text scores exactly
as the token file prepare makes from it."""

import gzip
import json

import numpy as np
import pytest

from helpers import TINY_MODEL, cli_output, flags, one_line_error, run_cli
from lmtools import scoring
from lmtools.checkpoint import read_checkpoint, tokenizer_from_checkpoint
from lmtools.data.corpus import ReadOptions
from lmtools.layout import EOT
from models import random_model, write_checkpoint
from prepared import documents, prepare
from texts import eot_joined


def fortunes(docs: list[str]) -> str:
    """A fortune file: each document followed by a line holding only `%`."""
    return "".join(doc + "%\n" for doc in docs)


def held_out_documents() -> list[str]:
    # Text that a separator line must not split: a "%" inside a line, a line "%%", and the
    # literal end-of-text marker (ordinary text when the separator is another).
    docs = documents(12, seed=7, size=300)
    docs[2] = "Half off: 50% today.\n%%\n" + docs[2]
    docs[5] = docs[5] + "as the dumps spell it: <|endoftext|> and on\n"
    return docs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A `%`-separated corpus prepared with `--separator_line %`, a tiny model trained on it, and
    a held-out fortune file with the token file prepare makes from it (no validation split)."""
    root = tmp_path_factory.mktemp("fortunes")
    (root / "corpus.txt").write_text(fortunes(documents(150, seed=3, size=300)), encoding="utf-8")
    prepare(root / "corpus.txt", root / "data", "--separator_line", "%", "--vocab_size", 320, "--threads", 1)
    ckpt = root / "run" / "ckpt.pt"
    options = dict(batch_size=4, max_iters=6, warmup_iters=1, learning_rate=3e-3, eval_interval=6, eval_iters=1)
    cli_output(
        "train", "--train_data", root / "data", *flags(TINY_MODEL, options, log_interval=3, checkpoint_path=ckpt)
    )
    held = root / "heldout.txt"
    held.write_text(fortunes(held_out_documents()), encoding="utf-8")
    tokenizer = root / "data" / "tokenizer.json"
    args = ("--tokenizer", tokenizer, "--separator_line", "%", "--val_fraction", 0, "--threads", 1)
    meta = prepare(held, root / "held", *args)
    assert meta["documents"] == 12 and meta["val_tokens"] == 0
    return root, ckpt


def eval_json(*args) -> dict:
    return json.loads(cli_output("eval", *args, "--json"))


def test_the_checkpoint_records_how_its_training_text_was_read(run):
    _, ckpt = run
    assert read_checkpoint(ckpt)["data_reading"] == {
        "separator": None,
        "separator_line": "%",
        "text_field": "text",
        "text_column": "text",
    }


@pytest.mark.parametrize("stride", [16, 5])
def test_held_out_text_scores_as_the_token_file_prepare_makes_from_it(run, stride):
    root, ckpt = run
    report = eval_json(ckpt, root / "heldout.txt", root / "held" / "train.npy", "--stride", stride)
    text, tokens = report["files"]
    meta = json.loads((root / "held" / "meta.json").read_text())
    assert text["tokens"] == tokens["tokens"] == meta["train_tokens"] and text["documents"] == 12
    assert text["scored"] == tokens["scored"] == meta["train_tokens"] - 1
    assert text["loss"] == pytest.approx(tokens["loss"], abs=1e-6)
    # Bytes counted as prepare counts them (meta.json rounds its bytes per token to 4 places).
    assert text["bytes_per_token"] == pytest.approx(meta["bytes_per_token"], abs=5e-5)
    assert text["bits_per_byte"] == pytest.approx(tokens["bits_per_byte"], rel=1e-4)
    reading = report["text_reading"]
    assert (reading["origin"], reading["separator_line"], reading["separator"]) == ("checkpoint", "%", None)
    assert reading["description"] == "read as the training data was: separator line '%'"


def test_the_table_says_how_the_text_was_read(run):
    root, ckpt = run
    out = cli_output("eval", ckpt, root / "heldout.txt")
    assert "text read as the training data was: separator line '%'" in out
    out = cli_output("eval", ckpt, root / "held" / "train.npy")
    assert "text read" not in out  # no text file: nothing to say


def test_another_reading_scores_other_tokens_and_says_so(run):
    root, ckpt = run
    held = root / "heldout.txt"
    right = eval_json(ckpt, held)["files"][0]
    same = eval_json(ckpt, held, "--separator_line", "%")  # the flag says what the record says
    assert same["files"][0]["tokens"] == right["tokens"] and same["text_reading"]["origin"] == "checkpoint"
    # The "%" lines kept as text (in one document, or two where the text spells the marker), or
    # as many documents, each without its last newline.
    for args, how, n_docs in (
        (("--separator", "none"), "one document per text file", 1),
        (("--separator", "<|endoftext|>"), "separator '<|endoftext|>'", 2),  # prepare's default
        (("--separator", "\\n%\\n"), "separator '\\n%\\n'", 12),  # escapes read as prepare reads them
    ):
        report = eval_json(ckpt, held, *args)
        wrong, reading = report["files"][0], report["text_reading"]
        assert reading["origin"] == "flags" and reading["separator_line"] is None
        assert reading["description"] == (
            f"read as the flags say: {how}; the training data was read with separator line '%'"
        )
        assert wrong["documents"] == n_docs and wrong["tokens"] != right["tokens"]
    assert reading["separator"] == "\n%\n"


def test_jsonl_parquet_and_gzip_score_as_the_same_documents_in_text(run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, ckpt = run
    docs = held_out_documents()
    with open(root / "held.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"body": doc}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"body": docs}), root / "held.parquet")
    with gzip.open(root / "held.txt.gz", "wt", encoding="utf-8") as f:
        f.write(fortunes(docs))
    files = (root / "heldout.txt", root / "held.jsonl", root / "held.parquet", root / "held.txt.gz")
    report = eval_json(ckpt, *files, "--text_field", "body", "--text_column", "body")
    text, *others = report["files"]
    for other in others:
        assert (other["tokens"], other["scored"], other["documents"]) == (text["tokens"], text["scored"], 12)
        assert other["loss"] == pytest.approx(text["loss"], abs=1e-6)
        assert other["bits_per_byte"] == pytest.approx(text["bits_per_byte"], rel=1e-9)
    assert report["text_reading"]["description"] == (
        "read as the flags say: separator line '%', jsonl field 'body', parquet column 'body'; "
        "the training data was read with separator line '%', jsonl field 'text', parquet column 'text'"
    )
    # Without the field: the file's fields named, and the flag that chooses one.
    line = one_line_error(run_cli("eval", ckpt, root / "held.jsonl"), "no field 'text'")
    assert "'body'" in line and "--text_field" in line


def test_a_checkpoint_without_a_record_reads_text_as_prepare_does_by_default(tmp_path):
    # A run on bare token files records no reading: text is split at <|endoftext|>.
    ckpt = write_checkpoint(tmp_path / "c.pt", random_model())
    docs = documents(3, seed=1, size=200)
    (tmp_path / "eot.txt").write_text("".join(doc + EOT for doc in docs), encoding="utf-8")
    (tmp_path / "fortunes.txt").write_text(fortunes(docs), encoding="utf-8")
    report = eval_json(ckpt, tmp_path / "eot.txt", tmp_path / "fortunes.txt")
    eot, fortune = report["files"]
    assert eot["documents"] == 3 and fortune["documents"] == 1
    assert report["text_reading"]["origin"] == "defaults" and report["text_reading"]["training_data"] is None
    assert report["text_reading"]["description"].startswith("read as prepare reads by default")
    told = eval_json(ckpt, tmp_path / "fortunes.txt", "--separator_line", "%")
    assert told["files"][0]["tokens"] == eot["tokens"] and told["files"][0]["loss"] == pytest.approx(eot["loss"])
    assert told["text_reading"]["description"] == "read as the flags say: separator line '%'"


def test_text_ids_are_prepare_s_whatever_the_batches(run, monkeypatch, tmp_path):
    # Layouts prepare reads with care: CRLF line ends, whitespace between separators (an empty
    # document, skipped), text before the first separator and after the last.
    root, ckpt = run
    tok = tokenizer_from_checkpoint(read_checkpoint(ckpt))
    docs = documents(30, seed=5, size=120)
    text = "  \n" + eot_joined(docs[:10]) + " \n\t" + EOT + eot_joined(docs[10:]).replace("\n", "\r\n") + "tail"
    path = tmp_path / "layout.txt"
    path.write_bytes(text.encode("utf-8"))
    for options in (ReadOptions(), ReadOptions(separator="\n\n")):
        args = ["--separator", options.separator.replace("\r", "\\r").replace("\n", "\\n")]
        tokenizer = root / "data" / "tokenizer.json"
        meta = prepare(path, tmp_path / "p", "--tokenizer", tokenizer, "--val_fraction", 0, *args, "--force")
        expected = np.load(tmp_path / "p" / "train.npy")
        assert meta["documents"] > 1 and not meta.get("duplicate_documents")  # prepare kept every one
        for batch in (1, 333, scoring.TEXT_BATCH):
            monkeypatch.setattr(scoring, "TEXT_BATCH", batch)
            ids, kind, bpt, _ = scoring.read_file(path, lambda: tok, meta["vocab_size"], options)
            assert np.array_equal(ids, expected), (options, batch)
            assert bpt == pytest.approx(meta["bytes_per_token"], abs=5e-5)


@pytest.mark.parametrize(
    "args, says",
    [
        (("--separator", ""), "--separator must not be empty (`none` turns splitting off)"),
        (("--separator", "x", "--separator_line", "%"), "give --separator or --separator_line, not both"),
        (("--separator_line", ""), "--separator_line '' must be one non-empty line of text"),
        (("--separator_line", "a\nb"), "--separator_line 'a\\nb' must be one non-empty line of text"),
    ],
)
def test_bad_reading_flags_are_one_line_errors(tmp_path, args, says):
    ckpt = write_checkpoint(tmp_path / "c.pt", random_model())
    (tmp_path / "a.txt").write_text("hello there")
    one_line_error(run_cli("eval", ckpt, tmp_path / "a.txt", *args), says)
