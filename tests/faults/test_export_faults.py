"""`export` never deletes what it did not write, and a failed or killed export leaves the old
folder or nothing: real processes, a real SIGKILL, a real full disk (tmpfs)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import PROCESS_ENV, one_line_error, run_cli, spawn, tmpfs, train_process, wait_for, wait_for_line
from lmtools.checkpoint import read_checkpoint
from lmtools.data.tokenizer import train_bpe
from models import random_model, write_checkpoint
from prepared import mixed_documents

pytestmark = pytest.mark.slow

EXPORT = [sys.executable, "-m", "lmtools.cli", "export"]


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*EXPORT, *map(str, args)], capture_output=True, text=True, env=PROCESS_ENV, timeout=120)


def tree(folder):
    """Every file under `folder` with its bytes: what must survive a refused or failed export."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_over_a_running_training_is_refused_and_the_run_goes_on(tokens, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "ck.pt"
    train = train_process(tokens, ckpt, "--checkpoint_interval", "1")
    try:
        wait_for_line(train, "Saved checkpoint")
        # The run's own folder, the checkpoint file itself, and the folder under another
        # checkpoint's export: each would have deleted the run.
        one_line_error(export(ckpt, "--out", run, "--overwrite"), "holds the checkpoint being exported")
        one_line_error(export(ckpt, "--out", ckpt, "--overwrite"), "holds the checkpoint being exported")
        other = write_checkpoint(tmp_path / "other.pt", random_model())
        one_line_error(export(other, "--out", run, "--overwrite"), "did not write")
        assert train.poll() is None and ckpt.is_file() and (run / "metrics.jsonl").is_file()
        iteration = read_checkpoint(ckpt)["iteration"]
        time.sleep(0.5)
    finally:
        train.send_signal(signal.SIGTERM)
        out, err = train.communicate(timeout=60)
    assert train.returncode == 0, err[-2000:]
    assert read_checkpoint(ckpt)["iteration"] >= iteration and (run / "metrics.jsonl").stat().st_size > 0


@pytest.mark.parametrize(
    "target, needle",
    [
        ("checkpoint's folder", "holds the checkpoint being exported"),
        ("checkpoint file", "holds the checkpoint being exported"),
        ("plain file", "is a file, not a folder"),
        ("prepared dataset", "did not write"),
        ("export with a file of the user's", "which export did not write"),
    ],
)
def test_overwrite_never_replaces_what_export_did_not_write(tmp_path, target, needle):
    (tmp_path / "run").mkdir()
    ckpt = write_checkpoint(tmp_path / "run" / "ck.pt", random_model())
    dataset = tmp_path / "data"
    dataset.mkdir()
    np.save(dataset / "train.npy", np.arange(100, dtype=np.uint16))
    (dataset / "meta.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert export(ckpt, "--out", tmp_path / "hf").returncode == 0
    (tmp_path / "hf" / "mine.txt").write_text("mine too")
    out = {
        "checkpoint's folder": ckpt.parent,
        "checkpoint file": ckpt,
        "plain file": tmp_path / "notes.txt",
        "prepared dataset": dataset,
        "export with a file of the user's": tmp_path / "hf",
    }[target]
    before = tree(tmp_path)
    one_line_error(export(ckpt, "--out", out, "--overwrite"), needle)
    assert tree(tmp_path) == before


def test_out_dot_and_an_out_under_a_file_are_one_line(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck.pt", random_model())
    (tmp_path / "afile").write_text("x")
    here = subprocess.run(
        [*EXPORT, str(ckpt), "--out", ".", "--overwrite"], capture_output=True, text=True, env=PROCESS_ENV, cwd=tmp_path
    )
    one_line_error(here, "holds the checkpoint being exported")
    work = tmp_path / "work"
    work.mkdir()
    (work / "x.txt").write_text("x")
    one_line_error(run_cli_in(work, ckpt, "--out", ".", "--overwrite"), "did not write")
    one_line_error(export(ckpt, "--out", tmp_path / "afile" / "hf"), "cannot create its parent folder")
    assert (tmp_path / "afile").read_text() == "x" and (work / "x.txt").read_text() == "x"


def run_cli_in(folder, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*EXPORT, *map(str, args)], capture_output=True, text=True, env=PROCESS_ENV, cwd=folder)


def test_a_killed_export_leaves_the_old_folder_and_the_next_one_cleans_up(tmp_path):
    small = write_checkpoint(tmp_path / "small.pt", random_model())
    # Large enough (about 100 MB of weights) that the kill lands while it writes.
    big = write_checkpoint(tmp_path / "big.pt", random_model(d_model=512, num_layers=8, d_ff=1536))
    out = tmp_path / "hf"
    assert export(small, "--out", out).returncode == 0
    old = tree(out)
    proc = spawn("export", big, "--out", out, "--overwrite")
    temp = tmp_path / f".hf.{proc.pid}.tmp"
    wait_for(lambda: temp.is_dir() or proc.poll() is not None, timeout=120, what="the export's temporary folder")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tree(out) == old  # the old export, whole
    assert temp.is_dir()  # what the kill left
    assert export(small, "--out", out, "--overwrite").returncode == 0
    assert not temp.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_full_disk_leaves_the_old_export_or_nothing(tmp_path, fmt):
    if fmt == "gguf":
        pytest.importorskip("gguf")
    bpe = train_bpe([mixed_documents(200)], 300).to_str()  # GGUF needs a BPE with merges
    small = write_checkpoint(tmp_path / "small.pt", random_model(vocab_size=300), tokenizer_json=bpe)
    big = write_checkpoint(  # about 13 MB of weights
        tmp_path / "big.pt", random_model(vocab_size=300, d_model=256, num_layers=4, d_ff=768), tokenizer_json=bpe
    )
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        assert export(small, "--out", disk / "old", "--format", fmt).returncode == 0
        old = tree(disk / "old")
        one_line_error(export(big, "--out", disk / "old", "--format", fmt, "--overwrite"), "no space left")
        assert tree(disk / "old") == old
        one_line_error(export(big, "--out", disk / "new", "--format", fmt), "no space left")
        assert sorted(p.name for p in disk.iterdir()) == ["old"]
        assert os.statvfs(disk).f_bfree * os.statvfs(disk).f_frsize > 3 << 20  # nothing half-written kept


def test_prepare_never_replaces_token_files_it_did_not_write(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, a small corpus of text. " * 2000)
    out = tmp_path / "data"
    out.mkdir()
    np.save(out / "train.npy", np.arange(10, dtype=np.uint16))
    before = tree(out)
    one_line_error(run_cli("prepare", corpus, "--out", out, "--force"), "no lmtools prepare wrote")
    assert tree(out) == before
