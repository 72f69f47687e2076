"""`demo`: the stdlib corpus, the time budget, the output folder, and one tiny end-to-end run."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from lmtools.checkpoint import read_checkpoint
from lmtools.demo import (
    EVAL_ITERS,
    EVALS,
    MARKER,
    SKIP_DIRS,
    claim_folder,
    iterations_for,
    stdlib_sources,
    write_stdlib_corpus,
)
from lmtools.errors import ConfigError
from lmtools.generate import load_model


def test_stdlib_sources_leave_tests_out():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()
    assert root / "json" / "decoder.py" in files and root / "os.py" in files
    assert len(set(files)) == len(files) > 100
    for path in files:
        parts = path.relative_to(root).parts
        assert path.suffix == ".py" and not path.name.startswith("test_")
        assert not SKIP_DIRS.intersection(parts[:-1]), path


def test_corpus_is_capped_and_jsonl(tmp_path):
    cap = 300_000
    n_files, n_bytes = write_stdlib_corpus(tmp_path / "c.jsonl", cap, seed=1)
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) == n_files > 5
    assert n_bytes == sum(len(t.encode()) for t in texts) <= cap
    assert n_bytes > 0.9 * cap  # small modules fill the gap a big one left
    assert all(texts) and sum("def " in t for t in texts) > n_files // 2
    # The seed picks the modules; the same seed picks the same ones.
    assert write_stdlib_corpus(tmp_path / "d.jsonl", cap, seed=1) == (n_files, n_bytes)
    assert (tmp_path / "d.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()


def test_iterations_fit_the_budget():
    step = 0.5
    n = iterations_for(180, step)
    # EVALS evaluations during the run and one before it (iter 0).
    assert n == int((180 - (EVALS + 1) * EVAL_ITERS * step / 3) / (step * 1.06))
    assert n * step * 1.06 + (EVALS + 1) * EVAL_ITERS * step / 3 <= 180
    assert iterations_for(360, step) > 2 * n - 5
    assert iterations_for(1, 10.0) == 10  # never fewer than 10 steps


def test_claim_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not empty and was not written by lmtools demo"):
        claim_folder(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"

    demo = tmp_path / "demo"
    claim_folder(demo)
    assert (demo / MARKER).is_file()
    (demo / "run").mkdir()
    (demo / "run" / "metrics.jsonl").write_text('{"iter": 1, "loss": 9}\n')
    (demo / "loss.png").write_bytes(b"old")
    (demo / "notes.txt").write_text("kept")
    claim_folder(demo)  # an earlier demo's outputs go, so two runs never mix in metrics.jsonl
    assert not (demo / "run").exists() and not (demo / "loss.png").exists()
    assert (demo / "notes.txt").read_text() == "kept"

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        claim_folder(tmp_path / "file")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, run_cli):
    out = tmp_path / "demo"
    result = run_cli("demo", "--minutes", "0.2", "--max_corpus_mb", "0.4", "--vocab-size", "512", "--out", out)
    assert result.exit_code == 0, result.output
    for name in (
        "corpus.jsonl",
        "data/train.npy",
        "data/val.npy",
        "data/meta.json",
        "data/tokenizer.json",
        "run/checkpoint.pt",
        "run/metrics.jsonl",
        "loss.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 2
    assert records[-1]["loss"] < records[0]["loss"]
    payload = read_checkpoint(out / "run" / "checkpoint.pt")
    assert payload["iteration"] == records[-1]["iter"] >= 2
    assert payload["model_config"]["vocab_size"] == 512
    model, _ = load_model(out / "run" / "checkpoint.pt", torch.device("cpu"))
    assert model.num_parameters() > 0

    text = result.stdout
    assert "Try next:" in text and f"lmtools inspect {out / 'run' / 'checkpoint.pt'}" in text
    assert f"lmtools plot {out / 'run'}" in text and "--max_iters" in text
    done = next(line for line in text.splitlines() if line.startswith("Done in"))
    first, last = (float(x) for x in done.split(": loss ")[1].split(",")[0].split(" -> "))
    assert last < first
