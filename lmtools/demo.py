"""`lmtools demo`: prepare -> train -> plot -> sample, on a corpus every machine has, in minutes.

The corpus is the Python standard library's own source code (test folders left out). A
byte-level BPE of a few thousand tokens is trained on it, then a small Transformer trains on
the CPU for a fixed time budget. The budget becomes an iteration count before training starts
(a probe times a few steps of the real training loop), so the cosine schedule runs its whole
course; `max_minutes` stops the run with a checkpoint if the machine turns out slower than the
probe promised.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmtools.config.train_config import TrainConfig
from lmtools.data.prepare import prepare_corpus
from lmtools.errors import ConfigError, DataError
from lmtools.layout import EOT, METRICS_FILE, TRAIN_FILE, VAL_FILE
from lmtools.plot import plot_runs, read_curves

# torch, the trainer and the generator are imported in the functions that use them: the CLI
# imports this module for `lmtools --help`, which starts without torch.

MARKER = ".lmtools-demo"
# Tests, installed third-party packages, and codec tables (encodings/ is mostly generated data).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "encodings"})
MAX_FILE_BYTES = 400_000  # larger stdlib modules are mostly data tables or prose (pydoc_data/topics.py)
PROMPTS = ("def", "class", "import")

MAX_MINUTES = 24 * 60  # a demo, not a pretraining run: that is `lmtools train`

# The demo model: big enough that its samples look like Python, small enough that a 2-core CPU
# gets through a few hundred steps in three minutes (1.4M parameters with a 2048 vocabulary).
MODEL = dict(context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=384)
BATCH_SIZE = 16
VOCAB_SIZE = 2048
LEARNING_RATE, MIN_LEARNING_RATE = 3e-3, 3e-4
EVALS, EVAL_ITERS = 8, 4  # evaluations per run, validation batches per evaluation
DEADLINE_FACTOR = 1.15  # training stops (with a checkpoint) this far past its budget


@dataclass
class DemoResult:
    out: Path
    corpus_files: int
    corpus_bytes: int
    data_dir: Path
    checkpoint: Path
    metrics: Path
    plot: Path | None
    iterations: int
    max_iters: int
    first_loss: float
    last_loss: float
    first_val_loss: float | None
    last_val_loss: float | None
    train_seconds: float
    total_seconds: float
    stopped_early: bool = False
    samples: list[tuple[str, str]] = field(default_factory=list)

    def next_commands(self) -> list[str]:
        ckpt, data = _shell(self.checkpoint), _shell(self.data_dir)
        return [
            f"lmtools inspect {ckpt}",
            f"lmtools inspect {data}",
            f'lmtools sample {ckpt} --prompt "def " --max_new_tokens 200',
            f"lmtools resume {ckpt} --max_iters {max(2 * self.max_iters, self.iterations + 100)}",
            f"lmtools plot {_shell(self.checkpoint.parent)} --out {_shell(self.out / 'loss.png')}",
        ]


def run_demo(
    out: str | os.PathLike = "lmtools-demo",
    *,
    minutes: float = 3.0,
    max_corpus_mb: float = 8.0,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    log: Callable[[str], None] = lambda _line: None,
) -> DemoResult:
    """Prepare the stdlib corpus, train for about `minutes`, plot the losses and sample."""
    if not 0 < minutes <= MAX_MINUTES:
        raise ConfigError(f"--minutes must be in (0, {MAX_MINUTES}] (a demo of at most a day), got {minutes}")
    if not max_corpus_mb > 0:
        raise ConfigError(f"--max_corpus_mb must be positive, got {max_corpus_mb}")
    start = time.perf_counter()
    out = Path(out)
    claim_folder(out)
    corpus, data_dir, run_dir = out / "corpus.jsonl", out / "data", out / "run"
    n_files, n_bytes = _corpus_step(corpus, max_corpus_mb, seed, log)
    _prepare_step(corpus, data_dir, vocab_size, seed, log)
    cfg, max_iters = _plan_training(data_dir, out, run_dir, minutes, seed, log)
    result, train_seconds = _train_step(cfg, max_iters, log)
    train_curve, val_curve = _loss_curves(run_dir)
    plot_path = _plot_step(run_dir, out / "loss.png", log)
    log("[4/4] sample:")
    samples = sample_lines(Path(cfg.checkpoint_path), seed=seed)
    return DemoResult(
        out=out,
        corpus_files=n_files,
        corpus_bytes=n_bytes,
        data_dir=data_dir,
        checkpoint=Path(cfg.checkpoint_path),
        metrics=run_dir / METRICS_FILE,
        plot=plot_path,
        iterations=result.iteration,
        max_iters=max_iters,
        first_loss=result.losses[0],
        last_loss=train_curve[-1] if train_curve else result.losses[-1],
        first_val_loss=val_curve[0] if val_curve else None,
        last_val_loss=val_curve[-1] if val_curve else None,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
        stopped_early=result.stopped_by_signal or result.stopped_by_time,
        samples=samples,
    )


# ---- the steps ------------------------------------------------------------------------------


def _corpus_step(corpus: Path, max_corpus_mb: float, seed: int, log: Callable[[str], None]) -> tuple[int, int]:
    """[1/4]: the stdlib sources as one jsonl file; (files, bytes)."""
    log(f"[1/4] corpus: Python standard library sources from {stdlib_root()}")
    n_files, n_bytes = write_stdlib_corpus(corpus, int(max_corpus_mb * 1e6), seed=seed)
    log(f"      {n_files} files, {n_bytes / 1e6:.1f} MB -> {corpus}")
    return n_files, n_bytes


def _prepare_step(corpus: Path, data_dir: Path, vocab_size: int, seed: int, log: Callable[[str], None]) -> None:
    """[2/4]: a BPE tokenizer trained on the corpus, and the corpus as token files."""
    t0 = time.perf_counter()
    meta = prepare_corpus([corpus], data_dir, vocab_size=vocab_size, val_fraction=0.02, seed=seed, force=True)
    log(
        f"[2/4] prepare: BPE tokenizer of {meta['vocab_size']} tokens, {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} val tokens ({meta.get('bytes_per_token') or 0:.2f} bytes/token) "
        f"in {time.perf_counter() - t0:.1f}s -> {data_dir}"
    )


def _plan_training(data_dir: Path, out: Path, run_dir: Path, minutes: float, seed: int, log: Callable[[str], None]):
    """[3/4], first half: the run's config, its steps fitted to the budget by a timing probe;
    (config, max_iters)."""
    import torch

    budget = minutes * 60.0
    step_s = probe_step_seconds(demo_config(data_dir, out / "probe", 0, seed))
    max_iters = iterations_for(budget, step_s)
    cfg = demo_config(data_dir, run_dir, max_iters, seed)
    log(
        f"[3/4] train: {MODEL['num_layers']} layers, d_model {MODEL['d_model']}, context {MODEL['context_length']}, "
        f"batch {BATCH_SIZE} on {torch.get_num_threads()} CPU threads; a step takes {step_s:.2f}s, "
        f"so {minutes:g} min is {max_iters} steps"
    )
    cfg.max_minutes = (budget * DEADLINE_FACTOR + 5) / 60
    return cfg, max_iters


def _train_step(cfg, max_iters: int, log: Callable[[str], None]):
    """[3/4], second half: the run itself; (its result, seconds)."""
    from lmtools.training.trainer import train_model

    t0 = time.perf_counter()
    result = train_model(cfg, log=lambda line: log("      " + line))
    train_seconds = time.perf_counter() - t0
    if result.stopped_by_signal or result.stopped_by_time:
        why = "at the time limit (this machine ran slower than the probe)" if result.stopped_by_time else "by a signal"
        log(f"      stopped {why}, iter {result.iteration} of {max_iters}")
    return result, train_seconds


def _loss_curves(run_dir: Path) -> tuple[list[float], list[float]]:
    """The logged train and val losses of the run, in order."""
    curves = read_curves(run_dir)
    return [loss for _, loss in curves.train], [loss for _, loss in curves.val]


def _plot_step(run_dir: Path, plot_path: Path, log: Callable[[str], None]) -> Path | None:
    """The loss plot; None (and a line saying why) without matplotlib."""
    try:
        plot_runs([run_dir], plot_path, title="lmtools demo: Python stdlib")
    except ConfigError as exc:  # matplotlib is an optional extra
        log(f"      no plot: {exc}")
        return None
    return plot_path


# ---- the pieces -----------------------------------------------------------------------------


def claim_folder(out: Path) -> None:
    """Use `out` for the demo: new, empty, or an earlier demo's (whose outputs are replaced)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"--out {out} is not empty and was not written by lmtools demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by lmtools demo; its contents are replaced by the next demo run\n")
    # A fresh run: metrics.jsonl is appended to, so an old one would mix two runs.
    for name in ("run", "data", "probe"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("corpus.jsonl", "loss.png"):
        (out / name).unlink(missing_ok=True)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, test folders and test modules left out, sorted."""
    root = root or stdlib_root()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(Path(folder) / name)
    return found


def write_stdlib_corpus(dest: Path, max_bytes: int, *, seed: int = 0, root: Path | None = None) -> tuple[int, int]:
    """One jsonl document per stdlib module, in a seeded shuffle, until `max_bytes`; (files, bytes)."""
    files = stdlib_sources(root)
    if not files:
        raise DataError(f"found no Python sources under {root or stdlib_root()}; this Python has no stdlib sources")
    random.Random(seed).shuffle(files)  # the cap then takes a bit of every package
    n_files = n_bytes = 0
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            try:
                size = path.stat().st_size
                if size == 0 or size > MAX_FILE_BYTES:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            nbytes = len(text.encode("utf-8"))
            if n_bytes + nbytes > max_bytes and n_files:
                continue  # a smaller module may still fit
            f.write(json.dumps({"text": text}) + "\n")
            n_files += 1
            n_bytes += nbytes
            if n_bytes >= max_bytes * 0.99:
                break
    os.replace(tmp, dest)
    return n_files, n_bytes


def demo_config(data_dir: Path, run_dir: Path, max_iters: int, seed: int = 0):
    """The demo's run. Evaluations fall on logged steps, so each logged loss averages a full window."""
    max_iters = max(max_iters, 1)
    log_interval = max(max_iters // 30, 1)
    return TrainConfig(
        train_data=[str(data_dir / TRAIN_FILE)],
        val_data=str(data_dir / VAL_FILE),
        **MODEL,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        min_learning_rate=MIN_LEARNING_RATE,
        weight_decay=0.1,
        warmup_iters=max(max_iters // 20, 1),
        max_iters=max_iters,
        eval_interval=log_interval * -(-max_iters // (EVALS * log_interval)),
        eval_iters=EVAL_ITERS,
        log_interval=log_interval,
        checkpoint_interval=max_iters,
        checkpoint_path=str(run_dir / "checkpoint.pt"),
        device="cpu",
        seed=seed,
    )


def probe_step_seconds(cfg, warm: int = 3, timed: int = 4) -> float:
    """Seconds per step of the real training loop (data, step, clipping) for `cfg`'s model.

    A few steps of `train_model` itself, timed from its own metrics: the first `warm` steps
    (allocator, kernels, prefetch) are left out. The probe's folder is removed afterwards.
    """
    from lmtools.training.trainer import train_model

    run_dir = Path(cfg.checkpoint_path).parent
    cfg.max_iters, cfg.log_interval, cfg.warmup_iters = warm + timed, warm, 1
    cfg.eval_interval = cfg.checkpoint_interval = 10**9
    cfg.eval_iters = 1  # the last step evaluates (after its timing is taken); keep that short
    try:
        train_model(cfg, log=lambda _line: None)
        lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else {}
        if last.get("iter") != warm + timed or not last.get("tokens_per_s"):
            raise RuntimeError("the timing probe wrote no metrics")
        return cfg.batch_size * cfg.context_length * cfg.grad_accum_steps / last["tokens_per_s"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def iterations_for(budget_s: float, step_s: float) -> int:
    """Steps that fit the budget once evaluation (forward only, ~1/3 of a step) is paid for,
    the one before training (iter 0) included."""
    eval_s = (EVALS + 1) * EVAL_ITERS * step_s / 3
    overhead = 0.06  # logging, data wait, checkpoint writes
    return max(int((budget_s - eval_s) / (step_s * (1 + overhead))), 10)


def sample_lines(checkpoint: Path, *, seed: int = 0, max_new_tokens: int = 60) -> list[tuple[str, str]]:
    """(prompt, continuation) for each demo prompt, sampled at temperature 0.8, top-p 0.95."""
    import torch

    from lmtools.checkpoint import tokenizer_from_checkpoint
    from lmtools.generate import generate_ids, load_model, stream_text

    device = torch.device("cpu")
    model, payload = load_model(checkpoint, device)
    tok = tokenizer_from_checkpoint(payload, checkpoint=checkpoint)
    eot = tok.token_to_id(EOT)
    samples = []
    for i, prompt in enumerate(PROMPTS):
        gen = torch.Generator().manual_seed(seed + i)
        ids = generate_ids(
            model,
            tok.encode(prompt, add_special_tokens=False).ids,
            max_new_tokens,
            temperature=0.8,
            top_p=0.95,
            eot_id=eot,
            generator=gen,
        )
        samples.append((prompt, "".join(stream_text(tok, ids))))
    return samples


def _shell(path: Path) -> str:
    text = str(path)
    if sys.platform != "win32" and any(c in text for c in " '\"$`\\"):
        import shlex

        return shlex.quote(text)
    return text
