"""Token-id ranges: a prepared file's comes from its meta.json at start-up (no page of it read),
a bare file is scanned, and the sampler checks the ids of every batch it gathers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import PROCESS_ENV, SMALLEST_MODEL, VOCAB, error_line, flags, run_cli, write_tokens
from lmtools.data.dataset import KnownRange
from lmtools.data.loader import BatchLoader
from lmtools.errors import DataError
from prepared import documents, prepare, write_eot_text

TRAIN_TOKENS = 8 << 20  # 16 MB of uint16


def prepared_folder(folder: Path, n: int = TRAIN_TOKENS, val: int = 5000) -> Path:
    """A folder as `lmtools prepare` leaves it (train.npy, val.npy, then meta.json) of `n`
    random ids below VOCAB, without a tokenizer: built directly, as prepare on megabytes of
    text would take minutes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train, held = rng.integers(0, VOCAB, n).astype(np.uint16), rng.integers(0, VOCAB, val).astype(np.uint16)
    np.save(folder / "train.npy", train)
    np.save(folder / "val.npy", held)
    meta = {
        "format": "lmtools.prepare/1",
        "vocab_size": VOCAB,
        "dtype": "uint16",
        "train_file": "train.npy",
        "val_file": "val.npy",
        "train_tokens": n,
        "val_tokens": val,
        "min_token_id": int(min(train.min(), held.min())),
        "max_token_id": int(max(train.max(), held.max())),
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


# Trains until its header is logged (before step 1), then prints the resident size of the token
# file's memory map in this process (/proc/self/smaps: the pages of it this process touched).
START_UP = r"""
import json, sys
from lmtools.config.train_config import TrainConfig
from lmtools.training.trainer import train_model

folder, ckpt = sys.argv[1], sys.argv[2]
target = folder + "/train.npy"

def mapped_kb():
    kb, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and len(parts[1]) == 4:
                inside = parts[-1] == target
            elif inside and parts[0] == "Rss:":
                kb += int(parts[1])
    return kb

class Header(Exception):
    pass

def log(line):
    if line.startswith("lmtools train"):
        print(json.dumps({"rss_kb": mapped_kb()}), flush=True)
        raise Header

cfg = TrainConfig(train_data=[folder], checkpoint_path=ckpt, context_length=16, d_model=16, num_layers=1,
                  num_heads=2, d_ff=32, batch_size=4, max_iters=1, eval_iters=1, metrics=False)
try:
    train_model(cfg, log=log)
except Header:
    pass
"""


def start_up_kb(folder: Path, tmp_path: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", START_UP, str(folder), str(tmp_path / "run" / "ckpt.pt")],
        capture_output=True,
        text=True,
        env=PROCESS_ENV,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_kb"]


def test_train_start_up_reads_no_page_of_a_prepared_token_file(tmp_path):
    folder = prepared_folder(tmp_path / "data")
    # Before step 1 no page of the 16 MB map is in the process: the range came from meta.json.
    assert start_up_kb(folder, tmp_path) < 1024
    # The same file once it is newer than its meta.json: scanned, every page touched.
    os.utime(folder / "meta.json", ns=(0, 0))
    assert start_up_kb(folder, tmp_path) >= 0.9 * TRAIN_TOKENS * 2 / 1024


def test_loader_takes_the_range_from_meta_json_only_while_it_describes_the_file(tmp_path):
    folder = prepared_folder(tmp_path / "data", n=20_000)
    path = str(folder / "train.npy")
    mtime = os.stat(folder / "meta.json").st_mtime_ns
    right = {path: KnownRange(20_000, 3, 60, mtime)}  # a recorded range, not the file's 0..63
    with BatchLoader(path, 2, 8, known_ranges=right) as loader:
        assert loader.ranges_from_meta and loader.token_range() == (3, 60)
        assert loader.describe()["sources"][0]["range_from_meta"]
    for stale in (KnownRange(19_999, 3, 60, mtime), KnownRange(20_000, 3, 60, mtime - 10**9)):
        with BatchLoader(path, 2, 8, known_ranges={path: stale}) as loader:
            assert not loader.ranges_from_meta and loader.token_range() == (0, VOCAB - 1)


def test_a_batch_with_an_id_outside_the_vocabulary_is_refused_naming_file_and_id(tmp_path):
    data = np.random.default_rng(0).integers(0, VOCAB, 10_000).astype(np.uint16)
    data[::50] = VOCAB + 7
    np.save(tmp_path / "bad.npy", data)
    with BatchLoader(str(tmp_path / "bad.npy"), 4, 64, vocab_size=VOCAB, prefetch=0) as loader:
        with pytest.raises(DataError) as e:
            loader.batch_at(0)
    assert str(e.value).startswith(f"{tmp_path / 'bad.npy'}: holds token id {VOCAB + 7} ")
    assert f"outside 0..{VOCAB - 1}" in str(e.value) and "\n" not in str(e.value)
    # Without a bound (the spec's get_batch, or vocab_size=None) the same batch is gathered.
    with BatchLoader(str(tmp_path / "bad.npy"), 4, 64, prefetch=0) as loader:
        x, _y = loader.batch_at(0)
    assert int(x.max()) == VOCAB + 7
    # A bound the ids fit in: gathered as before.
    with BatchLoader(str(tmp_path / "bad.npy"), 4, 64, vocab_size=VOCAB + 8, prefetch=0) as loader:
        assert torch_equal(loader.batch_at(3), BatchLoader(str(tmp_path / "bad.npy"), 4, 64, prefetch=0).batch_at(3))


def torch_equal(a, b) -> bool:
    return all(bool((p == q).all()) for p, q in zip(a, b))


def test_a_prepared_file_whose_meta_json_range_is_a_lie_is_refused_when_gathered(tmp_path):
    corpus = write_eot_text(tmp_path / "corpus.txt", documents(60, seed=3))
    meta = prepare(corpus, tmp_path / "data", "--vocab_size", 300, "--val_fraction", 0.1)
    train = tmp_path / "data" / "train.npy"
    before = os.stat(train)
    tokens = np.load(train, mmap_mode="r+")
    bad = meta["vocab_size"] + 5
    tokens[::20] = bad  # same size, same header; written after prepare
    tokens.flush()
    del tokens
    # Its time set back: nothing at start-up can tell (as with a silent corruption).
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    result = run_cli(
        "train", "--train_data", tmp_path / "data", *flags(SMALLEST_MODEL, context_length=16, batch_size=4),
        "--max_iters", 2, "--checkpoint_path", tmp_path / "run" / "ckpt.pt",
    )  # fmt: skip
    line = error_line(result)
    assert f"{train}: holds token id {bad} " in line
    assert "Iter" not in result.stdout  # not one step trained on it


def test_a_bare_token_file_is_scanned_and_a_bad_id_refused_at_start(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", n=5000)
    data = np.load(tokens)
    data[1234] = VOCAB + 1
    np.save(tokens, data)
    with BatchLoader(str(tokens), 2, 8) as loader:
        assert not loader.ranges_from_meta and loader.token_range() == (0, VOCAB + 1)
    result = run_cli(
        "train", "--train_data", tokens, *flags(SMALLEST_MODEL, context_length=16, batch_size=4),
        "--vocab_size", VOCAB, "--max_iters", 2, "--checkpoint_path", tmp_path / "run" / "ckpt.pt",
    )  # fmt: skip
    line = error_line(result)
    assert f"--train_data holds token id {VOCAB + 1} but --vocab_size is {VOCAB}" in line


# `lmtools ARGS`, then its peak RSS (VmHWM, in kB) on stderr: pages of a memory-mapped file the
# process touched count in it. Measured in the process itself: a child's rusage would include the
# peak of the parent it was forked from.
PEAK_RSS = r"""
import atexit, runpy, sys

def peak():
    with open("/proc/self/status") as f:
        sys.stderr.write(next(line for line in f if line.startswith("VmHWM:")))

atexit.register(peak)
sys.argv = ["lmtools", *sys.argv[1:]]
runpy.run_module("lmtools.cli", run_name="__main__")
"""


def inspect_process(*args) -> tuple[dict, int]:
    """`lmtools inspect --json ARGS` as a real process: its report and its peak RSS in kB."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "inspect", "--json", *map(str, args)],
        capture_output=True,
        text=True,
        env=PROCESS_ENV,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    peak = [line for line in out.stderr.splitlines() if line.startswith("VmHWM:")]
    return json.loads(out.stdout), int(peak[-1].split()[1])


def test_inspect_samples_a_large_file_and_reads_it_all_with_full(tmp_path):
    n, eot = 48 << 20, VOCAB  # 96 MB of uint16; the end-of-text id is one past the random ids
    folder = tmp_path / "data"
    folder.mkdir()
    tokens = np.lib.format.open_memmap(folder / "train.npy", mode="w+", dtype=np.uint16, shape=(n,))
    rng = np.random.default_rng(0)
    for at in range(0, n, 1 << 22):
        tokens[at : at + (1 << 22)] = rng.integers(0, VOCAB, min(1 << 22, n - at))
    tokens[::100] = eot
    tokens.flush()
    del tokens
    # A meta.json that records neither the range nor the documents (written before they were).
    (folder / "meta.json").write_text(json.dumps({"vocab_size": VOCAB + 1, "eot_id": eot}), encoding="utf-8")
    sampled, sampled_kb = inspect_process(folder / "train.npy")
    exact, full_kb = inspect_process(folder / "train.npy", "--full")
    documents = len(range(0, n, 100))
    assert (exact["min_token"], exact["max_token"], exact["documents"]) == (0, eot, documents)
    assert exact["documents_from"] == f"count of end-of-text id {eot}" and "token_range_from" not in exact
    assert sampled["token_range_from"].startswith("estimated in a sample of")
    assert sampled["documents_from"].startswith(f"estimated from end-of-text id {eot} in a sample of")
    assert (sampled["min_token"], sampled["max_token"]) == (0, eot)
    assert abs(sampled["documents"] - documents) < 0.02 * documents
    # The sample reads a few MB: the whole file's pages are in the --full process only. The
    # baseline: the same process on a small file in a folder of its own.
    _report, base_kb = inspect_process(write_tokens(tmp_path / "small" / "tokens.npy", n=1000))
    assert sampled_kb - base_kb < 0.25 * n * 2 / 1024 < full_kb - base_kb


def test_inspect_of_a_prepared_folder_takes_range_and_documents_from_meta_json(tmp_path):
    folder = prepared_folder(tmp_path / "data", n=1 << 20)
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(min_token_id=1, max_token_id=62, train_documents=7, val_documents=1, eot_id=VOCAB - 1)
    (folder / "meta.json").write_text(json.dumps(meta))  # written last: it describes both files
    report, _kb = inspect_process(folder)
    assert (report["train"]["min_token"], report["train"]["max_token"], report["train"]["documents"]) == (1, 62, 7)
    assert report["train"]["documents_from"] == "meta.json" and report["problems"] == ["tokenizer.json is missing"]
    exact, _kb = inspect_process(folder, "--full")
    assert (exact["train"]["min_token"], exact["train"]["max_token"]) == (0, VOCAB - 1)
    data = np.load(folder / "train.npy")
    assert exact["train"]["documents"] == int((data == VOCAB - 1).sum())


def test_a_scan_of_a_large_file_says_so_once_on_stderr(tmp_path, monkeypatch, capsys):
    import lmtools.data.loader as loader_module

    tokens = write_tokens(tmp_path / "tokens.npy", n=5000)
    monkeypatch.setattr(loader_module, "SCAN_NOTICE_BYTES", 9_000)  # the file holds 10,000 bytes of tokens
    with BatchLoader(str(tokens), 2, 8) as loader:
        assert capsys.readouterr().err == ""  # nothing scanned when the loader opens
        loader.describe()
        assert loader.token_range() == (0, VOCAB - 1)
    assert capsys.readouterr().err == f"scanning token ids of {tokens} (0.0 GB)\n"
