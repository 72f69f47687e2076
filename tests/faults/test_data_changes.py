"""Data that changes under a run: fingerprints checked on resume and at every checkpoint, and a
truncation during a run that ends in a message naming the file, not a bus error."""

import io
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    FAULT_RUN,
    PROCESS_ENV,
    error_line,
    run_cli,
    train_config,
    train_process,
    wait_for_line,
    write_tokens,
)
from lmtools.checkpoint import read_checkpoint
from lmtools.data.fingerprint import BLOCK_BYTES, file_fingerprint, meta_hash
from lmtools.training.trainer import train_model

# A short run, checkpointed and evaluated every two steps.
_config = partial(train_config, **FAULT_RUN, max_iters=4, eval_interval=2, checkpoint_interval=2)


def _rewrite_same_size(path, seed=5):
    """Different tokens, same length, same file, overwritten in place. Not by `np.save` over it:
    that truncates the file first, and a run reading it in that moment rightly reports a file
    that shrank (a test racing the run, under load, would then see the other message)."""
    data = np.load(path)
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 64, len(data)).astype(data.dtype))
    assert len(buf.getvalue()) == path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(buf.getvalue())


@pytest.fixture
def run(tmp_path):
    tokens = write_tokens(tmp_path / "data" / "train.npy")
    val = write_tokens(tmp_path / "data" / "val.npy", n=5000, seed=1)
    ckpt = tmp_path / "run" / "ckpt.pt"
    train_model(_config(tokens, ckpt, val_data=str(val)), log=lambda _l: None)
    return tokens, val, ckpt


def test_checkpoint_records_a_fingerprint_of_every_data_file(run):
    tokens, val, ckpt = run
    recorded = read_checkpoint(ckpt)["data_fingerprint"]["files"]
    assert recorded == {str(tokens): file_fingerprint(tokens), str(val): file_fingerprint(val)}
    assert recorded[str(tokens)]["size"] == os.path.getsize(tokens)


@pytest.mark.parametrize("which", ["train", "val"])
def test_resume_refuses_same_length_different_data_unless_asked(run, which):
    tokens, val, ckpt = run
    changed = tokens if which == "train" else val
    _rewrite_same_size(changed)
    line = error_line(run_cli("resume", ckpt, "--max_iters", "6"))
    assert f"{changed} differs (same size, different content)" in line and "--allow_data_change" in line
    assert read_checkpoint(ckpt)["iteration"] == 4
    result = run_cli("resume", ckpt, "--max_iters", "6", "--allow_data_change")
    assert result.exit_code == 0, result.output
    assert "Data changed since the checkpoint (--allow_data_change)" in result.stdout
    payload = read_checkpoint(ckpt)
    assert payload["iteration"] == 6 and payload["data_fingerprint"]["files"][str(changed)] == file_fingerprint(changed)


def test_resume_refuses_a_file_of_another_size_with_its_sizes(run):
    tokens, _val, ckpt = run
    write_tokens(tokens, n=40000, seed=3)
    line = error_line(run_cli("resume", ckpt, "--max_iters", "6"))
    assert f"{tokens} differs (size 100,128 -> 80,128 bytes)" in line
    assert run_cli("resume", ckpt, "--max_iters", "6", "--allow_data_change").exit_code == 0


def test_resume_refuses_a_changed_tokenizer(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy")
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    ckpt = tmp_path / "ckpt.pt"
    train_model(_config(tokens, ckpt, tokenizer=str(tok)), log=lambda _l: None)
    tok.write_text(json.dumps({"model": {"vocab": {"b": 0}}}))
    line = error_line(run_cli("resume", ckpt, "--max_iters", "6"))
    assert f"the tokenizer {tok} differs" in line


def test_meta_json_hash_ignores_only_the_creation_time(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"vocab_size": 64, "created": "2025-01-01T00:00:00+00:00"}))
    first = meta_hash(meta)
    meta.write_text(json.dumps({"created": "2026-02-02T00:00:00+00:00", "vocab_size": 64}))
    assert meta_hash(meta) == first
    meta.write_text(json.dumps({"vocab_size": 65, "created": "2026-02-02T00:00:00+00:00"}))
    assert meta_hash(meta) != first


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 40 * BLOCK_BYTES), where=st.floats(0, 1, exclude_max=True), seed=st.integers(0, 2**16))
def test_fingerprint_sees_any_changed_first_or_last_block_and_any_size(tmp_path_factory, size, where, seed):
    """A sampled fingerprint: any change of size, of the first or the last block is seen."""
    path = tmp_path_factory.mktemp("fp") / "f.bin"
    data = bytearray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    before = file_fingerprint(path)
    edge = int(where * min(size, BLOCK_BYTES))
    for offset in {edge, size - 1 - edge}:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(changed)
        assert file_fingerprint(path) != before
    path.write_bytes(data + b"\0")
    assert file_fingerprint(path) != before
    path.write_bytes(data)
    assert file_fingerprint(path) == before


