"""Shared fixtures for the throughput benchmarks, and a summary table with ratios.

Run: `make bench`, or `python -m pytest benchmarks/bench_sampler.py`, against a release build of
the extension (`pip install -e .` builds one).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

# (shape, method) -> median seconds per batch; filled by the benchmarks, printed at the end.
RESULTS: dict[tuple[tuple[int, int], str], float] = {}
BASELINE = "numpy_fancy"
TOKENS = 100_000_000


@pytest.fixture(scope="session")
def token_memmap(tmp_path_factory: pytest.TempPathFactory) -> np.memmap:
    """A 100M-token uint16 .npy (200 MB), written once and read through so it is page-cached:
    the benchmarks measure the gather, not the disk."""
    path = tmp_path_factory.mktemp("bench") / "tokens.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(TOKENS,))
    rng = np.random.default_rng(0)
    chunk = 10_000_000
    for i in range(0, TOKENS, chunk):
        out[i : i + chunk] = rng.integers(0, 50_257, size=chunk, dtype=np.uint16)
    out.flush()
    del out
    data = np.load(path, mmap_mode="r")
    int(np.asarray(data).sum(dtype=np.uint64))  # read every page once
    return data


@pytest.fixture(scope="session")
def results() -> dict[tuple[tuple[int, int], str], float]:
    return RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    shapes = sorted({shape for shape, _ in RESULTS}, key=lambda s: s[0] * s[1])
    methods = sorted({m for _, m in RESULTS}, key=lambda m: -max(RESULTS.get((s, m), 0) for s in shapes))
    write = terminalreporter.write_line
    write("")
    write(
        f"sampler throughput, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}; tokens = batch_size * context_length per batch"
    )
    header = "| method | " + " | ".join(f"({b}, {t})" for b, t in shapes) + " |"
    write(header)
    write("|" + "---|" * (len(shapes) + 1))
    for m in methods:
        cells = []
        for shape in shapes:
            seconds = RESULTS.get((shape, m))
            base = RESULTS.get((shape, BASELINE))
            if seconds is None:
                cells.append("-")
                continue
            rate = shape[0] * shape[1] / seconds
            ratio = f" ({base / seconds:.1f}x)" if base else ""
            cells.append(f"{rate / 1e6:,.0f} M tok/s, {seconds * 1e6:,.0f} us{ratio}")
        write(f"| {m} | " + " | ".join(cells) + " |")
    write(f"(ratios: speed against {BASELINE} at the same shape)")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # Benchmarks are named bench_*.py so the test run never picks them up; `pytest benchmarks`
    # (make bench) collects them through this hook. A file named on the command line is
    # collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Keep the per-shape rows together in the report, in a stable order.
    items.sort(key=lambda item: item.nodeid)
