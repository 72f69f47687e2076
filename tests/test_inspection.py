"""`inspect`: what checkpoints, token files and prepared folders hold, and files that lie about it."""

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL, one_line_error, train_config
from lmtools import TransformerLM
from lmtools.config.train_config import TrainConfig
from lmtools.data.prepare import prepare_corpus
from lmtools.inspection import count_token, inspect_path, parameter_counts
from lmtools.training.schedule import run_get_lr_cosine_schedule
from lmtools.training.trainer import train_model

MODEL = TINY_MODEL | dict(num_layers=2)
DOCS = [
    f"def function_{i}(x):\n    '''Document {i} of the inspect corpus.'''\n    return x * {i} + {i % 7}\n" * (3 + i % 4)
    for i in range(40)
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    prepare_corpus([corpus], root / "data", vocab_size=300, val_fraction=0.1, seed=0)
    return root / "data"


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> tuple[Path, TrainConfig]:
    folder = tmp_path_factory.mktemp("run")
    schedule = dict(learning_rate=3e-3, min_learning_rate=3e-4, weight_decay=0.05, warmup_iters=4, max_iters=20)
    intervals = dict(eval_interval=10, eval_iters=2, log_interval=5, checkpoint_interval=10, keep_last=2)
    cfg = train_config(
        dataset / "train.npy", folder / "ckpt.pt", **MODEL, **schedule, **intervals, batch_size=4, seed=3
    )
    train_model(cfg, log=lambda _line: None)
    return folder / "ckpt.pt", cfg


# ---- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_report(run, dataset):
    ckpt, cfg = run
    r = inspect_path(ckpt)
    meta = json.loads((dataset / "meta.json").read_text())
    assert r["kind"] == "checkpoint" and r["sound"] is True and r["problems"] == []
    assert r["file_size"] == ckpt.stat().st_size and r["format_version"] == 1
    assert r["iteration"] == 20
    assert r["lmtools_version"] == "0.1.0" and r["torch_version"] == str(torch.__version__)
    assert r["model"] == dict(vocab_size=meta["vocab_size"], **MODEL, rope_theta=10000.0, weights_dtype="float32")

    v, d = meta["vocab_size"], MODEL["d_model"]
    p = r["parameters"]
    assert list(p) == ["token_embeddings", "layers", "ln_final", "lm_head", "total"]
    assert p["token_embeddings"] == v * d and p["lm_head"] == v * d and p["ln_final"] == d
    per_layer = 4 * d * d + 3 * d * MODEL["d_ff"] + 2 * d
    assert p["layers"] == MODEL["num_layers"] * per_layer
    assert p["total"] == TransformerLM(vocab_size=v, **MODEL).num_parameters()

    o = r["optimizer"]
    assert o["lr"] == pytest.approx(3e-4) and o["betas"] == [0.9, 0.95] and o["eps"] == 1e-8
    assert o["weight_decay"] == [0.05, 0.0] and o["param_groups"] == 2 and o["step"] == 20

    s = r["schedule"]
    assert (s["max_iters"], s["warmup_iters"], s["phase"], s["progress"], s["remaining_iters"]) == (
        20,
        4,
        "finished",
        1.0,
        0,
    )
    assert s["lr"] == pytest.approx(3e-4)

    assert r["metrics"]["iter"] == 20 and r["metrics"]["loss"] > 0
    assert r["data"]["train_data"] == [str((dataset / "train.npy").resolve())]
    assert r["data"]["sampler"]["step"] == 20 and r["data"]["sampler"]["seed"] == 3
    assert r["data"]["sampler"]["tokens_seen"] == 20 * 4 * 16
    assert r["tokenizer"]["found"] == str((dataset / "tokenizer.json").resolve())
    assert r["training"]["batch_size"] == 4 and r["training"]["skipped_steps"] == 0


def test_checkpoint_mid_schedule(run):
    ckpt, _ = run
    snap = ckpt.with_name("ckpt-00000010.pt")
    r = inspect_path(snap)
    s = r["schedule"]
    assert r["iteration"] == 10 and s["phase"] == "cosine decay" and s["remaining_iters"] == 10
    assert s["progress"] == 0.5
    assert s["lr"] == pytest.approx(run_get_lr_cosine_schedule(10, 3e-3, 3e-4, 4, 20))
    assert r["optimizer"]["lr"] == pytest.approx(s["lr"])  # the stored rate is the schedule's
    assert r["metrics"]["iter"] == 10


def test_checkpoint_problems_are_reported(run, tmp_path):
    ckpt, _ = run
    payload = torch.load(ckpt, weights_only=True)
    payload["model_state_dict"]["ln_final.weight"][0] = float("nan")
    payload["model_config"] = dict(payload["model_config"], d_ff=128)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    r = inspect_path(bad)
    assert r["sound"] is False
    assert any("non-finite" in p and "ln_final.weight" in p for p in r["problems"])
    assert any("do not match the model config" in p for p in r["problems"])


def test_parameter_counts_groups_by_top_module():
    m = TransformerLM(vocab_size=50, **MODEL)
    counts = parameter_counts(m.state_dict())
    assert counts["total"] == m.num_parameters() == sum(v for k, v in counts.items() if k != "total")


def test_cli_json_is_the_report(run, run_cli):
    ckpt, _ = run
    result = run_cli("inspect", ckpt, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(inspect_path(ckpt)))


def test_cli_table(run, run_cli):
    ckpt, _ = run
    result = run_cli("inspect", ckpt, terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.stdout
    total = inspect_path(ckpt)["parameters"]["total"]
    for needle in ("checkpoint", "token_embeddings", f"{total:,}", "finished", "sound", "yes"):
        assert needle in out, (needle, out)


# ---- token files and prepared folders ---------------------------------------------------------


def test_token_file_report(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    arr = np.load(dataset / "train.npy")
    r = inspect_path(dataset / "train.npy")
    assert r["kind"] == "token_file" and r["format"] == "npy" and r["sound"] is True
    assert r["tokens"] == len(arr) == meta["train_tokens"] and r["dtype"] == "uint16"
    assert (r["min_token"], r["max_token"]) == (int(arr.min()), int(arr.max()))
    assert r["vocab_size"] == meta["vocab_size"] and r["eot_id"] == meta["eot_id"]
    assert r["documents"] == meta["train_documents"] and r["documents_from"] == "meta.json"
    assert r["bytes_per_token"] == meta["bytes_per_token"]
    assert r["file_size"] == (dataset / "train.npy").stat().st_size
    # The excerpt is real text of the corpus, decoded from the file's first tokens.
    assert 100 <= len(r["excerpt"]) <= 200
    first = r["excerpt"].split("<|endoftext|>")[0]
    assert any(d.startswith(first) for d in DOCS)


def test_bare_token_file_counts_documents(dataset, tmp_path):
    shutil.copy(dataset / "train.npy", tmp_path / "tokens.npy")
    shutil.copy(dataset / "tokenizer.json", tmp_path / "tokenizer.json")
    meta = json.loads((dataset / "meta.json").read_text())
    r = inspect_path(tmp_path / "tokens.npy")
    assert r["documents"] == meta["train_documents"] and r["documents_from"].startswith("count")
    assert r["vocab_size"] == meta["vocab_size"] and "bytes_per_token" not in r


def test_raw_bin_needs_dtype(dataset, tmp_path, run_cli):
    arr = np.load(dataset / "val.npy")
    arr.tofile(tmp_path / "val.bin")
    result = run_cli("inspect", tmp_path / "val.bin", "--json", "--dtype", "uint16")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["format"] == "raw" and r["tokens"] == len(arr) and r["max_token"] == int(arr.max())
    one_line_error(run_cli("inspect", tmp_path / "val.bin"), "--dtype")
    one_line_error(run_cli("inspect", tmp_path / "val.bin", "--dtype", "float32"), "not a token dtype")


def test_tokens_beyond_vocabulary(tmp_path):
    np.save(tmp_path / "t.npy", np.array([1, 2, 700, 3], dtype=np.uint16))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 512}))
    r = inspect_path(tmp_path / "t.npy")
    assert r["sound"] is False and r["max_token"] == 700
    assert r["problems"] == ["token id 700 is beyond the vocabulary (512)"]