@pytest.mark.slow
def test_a_file_rewritten_during_the_run_stops_it_naming_the_last_checkpoint(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy")
    ckpt = tmp_path / "ckpt.pt"
    proc = train_process(tokens, ckpt, "--checkpoint_interval", "20")
    wait_for_line(proc, "Saved checkpoint at iter 20")
    _rewrite_same_size(tokens)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"{tokens} changed (same size, different content) during the run; stopped" in line
    assert f"the last checkpoint, {ckpt} at iter 20, was written before it" in line
    assert read_checkpoint(ckpt)["iteration"] == 20  # nothing written on the changed data


@pytest.mark.slow
def test_a_file_truncated_during_the_run_ends_with_its_name_not_a_bus_error(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy", n=2_000_000)
    ckpt = tmp_path / "ckpt.pt"
    proc = train_process(tokens, ckpt, "--checkpoint_interval", "10")
    wait_for_line(proc, "Saved checkpoint at iter 10")
    size = os.path.getsize(tokens)
    os.truncate(tokens, 4096)  # the windows past 4 KiB are gone from under the memory map
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, out, err)  # a bus error would be -7 (or 135)
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"{tokens} shrank from {size:,} to 4,096 bytes while the run was reading it" in line
    assert f"{ckpt} at iter 10" in line
    assert read_checkpoint(ckpt)["iteration"] == 10


# The raw sampler (no size check before the copy) reads a file truncated under its map: the
# read faults. Run in a process of its own, so a bus error ends that process, not the suite.
_READ_TRUNCATED = """
import sys, numpy as np
from lmtools.data.loader import BatchLoader
from lmtools.errors import DataChanged
path = sys.argv[1]
loader = BatchLoader(path, 64, 256, prefetch=0)
raw = loader._sampler._inner
x, y = np.empty((64, 256), np.int64), np.empty((64, 256), np.int64)
raw.fill(x, y, 0, 0, 0, 0)
with open(path, "r+b") as f:
    f.truncate(4096)
for step in (1, 2):  # and every batch after: what was read past the end is not the file
    try:
        raw.fill(x, y, 0, 0, step, 0)
    except DataChanged as exc:
        print(f"step {step}: {exc}")
"""


def test_a_read_past_the_end_of_a_file_truncated_under_its_map_is_an_error_not_a_bus_error(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy", n=2_000_000)
    proc = subprocess.run(
        [sys.executable, "-c", _READ_TRUNCATED, str(tokens)], capture_output=True, text=True, env=PROCESS_ENV
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)  # a bus error is -7
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, lines
    for step, line in zip((1, 2), lines):
        assert line.startswith(f"step {step}: {tokens} shrank while the run was reading it"), line
        assert "batch read past its end discarded" in line


# Truncations at random moments of a run of large batches (a batch takes milliseconds to copy,
# its size check microseconds), so most land during a copy: every one must end in the message
# with both sizes. Prints how many were caught by the check before a copy, how many in a copy.
_TRUNCATE_DURING_COPIES = """
import sys, threading, time, random, numpy as np
from lmtools.data.loader import BatchLoader
from lmtools.errors import DataChanged
path, trials = sys.argv[1], int(sys.argv[2])
data = np.load(path)
before = during = 0
for trial in range(trials):
    np.save(path, data)
    loader = BatchLoader(path, 256, 1024, prefetch=0, seed=trial)
    loader.next()
    pause = random.Random(trial).uniform(0, 0.005)
    def cut():
        time.sleep(pause)
        with open(path, "r+b") as f:
            f.truncate(4096)
    thread = threading.Thread(target=cut)
    thread.start()
    try:
        while True:
            loader.next()
    except DataChanged as exc:
        assert "shrank from" in str(exc) and "to 4,096 bytes while the run was reading it" in str(exc), exc
        if isinstance(exc.__context__, DataChanged):
            during += 1
        else:
            before += 1
    thread.join()
    loader.close()
print(before, during)
"""


@pytest.mark.slow
def test_truncations_during_the_copy_of_a_batch_end_in_the_message_with_both_sizes(tmp_path):
    tokens = write_tokens(tmp_path / "train.npy", n=4_000_000)
    trials = 40
    proc = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_DURING_COPIES, str(tokens), str(trials)],
        capture_output=True,
        text=True,
        env=PROCESS_ENV,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    before, during = map(int, proc.stdout.split())
    assert before + during == trials
    assert during >= 1, (before, during)  # the copy path was exercised, not only the check before it
