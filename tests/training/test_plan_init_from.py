"""`train --init_from`: a new run from trained weights, and the flags a resumed run cannot honour."""

import hashlib
import json
import math

import pytest
import torch

from helpers import TINY_MODEL, flags, one_line_error, run_cli
from lmtools.checkpoint import read_checkpoint
from lmtools.data.loader import BatchLoader
from lmtools.model import TransformerLM
from lmtools.training.optim import cross_entropy
from prepared import documents, prepare, write_jsonl

MODEL = flags(TINY_MODEL)
RUN = flags(batch_size=8, warmup_iters=1, learning_rate=3e-3, eval_iters=2, log_interval=2, eval_interval=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`base`: a run trained 20 steps on `plays`; `fine`: new data with the same tokenizer;
    `code`: another tokenizer of the same size; `wide`: a tokenizer of another size."""
    root = tmp_path_factory.mktemp("init")
    prepare(
        write_jsonl(root / "plays.jsonl", documents(300, 0)), root / "plays", "--vocab_size", 300, "--val_fraction", 0.1
    )
    prepare(
        write_jsonl(root / "fine.jsonl", documents(150, 5)),
        root / "fine",
        "--tokenizer",
        root / "plays" / "tokenizer.json",
        "--val_fraction",
        0.1,
    )
    prepare(
        write_jsonl(root / "code.jsonl", documents(300, 2)), root / "code", "--vocab_size", 300, "--val_fraction", 0.1
    )
    prepare(
        write_jsonl(root / "wide.jsonl", documents(300, 4)), root / "wide", "--vocab_size", 320, "--val_fraction", 0.1
    )
    result = run_cli(
        "train",
        "--train_data",
        root / "plays",
        *MODEL,
        *RUN,
        "--max_iters",
        20,
        "--checkpoint_path",
        root / "base" / "ckpt.pt",
    )
    assert result.exit_code == 0, result.output
    return root


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_from_starts_a_new_run_from_the_weights(world, tmp_path):
    base = world / "base" / "ckpt.pt"
    before = digest(base)
    ckpt = tmp_path / "fine" / "ckpt.pt"
    # No model flags: the shape comes from the checkpoint (the defaults would be d_model 768, 12 layers).
    result = run_cli(
        "train", "--init_from", base, "--train_data", world / "fine", *RUN, "--max_iters", 4, "--checkpoint_path", ckpt
    )
    assert result.exit_code == 0, result.output
    assert f"Initialised from checkpoint {base}" in result.output
    payload = read_checkpoint(ckpt)
    base_payload = read_checkpoint(base)
    assert payload["model_config"] == base_payload["model_config"]
    assert payload["config"]["init_from"] == str(base) and payload["iteration"] == 4
    assert payload["config"]["train_data"] == [str(world / "fine" / "train.npy")]
    from lmtools.inspection import inspect_path

    assert inspect_path(ckpt)["data"]["init_from"] == str(base)
    # A fresh optimizer: 4 steps of its own, not 20 + 4.
    assert {int(s["step"]) for s in payload["optimizer_state_dict"]["state"].values()} == {4}
    # A fresh schedule: warmup from iter 0 again.
    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 2, 4] and records[0]["lr"] == 0.0

    # The iter-0 loss is the base model's loss on the new run's first batch: its weights were loaded.
    model = TransformerLM.from_config(base_payload["model_config"])
    model.load_state_dict(base_payload["model_state_dict"])
    x, y = BatchLoader([str(world / "fine" / "train.npy")], 8, 16, seed=0, prefetch=0).batch_at(0)
    with torch.no_grad():
        expected = float(cross_entropy(model(x), y))
    assert records[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # Trained weights, not a new model's (whose loss is about ln(300) = 5.70).
    assert records[0]["loss"] < math.log(300) - 0.3
    assert digest(base) == before


def test_init_optimizer_takes_over_the_optimizer_state(world, tmp_path):
    ckpt = tmp_path / "c.pt"
    result = run_cli(
        "train",
        "--init_from",
        world / "base" / "ckpt.pt",
        "--init_optimizer",
        "--train_data",
        world / "fine",
        *RUN,
        "--max_iters",
        2,
        "--checkpoint_path",
        ckpt,
    )
    assert result.exit_code == 0, result.output
    assert "its optimizer state" in result.output
    assert {int(s["step"]) for s in read_checkpoint(ckpt)["optimizer_state_dict"]["state"].values()} == {22}


@pytest.mark.parametrize(
    "data, extra, needle",
    [
        ("wide", [], "has a vocabulary of 300 ids but --train_data's has 320"),
        ("code", [], "another tokenizer"),
        ("fine", ["--d_model", "64"], "--d_model 64 contradicts --init_from"),
        ("fine", ["--init_optimizer", "--resume"], "drop one of them"),
    ],
)
def test_init_from_refuses_what_does_not_fit(world, tmp_path, data, extra, needle):
    base = world / "base" / "ckpt.pt"
    ckpt = tmp_path / "c.pt"
    if "--resume" in extra:
        ckpt = base
    before = digest(base)
    line = one_line_error(
        run_cli(
            "train",
            "--init_from",
            base,
            "--train_data",
            world / data,
            *RUN,
            *extra,
            "--max_iters",
            2,
            "--checkpoint_path",
            ckpt,
        )
    )
    assert needle in line, line
    assert digest(base) == before and (ckpt == base or not ckpt.exists())


def test_init_from_into_its_own_checkpoint_path_is_refused(world):
    base = world / "base" / "ckpt.pt"
    line = one_line_error(
        run_cli("train", "--init_from", base, "--train_data", world / "fine", "--overwrite", "--checkpoint_path", base)
    )
    assert "its own --checkpoint_path" in line


@pytest.mark.parametrize("what", ["token file", "prepared folder", "folder without config.json"])
def test_init_from_something_else_than_a_checkpoint(world, tmp_path, what):
    src = {
        "token file": world / "fine" / "train.npy",
        "prepared folder": world / "fine",
        "folder without config.json": tmp_path,
    }[what]
    line = one_line_error(
        run_cli("train", "--init_from", src, "--train_data", world / "fine", "--checkpoint_path", tmp_path / "c.pt")
    )
    assert str(src) in line and ("not a checkpoint" in line or "config.json" in line), line


def test_init_from_a_hugging_face_folder(world, tmp_path):
    """`lmtools export` writes a Llama folder; --init_from reads it back through lmtools.interop.hf."""
    base = world / "base" / "ckpt.pt"
    hf = tmp_path / "hf"
    result = run_cli("export", base, "--out", hf)
    assert result.exit_code == 0, result.output
    assert (hf / "config.json").is_file()
    ckpt = tmp_path / "tuned" / "ckpt.pt"
    result = run_cli(
        "train", "--init_from", hf, "--train_data", world / "fine", *RUN, "--max_iters", 2, "--checkpoint_path", ckpt
    )
    assert result.exit_code == 0, result.output
    assert f"Initialised from Hugging Face folder {hf}" in result.output
    payload, base_payload = read_checkpoint(ckpt), read_checkpoint(base)
    assert payload["config"]["init_from"] == str(hf)
    assert {k: payload["model_config"][k] for k in ("vocab_size", "d_model", "num_layers", "d_ff")} == {
        k: base_payload["model_config"][k] for k in ("vocab_size", "d_model", "num_layers", "d_ff")
    }
    # Export then import is exact: the iter-0 loss is the base model's on the new run's first batch.
    records = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    model = TransformerLM.from_config(base_payload["model_config"])
    model.load_state_dict(base_payload["model_state_dict"])
    x, y = BatchLoader([str(world / "fine" / "train.npy")], 8, 16, seed=0, prefetch=0).batch_at(0)
    with torch.no_grad():
        assert records[0]["loss"] == pytest.approx(float(cross_entropy(model(x), y)), rel=1e-5)
    # Its optimizer state cannot be taken over: a Hugging Face folder holds none.
    line = one_line_error(
        run_cli(
            "train",
            "--init_from",
            hf,
            "--init_optimizer",
            "--train_data",
            world / "fine",
            "--checkpoint_path",
            tmp_path / "other.pt",
        )
    )
    assert "holds no optimizer state" in line
    # Data tokenized otherwise is refused as from a checkpoint.
    line = one_line_error(
        run_cli("train", "--init_from", hf, "--train_data", world / "code", "--checkpoint_path", tmp_path / "other.pt")
    )
    assert "another tokenizer" in line


@pytest.mark.parametrize(
    "flag, value",
    [("--train_data", "fine"), ("--val_data", "fine/val.npy"), ("--seed", "3"), ("--batch_size", "4")],
)
def test_resume_refuses_a_flag_it_cannot_honour_and_names_init_from(world, tmp_path, flag, value):
    base = world / "base" / "ckpt.pt"
    before = digest(base)
    value = str(world / value) if "fine" in value else value
    args = ["train", "--resume", "--checkpoint_path", base, flag, value]
    if flag != "--train_data":
        args += ["--train_data", world / "plays"]
    line = one_line_error(run_cli(*args))
    assert flag in line and "--init_from" in line, line
    assert digest(base) == before


def test_resume_with_the_same_data_spelled_as_its_folder(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "base", run)
    result = run_cli(
        "train", "--resume", "--checkpoint_path", run / "ckpt.pt", "--train_data", world / "plays", "--max_iters", 22
    )
    assert result.exit_code == 0, result.output
    assert read_checkpoint(run / "ckpt.pt")["iteration"] == 22
