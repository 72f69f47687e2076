"""Exact-duplicate documents: found from the content hashes the parts record, when they are
joined, so that a text that occurs twice is trained on once and never lands in both train and
val.

The first occurrence in corpus order is kept. Hashes are 128-bit blake2b digests of a
document's UTF-8 text: two different texts share one with a probability of about n² / 2¹²⁹
(nil for any corpus). Memory stays bounded whatever the corpus: the hashes are read from the
parts' files in passes over `BUCKET_DOCS`-sized buckets of the hash space (one pass up to about
a million documents), and only the duplicates found are held: 8 bytes each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

BUCKET_DOCS = 1 << 20  # documents sorted at once (~40 MB)


def duplicate_documents(tables: Sequence[Callable[[], np.ndarray]], counts: Sequence[int]) -> list[np.ndarray]:
    """For each part (its hash table, (documents, 3) uint64, as `tables[i]()` loads it, and its
    document count), the sorted indices in it of the documents an earlier document repeats."""
    import numpy as np

    total = sum(counts)
    offsets = np.cumsum([0, *counts])
    buckets = max(1, -(-total // BUCKET_DOCS))
    found = []
    for bucket in range(buckets):
        keys, places = [], []
        for part, load in enumerate(tables):
            table = load()
            if len(table) != counts[part]:
                raise ValueError(f"part {part}: {len(table)} hashes for {counts[part]} documents")
            mine = np.flatnonzero(table[:, 0] % np.uint64(buckets) == bucket) if buckets > 1 else np.arange(len(table))
            keys.append(np.asarray(table[mine, :2]))
            places.append(mine + offsets[part])
        key = np.concatenate(keys) if keys else np.zeros((0, 2), np.uint64)
        place = np.concatenate(places) if places else np.zeros(0, np.int64)
        order = np.lexsort((place, key[:, 1], key[:, 0]))  # by hash, then by place in the corpus
        key, place = key[order], place[order]
        repeats = np.flatnonzero(np.all(key[1:] == key[:-1], axis=1)) + 1
        found.append(place[repeats])
    dup = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
    cuts = np.searchsorted(dup, offsets)
    return [dup[cuts[i] : cuts[i + 1]] - offsets[i] for i in range(len(counts))]
