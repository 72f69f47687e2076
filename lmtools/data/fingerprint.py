"""Data identity: a fingerprint of every token file a run reads, and of its tokenizer.

A checkpoint records, per data file, its size and a hash of sampled blocks (the first and last
and evenly spaced ones between: a few hundred KiB read per file, whatever its size), and for a
file of a prepared folder the hash of its meta.json (without its creation time); and the hash
of the tokenizer file. `resume` recomputes them and refuses a difference unless told the
change is wanted. During a run, a cheap `stat` at every checkpoint notices a file that changed
(size, mtime, inode); only then is it hashed again, and a real change stops the run.

A file truncated under a memory map raises SIGBUS on the next read past its new end, which no
Python handler can catch. Before each batch is gathered, the size of the files it reads is
checked against the size they were mapped with (`SizeGuardedSampler`): a shrunk file stops the
run with a message naming it and both sizes. A truncation during the copy itself is caught by
the sampler (its SIGBUS handler, rust_sampler/src/fault.rs, reads zeros and marks the file): the
batch is discarded and the run stops with the same message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lmtools.errors import DataChanged
from lmtools.layout import META_FILE

SAMPLED_BLOCKS = 16
BLOCK_BYTES = 16 * 1024


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size, a hash of sampled blocks, and the prepared folder's meta.json hash if any."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(str(size).encode())
        for offset in _block_offsets(size):
            digest.update(os.pread(f.fileno(), BLOCK_BYTES, offset))
    fp = {"size": size, "sampled_blake2b": digest.hexdigest()}
    meta = meta_hash(path.parent / META_FILE)
    if meta is not None:
        fp["meta_sha256"] = meta
    return fp


def _block_offsets(size: int) -> list[int]:
    if size <= SAMPLED_BLOCKS * BLOCK_BYTES:
        return list(range(0, size, BLOCK_BYTES))
    last = size - BLOCK_BYTES
    return sorted({last * i // (SAMPLED_BLOCKS - 1) for i in range(SAMPLED_BLOCKS)})


def meta_hash(path: Path) -> str | None:
    """The hash of a prepared folder's meta.json, without its creation time (so preparing the
    same corpus again is no change); None when there is none or it is unreadable."""
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    meta.pop("created", None)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def whole_file_hash(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class DataIdentity:
    """The fingerprints of a run's data files and tokenizer, taken when the run starts."""

    def __init__(self, files: list[str], tokenizer: str | None):
        self.files = {str(f): file_fingerprint(f) for f in dict.fromkeys(files)}
        self._stats = {f: _stat_key(f) for f in self.files}
        self.tokenizer = None
        if tokenizer and Path(tokenizer).is_file():
            self.tokenizer = {"path": str(tokenizer), "sha256": whole_file_hash(tokenizer)}

    def state_dict(self) -> dict:
        return {"files": self.files, "tokenizer": self.tokenizer}

    def differences(self, recorded: dict) -> list[str]:
        """What differs from a recorded `state_dict()`, one phrase each."""
        found = []
        before = recorded.get("files") or {}
        for path, fp in self.files.items():
            old = before.get(path)
            if old is None:
                found.append(f"{path} is new")
            elif old != fp:
                found.append(f"{path} differs ({_what_differs(old, fp)})")
        found += [f"{path} is no longer read" for path in before if path not in self.files]
        old_tok = (recorded.get("tokenizer") or {}).get("sha256")
        new_tok = (self.tokenizer or {}).get("sha256")
        if old_tok and new_tok and old_tok != new_tok:
            found.append(f"the tokenizer {self.tokenizer['path']} differs")
        return found

    def changed_during_run(self) -> str | None:
        """A phrase naming the first file that changed since the run started, or None.

        Cheap when nothing changed (one stat per file); a changed stat is confirmed by hashing.
        """
        for path, key in self._stats.items():
            now = _stat_key(path)
            if now == key:
                continue
            if now is None:
                return f"{path} was removed"
            fp = file_fingerprint(path)
            if fp != self.files[path]:
                return f"{path} changed ({_what_differs(self.files[path], fp)})"
            self._stats[path] = now  # touched, or replaced by an identical copy
        return None


def _what_differs(old: dict, new: dict) -> str:
    if old.get("size") != new.get("size"):
        return f"size {old.get('size'):,} -> {new.get('size'):,} bytes"
    if old.get("sampled_blake2b") != new.get("sampled_blake2b"):
        return "same size, different content"
    return "its meta.json differs"


def verify_resume_data(identity: DataIdentity, payload: dict, allow_change: bool, log) -> bool:
    """Refuse (DataChanged) data that differs from what the checkpoint recorded, unless
    `allow_change`; returns whether the data changed. Checkpoints without a record pass."""
    recorded = payload.get("data_fingerprint")
    if not isinstance(recorded, dict):
        return False
    diffs = identity.differences(recorded)
    if not diffs:
        return False
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    if not allow_change:
        raise DataChanged(
            f"the data changed since the checkpoint was written: {diffs[0]}{more}; restore it, "
            f"or pass --allow_data_change to continue on the new data"
        )
    log(f"Data changed since the checkpoint (--allow_data_change): {diffs[0]}{more}")
    return True


class SizeGuardedSampler:
    """The Rust sampler, with a size check of the files a batch reads before it is gathered
    (see the module docstring: reading past a truncated map is a bus error)."""

    # Up to this many files, all are checked; beyond, only those the batch reads.
    CHECK_ALL = 16

    def __init__(self, sampler):
        self._inner = sampler
        self._files = []
        for index, f in enumerate(sampler.files):
            path = f.path
            key = _stat_key(str(path)) if path is not None and f.mmapped else None
            if key is not None:
                self._files.append((index, str(path), key[0], key[2]))
        self._by_index = {i: (p, size, ino) for i, p, size, ino in self._files}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def fill(self, inputs, targets, seed: int, rank: int = 0, step: int = 0, micro: int = 0) -> None:
        if self._files:
            if len(self._files) <= self.CHECK_ALL:
                checks = self._files
            else:
                used = {f for f, _ in self._inner.windows(len(inputs), seed, rank, step, micro)}
                checks = [(i, *self._by_index[i]) for i in used if i in self._by_index]
            for _index, path, size, ino in checks:
                _check_size(path, size, ino)
        try:
            self._inner.fill(inputs, targets, seed, rank, step, micro)
        except DataChanged:
            # Truncated during the copy: name the sizes, as the check before it would have.
            for _index, path, size, ino in self._files:
                _check_size(path, size, ino)
            raise


def _check_size(path: str, size: int, ino: int) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return  # removed: the map keeps the old file readable
    if st.st_ino == ino and st.st_size < size:
        raise DataChanged(
            f"{path} shrank from {size:,} to {st.st_size:,} bytes while the run was reading it (truncated); "
            f"stopped before reading past its end"
        )
