"""`lmtools eval` on files of growing size: peak memory, wall and CPU time, tokens per second.

The text is English prose made locally (the docstrings of the Python standard library and the
installed packages, the corpus of bench_prepare.py), repeated to 10 and 100 MB; the model
a small one (1 layer, d_model 32, context 256) over a 2048-id BPE trained on 2 MB of that
text, so that the data path (reading, encoding, windows) is a large share of the cost. Each
size runs `lmtools eval FILE --json` as a process of its own and reads its peak resident memory
(VmHWM, which a new program starts afresh) as it exits; CPU time is the child's user + system.
The 10 MB run is the baseline of the ratios: memory must stay flat while time grows with the
file.

Run: `python -m pytest benchmarks/bench_eval.py -s`; with LMTOOLS_WRITE_RESULTS=1 the table is
also written to benchmarks/RESULTS_eval.md.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lmtools.checkpoint import save_checkpoint
from lmtools.data.tokenizer import train_bpe
from lmtools.layout import EOT
from lmtools.model import TransformerLM

SIZES_MB = [10, 100]
CACHE = Path(tempfile.gettempdir()) / "lmtools-bench-eval"
RESULTS: dict[int, dict] = {}  # size in MB -> peak MB, wall s, CPU s, tokens scored

# `lmtools eval` in a process of its own that reports its peak resident memory as it exits.
EVAL_CHILD = """
import atexit, runpy, sys
def report():
    with open('/proc/self/status') as f:
        peak = next(line for line in f if line.startswith('VmHWM:'))
    sys.stderr.write('peak_kb ' + peak.split()[1] + '\\n')
atexit.register(report)
sys.argv = ['lmtools', *sys.argv[1:]]
runpy.run_module('lmtools.cli', run_name='__main__')
"""


def _prose() -> str:
    """About 32 MB of docstrings, one document each, joined by end-of-text markers."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_prepare import CORPUS_BYTES, _docstrings

    return EOT.join(_docstrings(CORPUS_BYTES))


@pytest.fixture(scope="module")
def files() -> dict[int, Path]:
    CACHE.mkdir(exist_ok=True)
    paths = {mb: CACHE / f"prose-{mb}MB.txt" for mb in SIZES_MB}
    if not all(p.is_file() for p in paths.values()):
        text = _prose()
        for mb, path in paths.items():
            want = mb * 1_000_000
            body = (text * (want // len(text) + 1))[:want]
            path.write_text(body, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def checkpoint(files) -> Path:
    path = CACHE / "model.pt"
    if not path.is_file():
        text = files[SIZES_MB[0]].read_text(encoding="utf-8")[:2_000_000]
        tok = train_bpe([[text]], 2048)
        torch.manual_seed(0)
        model = TransformerLM(tok.get_vocab_size(), 256, 32, 1, 2, 128)
        save_checkpoint(model, None, 1, path, model_config=model.config.to_dict(), tokenizer_json=tok.to_str())
    return path


@pytest.mark.parametrize("mb", SIZES_MB, ids=[f"{mb}MB" for mb in SIZES_MB])
def test_eval_file(benchmark, files, checkpoint, mb):
    def run():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", EVAL_CHILD, "eval", str(checkpoint), str(files[mb]), "--json", "--batch_size", "16"],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert result.returncode == 0, result.stderr
        scored = json.loads(result.stdout)["files"][0]["scored"]
        peak = int(result.stderr.splitlines()[-1].removeprefix("peak_kb ")) / 1024
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        RESULTS[mb] = {"peak_mb": peak, "wall_s": wall, "cpu_s": cpu, "tokens": scored}

    benchmark.pedantic(run, rounds=1, iterations=1)


def table() -> list[str]:
    base = RESULTS.get(SIZES_MB[0])
    lines = [
        f"eval of growing files, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}; ratios against the {SIZES_MB[0]} MB file",
        "",
        "| file | tokens scored | peak RSS | ratio | wall s | ratio | CPU s | tokens/s (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mb in SIZES_MB:
        r = RESULTS.get(mb)
        if r is None or base is None:
            continue
        lines.append(
            f"| {mb} MB | {r['tokens']:,} | {r['peak_mb']:.0f} MB | {r['peak_mb'] / base['peak_mb']:.2f}x "
            f"| {r['wall_s']:.1f} | {r['wall_s'] / base['wall_s']:.2f}x | {r['cpu_s']:.1f} "
            f"| {r['tokens'] / r['wall_s']:,.0f} |"
        )
    return lines


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    lines = table()
    print("\n" + "\n".join(lines))
    if os.environ.get("LMTOOLS_WRITE_RESULTS") == "1":
        (Path(__file__).parent / "RESULTS_eval.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
