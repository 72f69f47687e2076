"""What a run trains and validates on: prepared folders in mixtures, per-folder validation,
and tokenizers that must agree. The folders are made by the real `lmtools prepare`."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_MODEL, flags, run_cli
from lmtools.checkpoint import read_checkpoint
from lmtools.config.train_config import TrainConfig
from lmtools.data.dataset import parse_source_spec, resolve_data, unique_names
from lmtools.errors import DataError
from prepared import documents, prepare, write_eot_text, write_jsonl

# A small model whose vocabulary comes from the prepared folders (no --vocab_size).
TINY_MIXTURE_RUN = flags(TINY_MODEL, batch_size=8, warmup_iters=1, learning_rate=3e-3, eval_iters=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """plays: its own BPE; more_plays: the same tokenizer; code: another BPE of the same size."""
    root = tmp_path_factory.mktemp("prepared")
    plays = prepare(
        write_jsonl(root / "plays.jsonl", documents(300, 0)), root / "plays", "--vocab_size", 300, "--val_fraction", 0.1
    )
    more = prepare(
        write_eot_text(root / "more.txt", documents(200, 1)),
        root / "more_plays",
        "--tokenizer",
        root / "plays" / "tokenizer.json",
        "--separator",
        "<|endoftext|>",
        "--val_fraction",
        0.1,
    )
    code = prepare(
        write_jsonl(root / "code.jsonl", documents(300, 2)), root / "code", "--vocab_size", 300, "--val_fraction", 0.1
    )
    assert plays["vocab_size"] == more["vocab_size"] == code["vocab_size"] == 300
    assert min(plays["val_tokens"], more["val_tokens"]) > 1000
    return root


def train(*args):
    return run_cli("train", *args)


@pytest.mark.parametrize("weighted", [True, False])
def test_prepared_folders_in_a_mixture_train_on_train_npy_and_validate_each(folders, tmp_path, weighted):
    plays, more = folders / "plays", folders / "more_plays"
    specs = [f"{plays}:0.7", f"{more}:0.3"] if weighted else [plays, more]
    ckpt = tmp_path / "run" / "ckpt.pt"
    result = train(
        "--train_data",
        specs[0],
        "--train_data",
        specs[1],
        *TINY_MIXTURE_RUN,
        "--max_iters",
        4,
        "--log_interval",
        2,
        "--eval_interval",
        2,
        "--checkpoint_path",
        ckpt,
    )
    assert result.exit_code == 0, result.output
    payload = read_checkpoint(ckpt)
    config = payload["config"]
    suffix = [":0.7", ":0.3"] if weighted else ["", ""]
    assert config["train_data"] == [f"{plays / 'train.npy'}{suffix[0]}", f"{more / 'train.npy'}{suffix[1]}"]
    # Only the train splits are sampled: their token counts, never val.npy's.
    meta = {name: json.loads((folders / name / "meta.json").read_text()) for name in ("plays", "more_plays")}
    assert payload["sampler"]["num_tokens"] == meta["plays"]["train_tokens"] + meta["more_plays"]["train_tokens"]
    assert config["val_data"] is None
    assert config["val_sets"] == {"plays": str(plays / "val.npy"), "more_plays": str(more / "val.npy")}
    assert config["tokenizer"] == str(plays / "tokenizer.json")
    from lmtools.inspection import inspect_path

    assert inspect_path(ckpt)["data"]["val_sets"] == config["val_sets"]

    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 2, 4]
    sizes = {name: meta[name]["val_tokens"] for name in meta}
    for r in records:
        mean = (r["val/plays"] * sizes["plays"] + r["val/more_plays"] * sizes["more_plays"]) / sum(sizes.values())
        assert r["val_loss"] == pytest.approx(mean, rel=1e-9)
        assert r["val/plays"] != r["val/more_plays"]
    lines = [line for line in result.output.splitlines() if line.startswith("Iter")]
    assert all("| Val Loss: " in line and "| val/plays: " in line and "| val/more_plays: " in line for line in lines)
    first = lines[0]
    assert float(first.split("val/plays:")[1].split("|")[0]) == pytest.approx(records[0]["val/plays"], abs=1e-4)


def test_one_prepared_folder_with_a_weight_is_its_train_npy(folders, tmp_path):
    plays = folders / "plays"
    cfg, _data = resolve_data(TrainConfig(train_data=[f"{plays}:2"], context_length=16), explicit_vocab=False)
    assert cfg.train_data == [f"{plays / 'train.npy'}:2.0"]
    assert cfg.val_data == str(plays / "val.npy") and cfg.val_sets == {} and cfg.vocab_size == 300


def test_a_prepared_folder_beside_a_raw_token_file(folders, tmp_path):
    """A bare token file has no tokenizer to compare; the folder still brings its validation."""
    np.save(tmp_path / "extra.npy", np.arange(2000, dtype=np.uint16) % 300)
    plays = folders / "plays"
    cfg, _data = resolve_data(
        TrainConfig(train_data=[f"{plays}:0.5", f"{tmp_path / 'extra.npy'}:0.5"], context_length=16),
        explicit_vocab=False,
    )
    assert cfg.train_data[0] == f"{plays / 'train.npy'}:0.5"
    assert cfg.val_data == str(plays / "val.npy") and cfg.vocab_size == 300


def test_sources_with_different_tokenizers_are_refused_naming_both(folders, tmp_path):
    ckpt = tmp_path / "c.pt"
    result = train(
        "--train_data",
        f"{folders / 'plays'}:0.5",
        "--train_data",
        f"{folders / 'code'}:0.5",
        *TINY_MIXTURE_RUN,
        "--max_iters",
        1,
        "--checkpoint_path",
        ckpt,
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "different tokenizers" in lines[0], result.stderr
    assert (
        str(folders / "plays" / "tokenizer.json") in lines[0] and str(folders / "code" / "tokenizer.json") in lines[0]
    )
    assert not ckpt.exists()


def test_sources_with_different_vocabulary_sizes_are_refused(folders, tmp_path):
    small = tmp_path / "small"
    prepare(write_jsonl(tmp_path / "s.jsonl", documents(100, 3)), small, "--vocab_size", 280, "--val_fraction", 0.1)
    result = train(
        "--train_data",
        folders / "plays",
        "--train_data",
        small,
        *TINY_MIXTURE_RUN,
        "--max_iters",
        1,
        "--checkpoint_path",
        tmp_path / "c.pt",
    )
    assert result.exit_code == 2 and "300 vs 280 ids" in result.stderr, result.output


def test_folder_names_are_told_apart():
    from pathlib import Path

    assert unique_names([Path("/a/x/data"), Path("/a/y/data")]) == ["x/data", "y/data"]
    assert unique_names([Path("/a/plays"), Path("/b/code")]) == ["plays", "code"]


def test_a_text_file_as_training_data_gives_the_prepare_command(tmp_path):
    corpus = write_eot_text(tmp_path / "corpus.txt", documents(20, 0))
    result = train("--train_data", corpus, *TINY_MIXTURE_RUN, "--checkpoint_path", tmp_path / "c.pt")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is text, not token data" in lines[0] and f"lmtools prepare {corpus}" in lines[0]
    # The same for text with no telling suffix.
    (tmp_path / "shakespeare").write_text(corpus.read_text())
    result = train("--train_data", tmp_path / "shakespeare", *TINY_MIXTURE_RUN, "--checkpoint_path", tmp_path / "c.pt")
    assert result.exit_code == 2 and "lmtools prepare" in result.stderr


# --------------------------------------------------------------------------------------------
# parse_source_spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("web.npy:0.7", ("web.npy", 0.7)),
        ("web.npy", ("web.npy", None)),
        ("data/shards/:2", ("data/shards/", 2.0)),
        ("C:\\data\\train.npy", ("C:\\data\\train.npy", None)),
        ("C:\\data\\train.npy:0.25", ("C:\\data\\train.npy", 0.25)),
        ("s3ish:bucket/file.npy", ("s3ish:bucket/file.npy", None)),
        (" web.npy:1e-1 ", ("web.npy", 0.1)),
    ],
)
def test_parse_source_spec(spec: str, expected: tuple[str, float | None]) -> None:
    assert parse_source_spec(spec) == expected


@pytest.mark.parametrize("spec", ["web.npy:0", "web.npy:-1", "web.npy:nan", "web.npy:inf", ":0.5", ""])
def test_parse_source_spec_rejects(spec: str) -> None:
    with pytest.raises(DataError):
        parse_source_spec(spec)


@pytest.fixture
def meta_reads(monkeypatch):
    """Every read of a meta.json's settings (`read_meta`, wherever it was imported to). The
    data fingerprint hashes the file's bytes apart from this: that is the check for a change."""
    import lmtools.data.dataset
    import lmtools.data.prepare

    reads, real = [], lmtools.data.prepare.read_meta

    def counted(path):
        meta = real(path)
        if meta is not None:
            reads.append(str(Path(meta["dir"]) / "meta.json"))
        return meta

    monkeypatch.setattr(lmtools.data.prepare, "read_meta", counted)
    monkeypatch.setattr(lmtools.data.dataset, "read_meta", counted)
    return reads


def test_a_run_reads_its_meta_json_once_when_it_is_planned(folders, tmp_path, meta_reads):
    """Vocabulary, validation set, tokenizer, the --doc_aligned end-of-text id and the bytes per
    token (bits per byte) all come from one read, for a new run and for its resume."""
    ckpt = tmp_path / "c.pt"
    run = (*flags(TINY_MODEL, batch_size=4, eval_interval=2, eval_iters=1, checkpoint_interval=2), "--doc_aligned")
    result = train("--train_data", folders / "more_plays", *run, "--max_iters", 2, "--checkpoint_path", ckpt)
    assert result.exit_code == 0, result.output
    assert meta_reads == [str(folders / "more_plays" / "meta.json")]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r for r in records)  # bytes per token came through
    meta_reads.clear()
    result = run_cli("resume", ckpt, "--max_iters", 4)
    assert result.exit_code == 0, result.output
    assert meta_reads == [str(folders / "more_plays" / "meta.json")]
    assert read_checkpoint(ckpt)["iteration"] == 4
