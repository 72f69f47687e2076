"""A user's whole journey through the CLI: prepare → train → resume → sample → inspect → plot."""

import json

import numpy as np
import pytest

from helpers import TINY_MODEL, cli_output, flags
from lmtools.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


def test_prepare_train_resume_sample_inspect_plot(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "café", "über"]
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
    data = tmp_path / "data"
    cli_output("prepare", corpus, "--out", data, "--vocab_size", "300", "--val_fraction", "0.1")
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] <= 300 and meta["val_documents"] >= 1

    ckpt = tmp_path / "run" / "ckpt.pt"
    # No --vocab_size and no --val_data: both come from the prepared folder.
    out = cli_output(
        "train",
        "--train_data",
        data / "train.npy",
        *flags(TINY_MODEL, context_length=32, batch_size=8, max_iters=20, warmup_iters=2, learning_rate=3e-3),
        *flags(eval_interval=10, eval_iters=2, log_interval=10),
        "--checkpoint_path",
        ckpt,
    )
    assert "val.npy" in out and f"vocab {meta['vocab_size']}" in out and "Val Loss" in out
    payload = read_checkpoint(ckpt)
    assert payload["tokenizer"].endswith("tokenizer.json")
    assert payload["model_config"]["vocab_size"] == meta["vocab_size"]
    assert payload["metrics"]["val_bpb"] > 0

    cli_output("resume", ckpt, "--max_iters", "30")
    assert read_checkpoint(ckpt)["iteration"] == 30

    a = cli_output("sample", ckpt, "--prompt", "the cat", "--max_new_tokens", "20", "--seed", "3")
    b = cli_output("sample", ckpt, "--prompt", "the cat", "--max_new_tokens", "20", "--seed", "3")
    assert a == b and a.startswith("the cat") and len(a.strip()) > len("the cat")

    report = json.loads(cli_output("inspect", ckpt, "--json"))
    assert report["iteration"] == 30
    report = json.loads(cli_output("inspect", data, "--json"))
    assert json.dumps(report).count(str(meta["train_tokens"])) >= 1

    cli_output("plot", ckpt.parent, "--out", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
