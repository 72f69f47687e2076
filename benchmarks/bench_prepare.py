"""Throughput of `lmtools prepare` against tiktoken and `tokenizers`, in the same run.

The corpus is English prose made locally (no network): the docstrings of the Python standard
library and the installed packages, one document per docstring, about 32 MB, cached in the
temp folder. The vocabulary is a GPT-2-sized byte-level BPE (50257 ids) trained on that corpus,
so every encoder below uses the same vocabulary, pattern and text.

- tiktoken_batch: `tiktoken.Encoding.encode_ordinary_batch(docs)` (the baseline of the ratios).
- tokenizers_batch: `tokenizers.Tokenizer.encode_batch(docs)` (on a quarter of the corpus).
- prepare_jsonl / prepare_txt: `prepare_corpus` end to end with that tokenizer.json: read the
  .jsonl (or a .txt split at blank lines), hash, encode, split train/val, write the .npy files.
- prepare_train_10k: `prepare_corpus` end to end including training a 10000-id BPE (default);
  _sample_8MB: the BPE trained on 8 MB of documents sampled across the corpus
  (`--tokenizer_sample 8000000`).
- train_bpe_50k: training the 50257-id BPE alone.
- tokenizer_sample_N_of_C: training a 10000-id BPE on an N-byte `--tokenizer_sample` of a
  C-byte corpus (one .txt file of `<|endoftext|>`-joined documents: the docstring corpus
  repeated, each copy in another seeded order with its documents numbered), sampling included;
  the third table gives its ratios to the 20 MB sample of the 200 MB corpus, and, from a child
  process running the same call, the growth of peak memory and the bytes read from files.

- serial share: `prepare_corpus` of the 20 MB and 200 MB corpora below with that
  tokenizer.json at 1 and 2 processes (`threads`), in turn, round after round: wall time, CPU
  time of everything (prepare's process and its workers), and the share of it spent by
  prepare's main thread and by its whole process (what does not run in parallel: reading at 1
  process; loading the tokenizer, handing out units, counting and joining the parts at 2).
  Amdahl's bound is 1 / main thread share. The fixed start-up (about a second for this
  tokenizer) weighs on small corpora only; the difference of the two sizes leaves it out.

The second table comes from test_interleaved_ratios: tiktoken_batch, prepare_jsonl and
prepare_txt run in turn, round after round, so that load from other work hits them alike.
Besides wall time, each row has CPU time (all threads of the process), which other work on
the machine disturbs less.

Run: `python -m pytest benchmarks/bench_prepare.py --benchmark-columns=min,median`. The ratio
table is printed at the end; with LMTOOLS_WRITE_RESULTS=1 it is also written to
benchmarks/RESULTS_prepare.md.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmtools.data.corpus import ReadOptions, resolve_sources
from lmtools.data.prepare import Progress, _train, prepare_corpus
from lmtools.data.tokenizer import Encoder, default_threads, load_tokenizer, train_bpe
from lmtools.layout import EOT

CORPUS_BYTES = 32_000_000
CACHE = Path(tempfile.gettempdir()) / "lmtools-bench-prepare"
RESULTS: dict[str, tuple[float, float, int]] = {}  # name -> (wall s, CPU s, text bytes)
BASELINE = "tiktoken_batch"
INTERLEAVED: dict[str, tuple[float, float, int]] = {}  # the same, from test_interleaved_ratios
INTERLEAVED_ROUNDS = 4
# Tokenizer samples: (sample bytes, corpus bytes); the first is the baseline of the ratios.
SAMPLE_CASES = [(20_000_000, 200_000_000), (20_000_000, 2_000_000_000), (40_000_000, 2_000_000_000)]
SAMPLE_COST: dict[str, tuple[float, float, int, int]] = {}  # name -> (wall s, CPU s, peak growth, read)
SERIAL_SIZES = (20_000_000, 200_000_000)
SERIAL_THREADS = (1, 2)
SERIAL_ROUNDS = 2
# (corpus bytes, processes) -> (wall, CPU of all processes, main thread CPU, main process CPU, bytes)
SERIAL: dict[tuple[int, int], tuple[float, float, float, float, int]] = {}


def _cpu() -> float:
    """CPU time of this process and of its children that have ended (prepare's workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _docstrings(limit: int) -> list[str]:
    """Prose-like docstrings (long, with spaces) from every .py file under sys.prefix."""
    triple = re.compile(r'"""(.*?)"""', re.S)
    roots = sorted({Path(os.__file__).parent, *(Path(p) for p in sys.path if "site-packages" in p)})
    docs, size = [], 0
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                try:
                    source = (Path(dirpath) / name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                for m in triple.finditer(source):
                    doc = m.group(1).strip()
                    if len(doc) > 300 and doc.count(" ") > len(doc) / 8:
                        docs.append(doc)
                        size += len(doc.encode())
                        if size >= limit:
                            return docs
    return docs


@pytest.fixture(scope="session")
def corpus() -> dict:
    CACHE.mkdir(exist_ok=True)
    jsonl, txt = CACHE / "prose.jsonl", CACHE / "prose.txt"
    if not jsonl.exists():
        # No blank lines inside a document, so that the .txt copy splits back at them.
        docs = [re.sub(r"\n\s*\n", "\n", d) for d in _docstrings(CORPUS_BYTES)]
        with open(jsonl.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        os.replace(jsonl.with_suffix(".tmp"), jsonl)
    docs = [json.loads(line)["text"] for line in jsonl.open(encoding="utf-8")]
    if not txt.exists():
        txt.write_text("\n\n".join(docs), encoding="utf-8")
    nbytes = sum(len(d.encode()) for d in docs)
    return {"docs": docs, "bytes": nbytes, "jsonl": jsonl, "txt": txt}


@pytest.fixture(scope="session")
def tokenizer_json(corpus) -> Path:
    path = CACHE / "bpe50k.json"
    if not path.exists():
        train_bpe(_batches(corpus["docs"]), 50257).save(str(path))
    return path


def _batches(docs: list[str], n: int = 1000):
    for i in range(0, len(docs), n):
        yield docs[i : i + n]


def _measure(name: str, benchmark, nbytes: int, fn, rounds: int, warmup: int = 0):
    """Benchmark fn; record its best wall time and best CPU time (all threads of the process).

    CPU time is what holds up when other work shares the machine: a busy 2-core machine gives
    more wall-clock share to whoever runs more threads (tiktoken's batch uses 8).
    """
    cpu: list[float] = []

    def run():
        start = _cpu()
        result = fn()
        cpu.append(_cpu() - start)
        return result

    result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    RESULTS[name] = (benchmark.stats.stats.min, min(cpu[warmup:]), nbytes)
    return result


def test_train_bpe_50k(benchmark, corpus):
    _measure("train_bpe_50k", benchmark, corpus["bytes"], lambda: train_bpe(_batches(corpus["docs"]), 50257), rounds=1)


def test_tiktoken_batch(benchmark, corpus, tokenizer_json):
    encoding = Encoder(*load_tokenizer(tokenizer_json))._tiktoken
    assert encoding is not None
    _measure(
        "tiktoken_batch",
        benchmark,
        corpus["bytes"],
        lambda: encoding.encode_ordinary_batch(corpus["docs"]),
        rounds=3,
        warmup=1,
    )


def test_tokenizers_batch(benchmark, corpus, tokenizer_json):
    tok, _ = load_tokenizer(tokenizer_json)
    docs = corpus["docs"][: len(corpus["docs"]) // 4]
    _measure(
        "tokenizers_batch",
        benchmark,
        sum(len(d.encode()) for d in docs),
        lambda: tok.encode_batch(docs, add_special_tokens=False),
        rounds=2,
    )


@pytest.mark.parametrize("source", ["jsonl", "txt"])
def test_prepare(benchmark, corpus, tokenizer_json, tmp_path, source):
    out = tmp_path / "out"
    kwargs = {"separator": "\n\n"} if source == "txt" else {}

    def run():
        meta = prepare_corpus([corpus[source]], out, tokenizer=str(tokenizer_json), force=True, **kwargs)
        assert meta["encoder"] == "tiktoken"
        return meta

    meta = _measure(f"prepare_{source}", benchmark, corpus["bytes"], run, rounds=3, warmup=1)
    assert meta["train_documents"] + meta["val_documents"] == len(corpus["docs"])
    assert meta["text_bytes"] == corpus["bytes"]


@pytest.mark.parametrize("sample", [0, 8_000_000])
def test_prepare_train_10k(benchmark, corpus, tmp_path, sample):
    out = tmp_path / "out"
    name = "prepare_train_10k" + (f"_sample_{sample // 1_000_000}MB" if sample else "")
    _measure(
        name,
        benchmark,
        corpus["bytes"],
        lambda: prepare_corpus([corpus["jsonl"]], out, force=True, tokenizer_sample=sample),
        rounds=1,
    )


def _repeated_corpus(docs: list[str], size: int) -> Path:
    """A text file of about `size` bytes of `<|endoftext|>`-joined documents: the docstring
    corpus again and again, each copy shuffled by its own seed and its documents numbered, so
    that no two stretches of the file are the same. Written once, cached."""
    path = CACHE / f"sample-corpus-{size // 1_000_000}MB.txt"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        tmp, written, copy = path.with_suffix(".tmp"), 0, 0
        with open(tmp, "wb") as f:
            while written < size:
                order = list(range(len(docs)))
                random.Random(copy).shuffle(order)
                block = "".join(f"({copy}.{i}) {docs[i]}{EOT}\n" for i in order).encode()
                if len(block) > size - written:  # the last copy ends at a document boundary
                    block = block[: block.rfind(b"\n", 0, size - written) + 1] or block[: size - written]
                f.write(block)
                written += len(block)
                copy += 1
        os.replace(tmp, path)
    return path


# The same call in a child process: the peak memory it adds (VmHWM, which a new program starts
# afresh, unlike ru_maxrss) and the bytes it reads from files (rchar), in bytes.
SAMPLE_CHILD = """
import sys
import numpy, tokenizers
from lmtools.data.corpus import ReadOptions, resolve_sources
from lmtools.data.prepare import Progress, _train

def field(path, name):
    with open(path) as f:
        line = next(line for line in f if line.startswith(name))
    return int(line.split()[1]) * (1024 if line.rstrip().endswith("kB") else 1)

sources = resolve_sources([sys.argv[1]])
peak, read = field("/proc/self/status", "VmHWM"), field("/proc/self/io", "rchar")
_train(sources, ReadOptions(), 10000, Progress(), sources[0].size, int(sys.argv[2]), 0)
print(field("/proc/self/status", "VmHWM") - peak, field("/proc/self/io", "rchar") - read)
"""


@pytest.mark.parametrize(
    "sample, size", SAMPLE_CASES, ids=[f"{n // 10**6}MB-of-{c // 10**6}MB" for n, c in SAMPLE_CASES]
)
def test_tokenizer_sample(benchmark, corpus, sample, size):
    """BPE training on a sample costs what the sample does, whatever the corpus around it."""
    path = _repeated_corpus(corpus["docs"], size)
    sources = resolve_sources([path])
    name = _sample_name(sample, size)
    total = sources[0].size
    _measure(
        name, benchmark, sample, lambda: _train(sources, ReadOptions(), 10000, Progress(), total, sample, 0), rounds=2
    )
    child = subprocess.run(
        [sys.executable, "-c", SAMPLE_CHILD, str(path), str(sample)], capture_output=True, text=True, check=True
    )
    peak, read = map(int, child.stdout.split())
    wall, cpu, _ = RESULTS[name]
    SAMPLE_COST[name] = (wall, cpu, peak, read)


def test_interleaved_ratios(benchmark, corpus, tokenizer_json, tmp_path):
    """tiktoken's batch and prepare, one run each per round, so that load from other work on
    the machine hits them alike; the best of the rounds goes in the second table."""
    encoding = Encoder(*load_tokenizer(tokenizer_json))._tiktoken
    runs = {
        "tiktoken_batch": lambda: encoding.encode_ordinary_batch(corpus["docs"]),
        "prepare_jsonl": lambda: prepare_corpus(
            [corpus["jsonl"]], tmp_path / "j", tokenizer=str(tokenizer_json), force=True
        ),
        "prepare_txt": lambda: prepare_corpus(
            [corpus["txt"]], tmp_path / "t", separator="\n\n", tokenizer=str(tokenizer_json), force=True
        ),
    }
    best: dict[str, tuple[float, float]] = {}

    def rounds() -> None:
        for _ in range(INTERLEAVED_ROUNDS):
            for name, fn in runs.items():
                wall, cpu = time.perf_counter(), _cpu()
                fn()
                wall, cpu = time.perf_counter() - wall, _cpu() - cpu
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], wall), min(old[1], cpu))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for name, (wall, cpu) in best.items():
        INTERLEAVED[name] = (wall, cpu, corpus["bytes"])


def test_serial_share(benchmark, corpus, tokenizer_json, tmp_path):
    """What of prepare does not run in parallel, at 1 and 2 processes and two corpus sizes, in turn."""
    paths = {size: _repeated_corpus(corpus["docs"], size) for size in SERIAL_SIZES}
    best: dict[tuple[int, int], tuple[float, float, float, float]] = {}

    def rounds() -> None:
        for _ in range(SERIAL_ROUNDS):
            for size, path in paths.items():
                for threads in SERIAL_THREADS:
                    wall, cpu, main, process = time.perf_counter(), _cpu(), time.thread_time(), time.process_time()
                    meta = prepare_corpus(
                        [path], tmp_path / "s", tokenizer=str(tokenizer_json), threads=threads, force=True
                    )
                    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
                    main, process = time.thread_time() - main, time.process_time() - process
                    assert meta["text_bytes"] > 0.9 * path.stat().st_size and meta["encoder"] == "tiktoken"
                    if wall < best.get((size, threads), (float("inf"),))[0]:
                        best[size, threads] = (wall, cpu, main, process)

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for (size, threads), (wall, cpu, main, process) in best.items():
        SERIAL[size, threads] = (wall, cpu, main, process, paths[size].stat().st_size)


def serial_table() -> list[str]:
    if not SERIAL:
        return []
    small, large = SERIAL_SIZES
    lines = [
        "",
        f"serial share (50257-id tokenizer, best of {SERIAL_ROUNDS} interleaved rounds; the last rows: "
        f"what the {large // 10**6} MB run costs beyond the {small // 10**6} MB one, which leaves the "
        "fixed start-up out and is what bounds the speed-up on a large corpus):",
        "",
        "| corpus | processes | wall s | MB/s | speed-up | CPU s (all processes) | main thread | main process | Amdahl bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in SERIAL_SIZES:
        base = SERIAL[size, min(SERIAL_THREADS)][0]
        for threads in SERIAL_THREADS:
            wall, cpu, main, process, nbytes = SERIAL[size, threads]
            lines.append(
                f"| {nbytes / 1e6:.0f} MB | {threads} | {wall:.2f} | {nbytes / wall / 1e6:.1f} | {base / wall:.2f}x "
                f"| {cpu:.2f} | {100 * main / cpu:.1f}% | {100 * process / cpu:.1f}% | {cpu / main:.0f}x |"
            )
    for threads in SERIAL_THREADS:
        (w1, c1, m1, p1, b1), (w0, c0, m0, p0, b0) = SERIAL[large, threads], SERIAL[small, threads]
        cpu, main, process = c1 - c0, m1 - m0, p1 - p0
        lines.append(
            f"| +{(b1 - b0) / 1e6:.0f} MB | {threads} | +{w1 - w0:.2f} | {(b1 - b0) / (w1 - w0) / 1e6:.1f} | - "
            f"| +{cpu:.2f} | {100 * main / cpu:.1f}% | {100 * process / cpu:.1f}% | {cpu / main:.0f}x |"
        )
    return lines


class _Summary:
    """Prints the ratio table after pytest-benchmark's own (registered as a plugin)."""

    def __init__(self, corpus: dict):
        self.corpus = corpus

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not RESULTS and not INTERLEAVED and not SAMPLE_COST and not SERIAL:
            return
        lines = summary(self.corpus)
        terminalreporter.write_line("")
        for line in lines:
            terminalreporter.write_line(line)
        if os.environ.get("LMTOOLS_WRITE_RESULTS"):
            legend = "\n\n".join(__doc__.split("\n\n")[2:5])  # the methods, from the docstring
            (Path(__file__).parent / "RESULTS_prepare.md").write_text(
                "# `lmtools prepare` throughput\n\n"
                + "\n".join(lines)
                + "\n\n"
                + legend
                + "\n\nReproduce: `LMTOOLS_WRITE_RESULTS=1 python -m pytest "
                "benchmarks/bench_prepare.py`\n",
                encoding="utf-8",
            )


def summary(corpus: dict) -> list[str]:
    lines = [
        f"{default_threads()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}; corpus: "
        f"{corpus['bytes'] / 1e6:.1f} MB of docstring prose, {len(corpus['docs']):,} documents; "
        "vocabulary: byte-level BPE with 50257 ids trained on it; load average at the end "
        f"{os.getloadavg()[0]:.1f} (other work shares the machine, so absolute numbers are "
        "noisy; CPU time is the steadier measure)",
    ]
    for title, results in (
        ("pytest-benchmark runs (best round)", RESULTS),
        (f"interleaved rounds (best of {INTERLEAVED_ROUNDS})", INTERLEAVED),
    ):
        if not results:
            continue
        lines += [
            "",
            f"{title}:",
            "",
            "| method | wall s | MB/s | vs tiktoken_batch | CPU s | MB per CPU s | vs tiktoken_batch (CPU) |",
            "|---|---|---|---|---|---|---|",
        ]
        base = results.get(BASELINE)
        for name, (wall, cpu, nbytes) in sorted(results.items(), key=lambda kv: kv[1][0] / kv[1][2]):
            rate, cpu_rate = nbytes / wall, nbytes / cpu
            ratio = f"{rate / (base[2] / base[0]):.2f}x" if base else "-"
            cpu_ratio = f"{cpu_rate / (base[2] / base[1]):.2f}x" if base else "-"
            lines.append(
                f"| {name} | {wall:.2f} | {rate / 1e6:.2f} | {ratio} | {cpu:.2f} | {cpu_rate / 1e6:.2f} | {cpu_ratio} |"
            )
    return lines + sample_table() + serial_table()


def _sample_name(sample: int, size: int) -> str:
    return f"tokenizer_sample_{sample // 10**6}MB_of_{size // 10**6}MB"


def sample_table() -> list[str]:
    """The tokenizer samples: time against the first of SAMPLE_CASES, memory and bytes read."""
    names = [_sample_name(*case) for case in SAMPLE_CASES if _sample_name(*case) in SAMPLE_COST]
    if not names:
        return []
    base_wall, base_cpu, _, _ = SAMPLE_COST[names[0]]
    lines = [
        "",
        "tokenizer sample (10000-id BPE, sampling included, best of 2; ratios to the first row):",
        "",
        "| sample of corpus | wall s | vs first | CPU s | vs first (CPU) | peak memory added | read from files |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        wall, cpu, peak, read = SAMPLE_COST[name]
        case = name.removeprefix("tokenizer_sample_").replace("_of_", " of ")
        lines.append(
            f"| {case} | {wall:.2f} | {wall / base_wall:.2f}x | {cpu:.2f} | {cpu / base_cpu:.2f}x "
            f"| {peak / 2**20:,.0f} MiB | {read / 1e6:,.1f} MB |"
        )
    return lines


@pytest.fixture(scope="module", autouse=True)
def report(request, corpus):
    plugin = _Summary(corpus)
    request.config.pluginmanager.register(plugin, "lmtools-prepare-summary")
    yield
