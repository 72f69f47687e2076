"""The first thing a run shows: the initial loss and the validation loss before training, in
the console, in metrics.jsonl and in the plot; and timings on logs without a progress bar."""

import json
import math
import subprocess
import sys

import pytest

from helpers import TINY_MODEL, flags, run_cli, train_config
from lmtools.config.train_config import TrainConfig
from lmtools.plot import read_curves
from lmtools.training.trainer import train_model
from prepared import documents, prepare, write_eot_text

# A tiny model, four steps, a log line and a validation loss every two: the quick start in seconds.
FOUR_STEPS_EVAL_EVERY_TWO = flags(
    TINY_MODEL, batch_size=8, warmup_iters=1, max_iters=4, log_interval=2, eval_interval=2, eval_iters=1
)
# Six steps, a log line and a validation loss every three.
SIX_STEPS_EVAL_EVERY_THREE = dict(
    batch_size=8, warmup_iters=2, learning_rate=3e-3, max_iters=6, log_interval=3, eval_interval=3, eval_iters=2
)


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """One text file of documents joined by <|endoftext|>, prepared by `lmtools prepare`."""
    root = tmp_path_factory.mktemp("plays")
    corpus = write_eot_text(root / "plays.txt", documents(300, 0))
    meta = prepare(corpus, root / "data", "--vocab_size", 300, "--separator", "<|endoftext|>", "--val_fraction", 0.1)
    assert meta["val_tokens"] > 1000
    return root / "data"


def config(data, tmp_path, **kw) -> TrainConfig:
    return train_config(data, tmp_path / "run" / "ckpt.pt", **(SIX_STEPS_EVAL_EVERY_THREE | kw))


@pytest.mark.parametrize("accum", [1, 2])
def test_iter_0_is_the_initial_loss_and_validation_before_training(plays, tmp_path, accum):
    lines = []
    result = train_model(config(plays, tmp_path, grad_accum_steps=accum), log=lines.append)
    iters = [line for line in lines if line.startswith("Iter")]
    assert iters[0].startswith("Iter      0 | Loss: ") and "| Val Loss: " in iters[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 3, 6]
    first = records[0]
    # A new model's loss is about ln(vocab): the user's first sanity check.
    assert abs(first["loss"] - math.log(300)) < 0.3 and abs(first["val_loss"] - math.log(300)) < 0.3
    # It is the loss the first update computed: the same batches under the same weights.
    assert first["loss"] == pytest.approx(result.losses[0], rel=1e-6)
    assert first["lr"] == 0.0 and first["val_bpb"] > 0
    assert f"Loss: {first['loss']:.4f}" in iters[0] and f"Val Loss: {first['val_loss']:.4f}" in iters[0]


def test_the_plot_starts_at_iter_0(plays, tmp_path):
    train_model(config(plays, tmp_path), log=lambda _l: None)
    curves = read_curves(tmp_path / "run")
    assert curves.train[0][0] == 0 and curves.val[0][0] == 0
    assert curves.val[0][1] == pytest.approx(math.log(300), abs=0.3)


def test_iter_0_without_validation_and_not_again_on_resume(tmp_path, plays):
    import shutil

    shutil.copy(plays / "train.npy", tmp_path / "tokens.npy")  # a bare token file: no val.npy beside it
    lines = []
    cfg = config(tmp_path / "tokens.npy", tmp_path, vocab_size=300, max_iters=3)
    train_model(cfg, log=lines.append)
    iters = [line for line in lines if line.startswith("Iter")]
    assert [line.split("|")[0].strip() for line in iters] == ["Iter      0", "Iter      3"]
    assert "Val Loss" not in iters[0] and abs(float(iters[0].split("Loss:")[1].split("|")[0]) - math.log(300)) < 0.3
    result = run_cli("resume", tmp_path / "run" / "ckpt.pt", "--max_iters", "6")
    assert result.exit_code == 0, result.output
    assert [line.split("|")[0].strip() for line in result.output.splitlines() if line.startswith("Iter")] == [
        "Iter      6"
    ]


def test_a_log_written_to_a_file_carries_elapsed_and_remaining_time(plays, tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmtools.cli",
                "train",
                "--train_data",
                str(plays),
                *FOUR_STEPS_EVAL_EVERY_TWO,
                "--checkpoint_path",
                str(tmp_path / "run" / "ckpt.pt"),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert proc.returncode == 0, log.read_text()
    iters = [line for line in log.read_text().splitlines() if line.startswith("Iter")]
    assert [line.split("|")[0].strip() for line in iters] == ["Iter      0", "Iter      2", "Iter      4"]
    for line in iters[1:]:
        fields = dict(part.strip().split(": ", 1) for part in line.split("|")[1:])
        h, m, s = map(int, fields["elapsed"].split(":"))
        assert 0 <= m < 60 and 0 <= s < 60 and h == 0
        assert fields["left"].count(":") == 2
    assert iters[-1].endswith("left: 0:00:00")


def test_the_plot_draws_each_named_validation_set(plays, tmp_path):
    from lmtools.plot import plot_runs

    other = tmp_path / "other"
    prepare(
        write_eot_text(tmp_path / "other.txt", documents(150, 7)),
        other,
        "--tokenizer",
        plays / "tokenizer.json",
        "--separator",
        "<|endoftext|>",
        "--val_fraction",
        0.1,
    )
    cfg = config(plays, tmp_path)
    cfg.train_data = [str(plays), str(other)]
    train_model(cfg, log=lambda _l: None)
    curves = read_curves(tmp_path / "run")
    assert sorted(curves.val_sets) == ["data", "other"]
    assert [it for it, _ in curves.val_sets["other"]] == [0, 3, 6]
    out = plot_runs([tmp_path / "run"], tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("layout", ["one text file", "<|endoftext|>-separated"])
def test_the_quick_start_on_a_text_file_validates_from_the_first_step(tmp_path, layout):
    """`lmtools prepare corpus.txt` then `train --train_data data`: validation from iter 0."""
    docs = documents(400, 11)
    corpus = tmp_path / "corpus.txt"
    if layout == "one text file":
        corpus.write_text("\n\n".join(docs), encoding="utf-8")
    else:
        write_eot_text(corpus, docs)
    prepare(corpus, tmp_path / "data", "--vocab_size", 300)
    result = run_cli(
        "train",
        "--train_data",
        tmp_path / "data",
        *FOUR_STEPS_EVAL_EVERY_TWO,
        "--checkpoint_path",
        tmp_path / "run" / "ckpt.pt",
    )
    assert result.exit_code == 0, result.output
    iters = [line for line in result.output.splitlines() if line.startswith("Iter")]
    assert iters[0].startswith("Iter      0 |") and all("Val Loss:" in line for line in iters), result.output
