"""`prepare` against the world around it, for real: two processes writing one folder, a prepare
killed by SIGKILL or stopped by a signal, a disk that fills up. Nothing a user did not ask to
lose is lost, every failure is one line, and a prepare that was stopped continues from the
parts it committed when run again."""

from __future__ import annotations

import json
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


WORK = ".prepare-parts"


def committed_parts(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / WORK).glob("part-*.json"))


def part_temporaries(folder: Path) -> list[Path]:
    return list((folder / WORK).glob(".part-*.tmp")) if (folder / WORK).is_dir() else []


def dataset_files(folder: Path) -> dict[str, bytes]:
    """The folder's files (not the work folder of an unfinished prepare), by name."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_same_dataset(folder: Path, reference: Path, same_units: bool = True) -> None:
    """The same token files and tokenizer as a prepare that was never stopped, and meta.json
    equal but for when it was written (and, cut in other units, the digests of those units)."""
    for name in ("train.npy", "val.npy", "tokenizer.json"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    meta, ref = (json.loads((f / "meta.json").read_text()) for f in (folder, reference))
    for m in (meta, ref):
        m.pop("created")
        for source in m["sources"] if not same_units else []:
            source.pop("sha256", None)
            source.pop("sha256_parts", None)
    assert meta == ref


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """The corpus prepared in one go, to compare resumed prepares with."""
    text, tok = corpus
    out = tmp_path_factory.mktemp("reference") / "data"
    result = prepare(text, "--out", out, "--tokenizer", tok)
    assert result.returncode == 0, result.stderr
    return out


def assert_sound(folder: Path) -> dict:
    """A complete dataset and nothing else of prepare's: no temporaries, no lock file."""

    meta = json.loads((folder / "meta.json").read_text())
    train = np.load(folder / "train.npy", mmap_mode="r")
    val = np.load(folder / "val.npy", mmap_mode="r")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert max(int(train.max()), int(val.max())) < meta["vocab_size"]
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name in (LOCK_FILE, WORK)]
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
    wait_for(lambda: any(p.stat().st_size > 0 for p in part_temporaries(out)), first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert part_temporaries(out) and holds_lock(out, first.pid)  # what SIGKILL leaves behind
    assert not (out / "meta.json").exists()
    (out / "notes.md").write_text("mine")
    # The dead holder's lock went with it: the next prepare takes the folder and cleans up. With
    # another tokenizer the parts of the first are no use: it says so and starts again.
    second = prepare(text, "--out", out, "--tokenizer", "bytes")
    assert second.returncode == 0, second.stderr
    assert "prepare: starting again: another tokenizer than the interrupted prepare's" in second.stderr
    meta = assert_sound(out)
    assert meta["tokenizer_kind"] == "bytes"
    assert (out / "notes.md").read_text() == "mine"


def test_a_prepare_killed_mid_way_continues_from_its_parts(tmp_path, corpus, reference):
    text, tok = corpus
    out = tmp_path / "data"
    first = start_prepare(text, "--out", out, "--tokenizer", tok)
    wait_for(lambda: len(committed_parts(out)) >= 2, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    done = committed_parts(out)
    assert len(done) >= 2 and not (out / "meta.json").exists()
    second = prepare(text, "--out", out, "--tokenizer", tok)
    assert second.returncode == 0, second.stderr
    resumed = [line for line in second.stderr.splitlines() if line.startswith("prepare: resuming:")]
    assert len(resumed) == 1 and resumed[0].startswith(f"prepare: resuming: {len(done)} of "), second.stderr
    assert_sound(out)
    assert_same_dataset(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_mid_prepare_leaves_the_old_dataset_and_its_parts(tmp_path, corpus, reference, sig):
    # A scheduler's SIGTERM and a dropped terminal's SIGHUP clean up as Ctrl-C does; by default
    # they ended the process on the spot, leaving a .tmp of hundreds of MB and the lock file.
    # The parts finished before the signal stay, and the same command continues from them.
    text, tok = corpus
    out = tmp_path / "data"
    (tmp_path / "small.txt").write_text(prose(20_000, seed=9), encoding="utf-8")
    assert prepare(tmp_path / "small.txt", "--out", out, "--tokenizer", "bytes").returncode == 0
    before = dataset_files(out)
    proc = start_prepare(text, "--out", out, "--tokenizer", tok, "--force")
    wait_for(lambda: committed_parts(out) and any(p.stat().st_size > 0 for p in part_temporaries(out)), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.splitlines()[-1] == ("interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}")
    assert dataset_files(out) == before  # the old dataset, no temporaries, no lock
    kept = committed_parts(out)
    assert kept and not part_temporaries(out)
    assert f"prepare: {len(kept)} finished part{'s' if len(kept) > 1 else ''} (" in err
    verb = "are" if len(kept) > 1 else "is"
    assert f"{verb} kept in {out / WORK}: run the same command again to continue from them" in err
    again = prepare(text, "--out", out, "--tokenizer", tok, "--force")
    assert again.returncode == 0, again.stderr
    assert f"prepare: resuming: {len(kept)} of " in again.stderr
    assert_sound(out)
    assert_same_dataset(out, reference)


def test_a_full_disk_is_one_line_and_keeps_the_old_dataset(tmp_path, corpus):
    text, tok = corpus
    with tmpfs(tmp_path / "small-disk", "size=4m") as disk:
        out = disk / "data"
        (tmp_path / "small.txt").write_text(prose(50_000, seed=1), encoding="utf-8")
        assert prepare(tmp_path / "small.txt", "--out", out, "--tokenizer", tok).returncode == 0
        before = dataset_files(out)
        result = prepare(text, "--out", out, "--tokenizer", tok, "--force")
        line = one_line_error(result, "no space left on the device")
        assert "Traceback" not in result.stderr and str(out) in line
        assert dataset_files(out) == before and not part_temporaries(out)  # intact, no temporaries
        kept = committed_parts(out)  # the parts that fitted stay, and the one line says so
        assert not kept or f"continue from the {len(kept)} finished part" in line
        # Into a new folder on the full disk: the folder it created is gone again.
        result = prepare(text, "--out", disk / "new", "--tokenizer", tok)
        one_line_error(result, "no space left on the device")
        assert not (disk / "new").exists()


def test_a_prepare_stopped_by_a_full_disk_continues_when_there_is_room(tmp_path, corpus, reference):
    text, tok = corpus
    with tmpfs(tmp_path / "small-disk", "size=12m") as disk:
        out = disk / "data"
        result = prepare(text, "--out", out, "--tokenizer", tok)
        one_line_error(result, "no space left on the device")
        kept = committed_parts(out)
        assert kept and not part_temporaries(out) and not (out / "meta.json").exists()
        assert f"run the same command again to continue from the {len(kept)} finished part" in result.stderr
        # More room (a larger tmpfs, the same files): the same command continues.
        subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], check=True)
        again = prepare(text, "--out", out, "--tokenizer", tok)
        assert again.returncode == 0, again.stderr
        assert f"prepare: resuming: {len(kept)} of " in again.stderr
        assert_sound(out)
        assert_same_dataset(out, reference)


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


def children(pid: int) -> list[int]:
    """PIDs of the live worker processes of prepare `pid` (from /proc; multiprocessing's
    resource tracker, also a child, is left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return found


def start_parallel_prepare(*args) -> subprocess.Popen:
    """A prepare whose units (256 KB each) are encoded by two worker processes."""
    cmd = [sys.executable, "-m", "lmtools.cli", "prepare", *map(str, args), "--threads", "2", "-q"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", LMTOOLS_PREPARE_UNIT_BYTES=str(256 << 10))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_workers_end_with_a_prepare_killed_by_sigkill(tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "data"
    proc = start_parallel_prepare(text, "--out", out, "--tokenizer", tok)
    wait_for(lambda: len(committed_parts(out)) >= 2 and len(children(proc.pid)) >= 2, proc)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text() for w in workers):
        assert time.monotonic() < deadline, "a worker outlived its killed parent"
        time.sleep(0.01)
    # Nothing writes into the folder any more: the parts stay as they are.
    parts = committed_parts(out)
    time.sleep(0.5)
    assert committed_parts(out) == parts


def test_a_worker_that_dies_ends_the_prepare_in_one_line_and_its_parts_stay(tmp_path, corpus, reference):
    text, tok = corpus
    out = tmp_path / "data"
    proc = start_parallel_prepare(text, "--out", out, "--tokenizer", tok)
    wait_for(lambda: len(committed_parts(out)) >= 2 and len(children(proc.pid)) >= 2, proc)
    os.kill(children(proc.pid)[0], signal.SIGKILL)  # as the out-of-memory killer would
    out_, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out_, err)
    line = one_line_error(result, "a prepare worker process died (signal 9")
    assert "run the same command again to continue" in line
    kept = committed_parts(out)
    assert kept and not part_temporaries(out) and holds_lock(out, proc.pid) is False
    again = start_parallel_prepare(text, "--out", out, "--tokenizer", tok)
    again_out, again_err = again.communicate(timeout=300)
    assert again.returncode == 0, again_err
    assert f"prepare: resuming: {len(kept)} of " in again_err
    assert_sound(out)
    # Another unit size cuts the corpus elsewhere: its tokens are the same all the same.
    assert_same_dataset(out, reference, same_units=False)


def test_a_work_folder_prepare_did_not_write_is_never_removed(tmp_path):
    (tmp_path / "c.txt").write_text(prose(20_000, seed=3), encoding="utf-8")
    out = tmp_path / "data"
    (out / WORK).mkdir(parents=True)
    (out / WORK / "notes.txt").write_text("mine")
    result = prepare(tmp_path / "c.txt", "--out", out, "--tokenizer", "bytes")
    one_line_error(result, f"{out / WORK} was not written by lmtools prepare")
    assert (out / WORK / "notes.txt").read_text() == "mine" and not (out / "meta.json").exists()
    # One that holds nothing but a dead prepare's temporaries (killed as it began) is its own.
    (out / WORK / "notes.txt").unlink()
    (out / WORK / ".state.json.999999.tmp").write_text("{")
    result = prepare(tmp_path / "c.txt", "--out", out, "--tokenizer", "bytes")
    assert result.returncode == 0, result.stderr
    assert_sound(out)


def test_parts_of_an_earlier_version_are_started_again_not_refused(tmp_path):
    """A work folder an earlier lmtools left (its parts have no content hashes) is prepare's own:
    the run says why it starts again and removes it, as for a changed key."""
    (tmp_path / "c.txt").write_text(prose(20_000, seed=3), encoding="utf-8")
    out = tmp_path / "data"
    (out / WORK).mkdir(parents=True)
    (out / WORK / "state.json").write_text(json.dumps({"format": "lmtools.prepare-parts/1", "key": {}}))
    (out / WORK / "part-000000.json").write_text("{}")
    result = prepare(tmp_path / "c.txt", "--out", out, "--tokenizer", "bytes")
    assert result.returncode == 0, result.stderr
    assert (
        "prepare: starting again: the parts were written by an earlier version of lmtools; "
        "the earlier parts are removed" in result.stderr
    )
    assert not (out / WORK).exists()
    assert_sound(out)