def test_count_token_in_chunks(monkeypatch):
    import lmtools.inspection as mod

    monkeypatch.setattr(mod, "_COUNT_CHUNK", 7)
    data = np.array([5, 1, 5, 5, 2, 3, 5, 0, 0, 5, 5, 1, 9, 5, 5, 5], dtype=np.uint16)
    assert count_token(data, 5) == int((data == 5).sum()) == 9


def test_dataset_report(dataset, run_cli):
    meta = json.loads((dataset / "meta.json").read_text())
    result = run_cli("inspect", dataset, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["kind"] == "dataset" and r["sound"] is True
    assert r["vocab_size"] == meta["vocab_size"] and r["eot_id"] == meta["eot_id"]
    assert r["tokens"] == meta["train_tokens"] + meta["val_tokens"]
    assert r["documents"] == len(DOCS) == meta["train_documents"] + meta["val_documents"]
    assert r["train"]["tokens"] == meta["train_tokens"] and r["val"]["tokens"] == meta["val_tokens"]
    assert r["sources"]["files"] == 1 and r["excerpt"]


def test_dataset_that_disagrees_with_its_meta(dataset, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["val_tokens"] += 5
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "tokenizer.json").unlink()
    r = inspect_path(folder)
    assert r["sound"] is False
    assert "tokenizer.json is missing" in r["problems"]
    assert any(p.startswith("val.npy holds") and "meta.json says" in p for p in r["problems"])


# ---- files that are not what they claim ------------------------------------------------------


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _bad_files(tmp: Path) -> list[tuple[Path, str]]:
    (tmp / "text.pt").write_text("this is not a checkpoint\n")
    np.save(tmp / "matrix.npy", np.zeros((3, 4), np.uint16))
    np.save(tmp / "floats.npy", np.zeros(10, np.float32))
    (tmp / "random.npy").write_bytes(bytes(range(256)) * 4)
    (tmp / "random.pt").write_bytes(bytes(range(255, -1, -1)) * 4)
    (tmp / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(tmp / "archive.pt", "w") as z:
        z.writestr("hello.txt", "hi")
    torch.save({"model_state_dict": {}, "x": Boom()}, tmp / "hostile.pt")
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    (tmp / "notes.txt").write_text("hello")
    (tmp / "empty_folder").mkdir()
    np.save(tmp / "tokens.npy", np.arange(10, dtype=np.uint16))
    shutil.copy(tmp / "tokens.npy", tmp / "tokens.bin")
    return [
        (tmp / "text.pt", "is not a checkpoint: it is a text file"),
        (tmp / "matrix.npy", "2-D"),
        (tmp / "floats.npy", "floating-point"),
        (tmp / "random.npy", "not a .npy file"),
        (tmp / "random.pt", "binary data of an unknown format"),
        (tmp / "empty.pt", "an empty file"),
        (tmp / "archive.pt", "zip archive without PyTorch"),
        (tmp / "hostile.pt", "refusing to load"),
        (tmp / "foreign.pt", "not an lmtools checkpoint"),
        (tmp / "notes.txt", "is a text file"),
        (tmp / "empty_folder", "not a prepared dataset"),
        (tmp / "tokens.bin", "rename it to tokens.npy"),
        (tmp / "missing.pt", "does not exist"),
    ]


def test_files_that_lie_are_one_line_errors(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    for path, needle in _bad_files(tmp_path):
        one_line_error(run_cli("inspect", path), needle)
        one_line_error(run_cli("inspect", path, "--json"), needle)
    assert not (tmp_path / "pwned").exists()  # the hostile pickle never ran


def test_broken_meta_json_is_one_line_error(dataset, tmp_path, run_cli):
    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)
    (folder / "meta.json").write_text("{ not json")
    one_line_error(run_cli("inspect", folder), "meta.json")
    one_line_error(run_cli("inspect", folder / "train.npy"), "meta.json")


def test_cli_tables_for_data(dataset, run_cli):
    meta = json.loads((dataset / "meta.json").read_text())
    for path, needles in (
        (dataset, ("prepared dataset", f"{meta['train_tokens']:,}", "excerpt", "sound")),
        (dataset / "val.npy", ("token file", f"{meta['val_tokens']:,}", "uint16", f"{meta['eot_id']}")),
    ):
        result = run_cli("inspect", path, terminal_width=200)
        assert result.exit_code == 0, result.output
        for needle in needles:
            assert needle in result.stdout, (needle, result.stdout)
