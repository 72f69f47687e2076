"""`prepare` against the world around it, for real: two processes writing one folder, a prepare
killed by SIGKILL, a disk that fills up. Nothing a user did not ask to lose is lost, and every
failure is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import one_line_error, tmpfs
from lmtools.data.tokenizer import train_bpe
from lmtools.errors import DataError
from lmtools.layout import LOCK_FILE
from lmtools.runtime.lock import Busy, exclusive
from texts import eot_joined, prose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """About 24 MB of <|endoftext|>-joined text (a few seconds to encode on one thread) and a
    tokenizer.json for it."""
    root = tmp_path_factory.mktemp("faults")
    block = eot_joined([prose(200_000, seed=i) for i in range(4)])
    (root / "big.txt").write_text(block * 30, encoding="utf-8")
    tok = root / "tokenizer.json"
    train_bpe(iter([[block[:300_000]]]), 600).save(str(tok))
    return root / "big.txt", tok


def start_prepare(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmtools.cli", "prepare", *map(str, args), "--threads", "1", "-q"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )


def prepare(*args) -> subprocess.CompletedProcess:
    proc = start_prepare(*args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"prepare ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def holds_lock(folder: Path, pid: int) -> bool:
    try:
        return (folder / LOCK_FILE).read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def assert_sound(folder: Path) -> dict:
    """A complete dataset and nothing else of prepare's: no temporaries, no lock file."""
    import json

    meta = json.loads((folder / "meta.json").read_text())
    train = np.load(folder / "train.npy", mmap_mode="r")
    val = np.load(folder / "val.npy", mmap_mode="r")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert max(int(train.max()), int(val.max())) < meta["vocab_size"]
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name == LOCK_FILE]
    assert leftovers == []
    return meta


def test_a_second_prepare_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "data"
    (out).mkdir()
    (out / "notes.md").write_text("mine")  # a file prepare did not write
    first = start_prepare(text, "--out", out, "--tokenizer", tok)
    try:
        wait_for(lambda: holds_lock(out, first.pid), first)
        first.send_signal(signal.SIGSTOP)  # hold it there, lock held, while the second tries
        for extra in ([], ["--force"]):
            second = prepare(text, "--out", out, "--tokenizer", "bytes", *extra)
            line = one_line_error(second, f"PID {first.pid}")
            assert "in use by another process" in line and "--out" in line
    finally:
        first.send_signal(signal.SIGCONT)
    out_, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    meta = assert_sound(out)
    assert meta["tokenizer_kind"] == "tokenizer.json" and meta["vocab_size"] == 600
    assert (out / "notes.md").read_text() == "mine"


def test_temporaries_of_a_killed_prepare_are_removed_by_the_next(tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "data"
    first = start_prepare(text, "--out", out, "--tokenizer", tok)
    temporary = out / f".train.npy.{first.pid}.tmp"
    wait_for(lambda: temporary.is_file() and temporary.stat().st_size > 0, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert temporary.is_file() and holds_lock(out, first.pid)  # what SIGKILL leaves behind
    assert not (out / "meta.json").exists()
    (out / "notes.md").write_text("mine")
    # The dead holder's lock went with it: the next prepare takes the folder and cleans up.
    second = prepare(text, "--out", out, "--tokenizer", "bytes")
    assert second.returncode == 0, second.stderr
    meta = assert_sound(out)
    assert meta["tokenizer_kind"] == "bytes"
    assert (out / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_mid_prepare_leaves_the_old_dataset_and_nothing_else(tmp_path, corpus, sig):
    # A scheduler's SIGTERM and a dropped terminal's SIGHUP clean up as Ctrl-C does; by default
    # they ended the process on the spot, leaving a .tmp of hundreds of MB and the lock file.
    text, tok = corpus
    out = tmp_path / "data"
    (tmp_path / "small.txt").write_text(prose(20_000, seed=9), encoding="utf-8")
    assert prepare(tmp_path / "small.txt", "--out", out, "--tokenizer", "bytes").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = start_prepare(text, "--out", out, "--tokenizer", tok, "--force")
    temporary = out / f".train.npy.{proc.pid}.tmp"
    wait_for(lambda: temporary.is_file() and temporary.stat().st_size > 0, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.splitlines()[-1] == ("interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_is_one_line_and_keeps_the_old_dataset(tmp_path, corpus):
    text, tok = corpus
    with tmpfs(tmp_path / "small-disk", "size=4m") as disk:
        out = disk / "data"
        (tmp_path / "small.txt").write_text(prose(50_000, seed=1), encoding="utf-8")
        assert prepare(tmp_path / "small.txt", "--out", out, "--tokenizer", tok).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result = prepare(text, "--out", out, "--tokenizer", tok, "--force")
        line = one_line_error(result, "no space left on the device")
        assert "Traceback" not in result.stderr and str(out) in line
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # intact, no temporaries
        # Into a new folder on the full disk: the folder it created is gone again.
        result = prepare(text, "--out", disk / "new", "--tokenizer", tok)
        one_line_error(result, "no space left on the device")
        assert not (disk / "new").exists()


def test_a_read_only_out_is_one_line(tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as disk:
        (tmp_path / "c.txt").write_text("some text\n")
        result = prepare(tmp_path / "c.txt", "--out", disk / "data", "--tokenizer", "bytes")
        line = one_line_error(result, f"--out {disk / 'data'}: cannot write")
        assert "Read-only file system" in line and "Traceback" not in result.stderr


def test_the_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / f"{uuid.uuid4().hex}.lock"
    with exclusive(path, "the thing", "try later"):
        assert path.read_text().strip() == str(os.getpid())
        # A second open file description conflicts even in the same process.
        with pytest.raises(
            Busy,
            match=rf"the thing is in use by another process \(PID "
            rf"{os.getpid()}\); try later",
        ) as info:
            with exclusive(path, "the thing", "try later"):
                pass
        assert info.value.pid == os.getpid() and isinstance(info.value, DataError)
    assert not path.exists()
    with exclusive(path, "the thing", "try later"):  # free again
        pass
