"""Speed of lmtools' training step against the loop people write by hand, in the same process.

Both train the same model (the demo's: context 128, d_model 128, 4 layers, 4 heads, d_ff 384,
a 2048-id vocabulary, batch 16) from the same initial weights on the same random token file.

- textbook_loop (the baseline of the ratios): nanoGPT's shape. Windows stacked from numpy
  slices, `F.cross_entropy`, `torch.optim.AdamW` with its default (for-each) implementation,
  `clip_grad_norm_`, and `loss.item()` every step.
- lmtools_step: the body of `lmtools train`'s loop (`Trainer.run`). Batches from the Rust
  sampler's prefetch ring, the loss module, multi-tensor clipping, fused AdamW with the
  non-finite check on the device (`NumericsGuard.step`), and losses read every 10 steps
  (`NumericsGuard.read`), as at a log interval of 10.
- baseline_REV (only with LMTOOLS_BASELINE_REV=REV): the same step as `lmtools/training/trainer.py` wrote
  it at git revision REV, loaded from git into this process, to compare a change of the
  training core with what it replaced in the same run.

The two run in turn, `STEPS` steps each, round after round, so that load from other work hits
them alike; the table gives the median round of each and the ratio of the medians.

Run: `python -m pytest benchmarks/bench_train_step.py`. With LMTOOLS_WRITE_RESULTS=1 the table
is also written to benchmarks/RESULTS_train_step.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmtools.config.train_config import TrainConfig
from lmtools.data.dataset import plan_data
from lmtools.runtime.distributed import DistInfo
from lmtools.training.plan import RunPlan
from lmtools.training.trainer import Trainer

MODEL = dict(vocab_size=2048, context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=384)
BATCH = 16
STEPS = 20
ROUNDS = 7
READ_EVERY = 10
TIMES: dict[str, list[float]] = {}  # name -> seconds per step, one entry per round


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train-step") / "train.npy"
    np.save(path, np.random.default_rng(0).integers(0, MODEL["vocab_size"], 2_000_000).astype(np.uint16))
    return path


def bench_config(tokens: Path, folder: Path) -> TrainConfig:
    return TrainConfig(
        train_data=[str(tokens)],
        **MODEL,
        batch_size=BATCH,
        learning_rate=1e-3,
        min_learning_rate=1e-4,
        warmup_iters=0,
        max_iters=10**9,
        checkpoint_path=str(folder / "ckpt.pt"),
        metrics=False,
    )


def make_trainer(tokens: Path, folder: Path) -> Trainer:
    cfg = bench_config(tokens, folder)
    return Trainer(
        RunPlan(cfg, cfg.to_dict(), plan_data(cfg)), torch.device("cpu"), DistInfo(), lambda _line: None, None
    )


def baseline_steps(rev: str, tokens: Path, folder: Path):
    """The training core as of git revision `rev`, its Trainer built on the same config, and a
    function that takes STEPS of its steps. That Trainer's API: `Trainer(cfg, payload, ...)`,
    `step(lr)`, `settle()`, which revisions before 311d8f3 have."""
    import importlib.util
    import subprocess

    for path in ("lmtools/training/trainer.py", "lmtools/train.py"):  # the training core before and after the move
        shown = subprocess.run(
            ["git", "show", f"{rev}:{path}"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        if shown.returncode == 0:
            break
    source = shown.stdout
    spec = importlib.util.spec_from_loader("lmtools._train_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    cfg = bench_config(tokens, folder)
    trainer = module.Trainer(cfg, None, torch.device("cpu"), DistInfo(), lambda _line: None, None)

    def steps() -> None:
        for i in range(STEPS):
            trainer.step(1e-3)
            trainer.iteration += 1
            if (i + 1) % READ_EVERY == 0:
                trainer.settle()

    return trainer, steps


class TextbookLoop:
    """The loop of nanoGPT's train.py, on the same model and initial weights."""

    def __init__(self, trainer: Trainer, tokens: Path):
        import copy

        self.model = copy.deepcopy(trainer.model)
        self.data = np.load(tokens, mmap_mode="r")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        self.rng = np.random.default_rng(1)

    def step(self) -> float:
        t = MODEL["context_length"]
        starts = self.rng.integers(0, len(self.data) - t - 1, BATCH)
        x = torch.stack([torch.from_numpy(self.data[i : i + t].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(self.data[i + 1 : i + 1 + t].astype(np.int64)) for i in starts])
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def test_train_step_interleaved(benchmark, tokens, tmp_path):
    trainer = make_trainer(tokens, tmp_path)
    textbook = TextbookLoop(trainer, tokens)

    def lmtools_steps() -> None:  # the body of Trainer.run's loop
        for i in range(STEPS):
            trainer.set_learning_rate(trainer.state.iteration + 1)
            loss = trainer.forward_backward()
            trainer.guard.step(trainer.state.iteration + 1, loss, trainer.clip_gradients())
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.state.iteration += 1
            if (i + 1) % READ_EVERY == 0:
                trainer.guard.read()

    def textbook_steps() -> None:
        for _ in range(STEPS):
            textbook.step()

    runs = {"textbook_loop": textbook_steps, "lmtools_step": lmtools_steps}
    baseline = None
    if rev := os.environ.get("LMTOOLS_BASELINE_REV"):
        baseline, runs[f"baseline_{rev}"] = baseline_steps(rev, tokens, tmp_path / "baseline")
    for fn in runs.values():  # warm-up: first allocations, thread pools, the prefetch ring
        fn()

    def rounds() -> None:
        for _ in range(ROUNDS):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                TIMES.setdefault(name, []).append((time.perf_counter() - start) / STEPS)

    try:
        benchmark.pedantic(rounds, rounds=1, iterations=1)
    finally:
        trainer.close()
        if baseline is not None:
            baseline.close()
    # Every lmtools step was read back, and none diverged.
    assert all(np.isfinite(trainer.guard.losses)) and len(trainer.guard.losses) == STEPS * (ROUNDS + 1)


def summary() -> list[str]:
    base = statistics.median(TIMES["textbook_loop"])
    tokens_per_step = BATCH * MODEL["context_length"]
    lines = [
        f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"median of {ROUNDS} interleaved rounds of {STEPS} steps; load average at the end "
        f"{os.getloadavg()[0]:.1f}",
        "",
        "| loop | ms/step | tokens/s | vs textbook_loop |",
        "|---|---|---|---|",
    ]
    for name, times in sorted(TIMES.items(), key=lambda kv: statistics.median(kv[1])):
        med = statistics.median(times)
        lines.append(f"| {name} | {1e3 * med:.1f} | {tokens_per_step / med:,.0f} | {base / med:.2f}x |")
    for name in [n for n in TIMES if n.startswith("baseline_")]:
        # Per-round ratios: each round ran both steps back to back, under the same load.
        ratios = [b / a for a, b in zip(TIMES["lmtools_step"], TIMES[name])]
        lines += [
            "",
            f"lmtools_step vs {name}, speed ratio per round: median {statistics.median(ratios):.3f} "
            f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})",
        ]
    return lines


class _Summary:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if len(TIMES) < 2:
            return
        lines = summary()
        terminalreporter.write_line("")
        for line in lines:
            terminalreporter.write_line(line)
        if os.environ.get("LMTOOLS_WRITE_RESULTS"):
            legend = "\n\n".join(__doc__.split("\n\n")[1:4])
            (Path(__file__).parent / "RESULTS_train_step.md").write_text(
                "# Training step on the CPU\n\n"
                + "\n".join(lines)
                + "\n\n"
                + legend
                + "\n\nReproduce: `LMTOOLS_WRITE_RESULTS=1 python -m pytest benchmarks/bench_train_step.py`\n",
                encoding="utf-8",
            )


@pytest.fixture(scope="module", autouse=True)
def report(request):
    request.config.pluginmanager.register(_Summary(), "lmtools-train-step-summary")
    yield
