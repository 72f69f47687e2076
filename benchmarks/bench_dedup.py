"""What removing exact-duplicate documents costs `prepare`, and how the cost grows.

- hash share: each worker hashes every document's text (blake2b, 128 bits) as it encodes it.
  Measured against the encode itself on the same documents, in the same process, in turn,
  round after round: `Encoder.submit_documents` (prepare's encoder: tiktoken's when it agrees,
  on one thread, as a worker runs it) and `_DocumentHashes.add`. Corpus: about 8 MB of
  docstrings of the installed packages (`bench_prepare._docstrings`), a 10000-id BPE trained
  on them (prepare's default size).
- the join: `duplicate_documents` over hash tables as the parts write them (64 parts, 10% of
  the documents repeating an earlier one, planted), at 1M, 4M and 16M documents (16M: a corpus
  of about 30 GB of 2 KB documents), each in a child process: wall and CPU time and the peak
  memory it adds (VmHWM).

Run: `python -m pytest benchmarks/bench_dedup.py -s`; with LMTOOLS_WRITE_RESULTS=1 the tables
are written to benchmarks/RESULTS_dedup.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bench_prepare import _docstrings

from lmtools.data.corpus import Piece
from lmtools.data.parts import _DocumentHashes
from lmtools.data.tokenizer import Encoder, train_bpe

ROUNDS = 5
SIZES = (1 << 20, 4 << 20, 16 << 20)
PARTS = 64
TABLES: dict[str, tuple[float, float]] = {}
JOIN: dict[int, tuple[float, float, int, int]] = {}

JOIN_CHILD = """
import sys, time
from pathlib import Path
import numpy as np
from lmtools.data.dedup import duplicate_documents

def field(path, name):
    with open(path) as f:
        line = next(line for line in f if line.startswith(name))
    return int(line.split()[1]) * (1024 if line.rstrip().endswith("kB") else 1)

paths = sorted(Path(sys.argv[1]).glob("*.npy"))
counts = [len(np.load(p, mmap_mode="r")) for p in paths]
peak = field("/proc/self/status", "VmHWM")
wall, cpu = time.perf_counter(), time.process_time()
found = duplicate_documents([lambda p=p: np.load(p, mmap_mode="r") for p in paths], counts)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(wall, cpu, field("/proc/self/status", "VmHWM") - peak, sum(len(f) for f in found))
"""


def _tables(folder: Path, documents: int) -> int:
    """Hash tables of `documents` documents in PARTS files, a tenth of them repeats of earlier
    ones (uniform over the corpus); returns the number of repeats."""
    rng = np.random.default_rng(documents)
    table = np.empty((documents, 3), dtype=np.uint64)
    table[:, :2] = rng.integers(0, 2**63, size=(documents, 2), dtype=np.uint64)
    table[:, 2] = 2000
    repeats = rng.choice(np.arange(1, documents), size=documents // 10, replace=False)
    table[repeats, :2] = table[rng.integers(0, repeats), :2]  # each copies an earlier document
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(table, PARTS)):
        np.save(folder / f"part-{i:03d}.npy", part)
    # Copies of copies, and two repeats of one document, count once each; the rest is exact.
    _, first = np.unique(table[:, :2], axis=0, return_index=True)
    return documents - len(first)


@pytest.mark.parametrize("documents", SIZES, ids=[f"{n >> 20}M" for n in SIZES])
def test_join_cost(benchmark, tmp_path, documents):
    planted = _tables(tmp_path / "tables", documents)

    def child():
        out = subprocess.run(
            [sys.executable, "-c", JOIN_CHILD, str(tmp_path / "tables")], capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    wall, cpu, peak, found = benchmark.pedantic(child, rounds=1, iterations=1)
    assert int(found) == planted
    JOIN[documents] = (float(wall), float(cpu), int(peak), int(found))


def test_hash_share(benchmark):
    docs = _docstrings(8_000_000)
    tok = train_bpe(iter([docs]), 10000)
    encoder = Encoder(tok, "bpe", threads=1)
    encoder.check_fast_path(docs[:200])
    pieces = [Piece(d, True) for d in docs]
    best = {"encode": (float("inf"), float("inf")), "hash": (float("inf"), float("inf"))}
    runs = {"encode": lambda: encoder.submit_documents(pieces)(), "hash": lambda: _DocumentHashes().add(pieces)}

    def rounds():
        for _ in range(ROUNDS):
            for name, fn in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    nbytes = sum(len(d.encode()) for d in docs)
    for name, value in best.items():
        TABLES[name] = (*value, nbytes, len(docs))
    encoder.close()


def _lines() -> list[str]:
    lines = [
        f"{os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}, load average at the end "
        f"{os.getloadavg()[0]:.1f} (other work shares the machine: CPU time is the steadier measure)",
    ]
    if TABLES:
        (ew, ec, nbytes, ndocs), (hw, hc, _, _) = TABLES["encode"], TABLES["hash"]
        lines += [
            "",
            f"hashing beside encoding ({nbytes / 1e6:.1f} MB, {ndocs:,} documents, best of {ROUNDS} interleaved rounds):",
            "",
            "| step | wall s | MB/s | CPU s | share of the encode's CPU |",
            "|---|---|---|---|---|",
            f"| encode (one worker) | {ew:.3f} | {nbytes / ew / 1e6:.1f} | {ec:.3f} | 100% |",
            f"| hash | {hw:.3f} | {nbytes / hw / 1e6:.0f} | {hc:.3f} | {100 * hc / ec:.1f}% |",
        ]
    if JOIN:
        lines += [
            "",
            "the join's duplicate search (64 parts, 10% repeats; one child process each):",
            "",
            "| documents | hash tables | wall s | CPU s | CPU per million | peak memory added | repeats found |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, (wall, cpu, peak, found) in sorted(JOIN.items()):
            lines.append(
                f"| {n:,} | {24 * n / 1e6:,.0f} MB | {wall:.2f} | {cpu:.2f} | {cpu / (n / 1e6):.2f} s "
                f"| {peak / 2**20:,.0f} MiB | {found:,} |"
            )
    return lines


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    lines = _lines()
    print("\n" + "\n".join(lines))
    if os.environ.get("LMTOOLS_WRITE_RESULTS") and (TABLES or JOIN):
        legend = "\n\n".join(__doc__.split("\n\n")[1:2])
        (Path(__file__).parent / "RESULTS_dedup.md").write_text(
            "# Exact-duplicate documents in `lmtools prepare`\n\n"
            + "\n".join(lines)
            + "\n\n"
            + legend
            + "\n\nReproduce: `LMTOOLS_WRITE_RESULTS=1 python -m pytest benchmarks/bench_dedup.py -s`\n",
            encoding="utf-8",
        )
