"""The validation split of a prepared corpus, made while its parts are joined into train.npy
and val.npy:

- by whole documents, picked in the order of a seeded hash of their index until they hold
  about `val_fraction` of the tokens, when the corpus has documents enough for that;
- otherwise (one text file, a few huge documents) by the tail of the token stream, cut at a
  document boundary or a line end near `val_fraction` of the tokens;
- not at all for a corpus too small for one validation window (meta.json says why).

A document's hash depends on its index in the corpus alone, so the split is the same however
the corpus was cut into units, processes or shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtools.data.npy_stream import NpyIds, NpyWriter

if TYPE_CHECKING:
    import numpy as np

# A validation split shorter than this is no use (one window of a small context).
MIN_VAL_TOKENS = 64
# Whole documents are used when some of them hold the share asked for within this (relative).
SHARE_TOLERANCE = 0.1
# A tail cut moves by at most this share of the target to land on a boundary.
SPAN_SNAP = 0.05
# Documents whose hash is below CANDIDATE_FACTOR * val_fraction are remembered for the split.
CANDIDATE_FACTOR = 4


def _threshold(fraction: float) -> int:
    return min(int(fraction * 2.0**64), 2**64 - 1)


def doc_hashes(seed: int | str, start: int, count: int) -> np.ndarray:
    """splitmix64(i * golden + key(seed)) for documents start .. start+count-1: a uniform,
    seeded hash of the document index, which needs no document count in advance."""
    import numpy as np

    key = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")
    z = np.arange(start, start + max(count, 0), dtype=np.uint64)
    z = z * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)  # wraps modulo 2**64, on purpose
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def val_flags(seed: int | str, start: int, count: int, fraction: float) -> np.ndarray:
    """Which of documents start .. start+count-1 have a hash below `fraction` of the range
    (each with probability `fraction`)."""
    import numpy as np

    if fraction <= 0 or count <= 0:
        return np.zeros(max(count, 0), dtype=bool)
    return doc_hashes(seed, start, count) < np.uint64(_threshold(fraction))


class Candidates:
    """The hash and length of every document whose hash is low enough to be picked for val,
    gathered part by part (the others cannot be picked, so memory stays a few times the
    validation set's document count)."""

    def __init__(self, seed: int, val_fraction: float):
        import numpy as np

        self.seed = seed
        self.below = np.uint64(_threshold(min(1.0, CANDIDATE_FACTOR * val_fraction))) if val_fraction > 0 else None
        self.hashes: list = []
        self.lengths: list = []
        self.documents = 0

    def add(self, lengths: np.ndarray) -> None:
        """The lengths of the next documents of the corpus."""
        if self.below is not None and len(lengths):
            hashes = doc_hashes(self.seed, self.documents, len(lengths))
            keep = hashes < self.below
            self.hashes.append(hashes[keep])
            self.lengths.append(lengths[keep])
        self.documents += len(lengths)


def plan_split(tokens: int, documents: int, candidates: Candidates, fraction: float) -> dict[str, Any]:
    """How to split: by whole documents when some set of them holds about `fraction` of the
    tokens, else by the tail of the token stream; nothing when there is too little text.

    Documents are taken in the order of their seeded hash until they hold the share asked
    for: whole documents chosen at random, as close to the share as their sizes allow.
    """
    import numpy as np

    n = tokens
    if fraction == 0:
        return {"method": "none", "reason": "--val_fraction 0"}
    if n < 2 * MIN_VAL_TOKENS:
        return {"method": "none", "reason": f"{n} tokens are too few for a {MIN_VAL_TOKENS}-token validation window"}
    target = max(fraction * n, MIN_VAL_TOKENS)
    if candidates.hashes:
        hashes, lengths = np.concatenate(candidates.hashes), np.concatenate(candidates.lengths)
        order = np.argsort(hashes, kind="stable")[: documents - 1]  # train keeps one
        if len(order):
            totals = np.cumsum(lengths[order])
            k = int(np.argmin(np.abs(totals - target)))
            if abs(totals[k] - target) <= SHARE_TOLERANCE * target:
                return {"method": "documents", "max_hash": int(hashes[order[k]])}
    return {"method": "spans", "where": "tail", "target_tokens": round(target)}


def write_split(
    parts: Iterable[tuple[Path, np.ndarray, np.ndarray | None]],
    train: NpyWriter,
    val: NpyWriter,
    plan: dict,
    seed: int,
    eot_id: int,
    documents: int,
    line_ends: Callable[[], np.ndarray],
) -> dict[str, int]:
    """Write the corpus into train and val as `plan` says. `parts`: each part's token file, the
    lengths of its documents and which of them are kept (None: all; a duplicate is left out),
    in corpus order; `documents` counts the kept ones, which alone are numbered for the split.
    Ids are copied by the kernel in runs of documents that go the same way; only a tail split
    reads any of them."""
    import numpy as np

    if plan["method"] == "documents":
        return _route_documents(parts, train, val, seed, plan["max_hash"])
    for path, lengths, keep in parts:
        _copy_runs(path, lengths, None if keep is None else np.where(keep, 0, -1), (train,))
    if plan["method"] == "spans":
        start, cut_at = _tail_start(train, plan["target_tokens"], eot_id, line_ends())
        plan.update(val_start=start, cut_at=cut_at, cuts_a_document=cut_at != "document")
        return _split_tail(train, val, start, eot_id, documents)
    return {"train_documents": documents, "val_documents": 0}


def _route_documents(
    parts: Iterable[tuple[Path, np.ndarray, np.ndarray | None]],
    train: NpyWriter,
    val: NpyWriter,
    seed: int,
    max_hash: int,
) -> dict[str, int]:
    """Kept documents whose hash is at most `max_hash` go to val, the others to train."""
    import numpy as np

    doc = val_docs = 0
    for path, lengths, keep in parts:
        n = len(lengths) if keep is None else int(keep.sum())
        if n == 0:
            continue
        to_val = doc_hashes(seed, doc, n) <= np.uint64(max_hash)
        if keep is None:
            where = to_val.astype(np.int8)
        else:
            where = np.full(len(lengths), -1, dtype=np.int8)
            where[keep] = to_val
        _copy_runs(path, lengths, where, (train, val))
        doc += n
        val_docs += int(to_val.sum())
    return {"train_documents": doc - val_docs, "val_documents": val_docs}


def _copy_runs(path: Path, lengths: np.ndarray, where: np.ndarray | None, writers: tuple[NpyWriter, ...]) -> None:
    """Copy each run of a part's documents to `writers[where]` (-1: left out; None: all to
    writers[0])."""
    import numpy as np

    with NpyIds(path) as ids:
        if where is None:
            writers[0].append_from(ids, 0, ids.count)
            return
        n = len(lengths)
        if n == 0:
            return
        ends = np.cumsum(lengths)
        starts = ends - lengths
        change = (np.flatnonzero(where[1:] != where[:-1]) + 1).tolist()
        for a, b in zip([0, *change], [*change, n]):
            if where[a] >= 0:
                writers[where[a]].append_from(ids, int(starts[a]), int(ends[b - 1] - starts[a]))


def _tail_start(stream: NpyWriter, target: int, eot_id: int, line_ends: np.ndarray) -> tuple[int, str]:
    """Where the validation tail starts: the document boundary nearest to `target` tokens
    from the end within +-SPAN_SNAP of it, else the nearest line end, else exactly there."""
    import numpy as np

    n = stream.count
    ideal = n - target
    reach = int(SPAN_SNAP * target)
    lo, hi = max(MIN_VAL_TOKENS, ideal - reach), min(n - MIN_VAL_TOKENS, ideal + reach)
    if lo > hi:
        return ideal, "token"
    before = stream.read(lo - 1, hi - lo + 1)  # before[i]: the token ending just before lo + i
    positions = np.arange(lo, hi + 1)
    for name, ok in (("document", before == eot_id), ("line", line_ends[before])):
        if ok.any():
            candidates = positions[ok]
            return int(candidates[np.argmin(np.abs(candidates - ideal))]), name
    return ideal, "token"


def _split_tail(
    stream: NpyWriter, val: NpyWriter, start: int, eot_id: int, documents: int, chunk: int = 1 << 22
) -> dict[str, int]:
    val_docs = 0
    for at in range(start, stream.count, chunk):
        ids = stream.read(at, min(chunk, stream.count - at))
        val.append(ids)
        val_docs += int((ids == eot_id).sum())
    stream.truncate(start)
    # A document counts where it ends (as counting end-of-text ids in each file does): one cut
    # in two counts in val, and train holds its start.
    return {"train_documents": documents - val_docs, "val_documents": val_docs}


def split_record(plan: dict, requested: float, given: float) -> dict[str, Any]:
    """meta.json's "split": the method first, then the shares, then the plan's own details."""
    return {
        "method": plan.pop("method"),
        "val_fraction_requested": requested,
        "val_fraction_given": round(given, 6),
        **plan,
    }
