"""The recipe options against the specification's run, on the CPU, on a real corpus.

Run (not part of the test suite; about `len(arms) * seeds * steps * 0.3 s` on 2 cores):

    python benchmarks/bench_recipe.py --steps 400 --seeds 0 1 --out /tmp/bench-recipe \
        --results benchmarks/RESULTS_recipe.md

The corpus is the Python standard library's sources, gathered as `lmtools demo` does (one
document per module), with the demo's tokenizer size, model shape, batch and learning rates.
Every arm trains the same number of steps on the same schedule, each in its own process on one
thread. The arms of one seed run side by side (launched in an order rotated per seed), so
that load from other work on the machine hits every arm alike, and time is measured as each
process's own CPU seconds, evaluations left out: on one thread that is the wall-clock time the
run takes on an idle core, whatever else the machine does. Reported per arm, as mean ±
standard deviation over the seeds: final validation bits per byte, its ratio to the default's
at the same seed, training CPU seconds, and the CPU seconds it took to first reach the
default's final validation loss of the same seed, as a fraction of the default's own
(interpolated between evaluations; "-" when it never got there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# Each arm: the options it sets on top of the specification's run.
ARMS: dict[str, dict] = {
    "default": {},
    "muon": {"optimizer": "muon"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"ffn": "relu2"},
    "zero_init_proj": {"zero_init_proj": True},
    "logit_softcap": {"logit_softcap": 30.0},
    "doc_aligned": {"doc_aligned": True},
    "modern": {"recipe": "modern"},
}
EVALS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--arms", nargs="+", default=list(ARMS), help=f"from {', '.join(ARMS)}, or NAME=JSON for a custom arm"
    )
    p.add_argument("--out", type=Path, default=Path("bench-recipe"))
    p.add_argument("--corpus_mb", type=float, default=4.0)
    p.add_argument("--eval_iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time (0: all arms of a seed together)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and corpus: checks the script itself")
    p.add_argument("--results", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="print one table from the results.json of earlier runs (e.g. one per seed)",
    )
    p.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)  # one run, in a child
    return p.parse_args(argv)


def arm_options(name: str) -> dict:
    if "=" in name:
        return json.loads(name.split("=", 1)[1])
    return ARMS[name]


def arm_name(name: str) -> str:
    return name.split("=", 1)[0]


def prepare(out: Path, corpus_mb: float, tiny: bool) -> Path:
    """The stdlib corpus, tokenized once for every run."""
    from lmtools.data.prepare import prepare_corpus
    from lmtools.demo import VOCAB_SIZE, write_stdlib_corpus

    data = out / "data"
    if (data / "meta.json").is_file():
        return data
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    write_stdlib_corpus(corpus, int(corpus_mb * 1e6), seed=0)
    prepare_corpus([corpus], data, vocab_size=512 if tiny else VOCAB_SIZE, val_fraction=0.05, seed=0, force=True)
    return data


def run_config(args: argparse.Namespace, data: Path, run_dir: Path, seed: int, options: dict):
    from lmtools.demo import demo_config

    cfg = demo_config(data, run_dir, args.steps, seed)
    if args.tiny:
        cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff = 32, 32, 2, 2, 64
        cfg.batch_size = 4
    interval = max(args.steps // EVALS, 1)
    cfg.eval_interval = cfg.log_interval = interval
    cfg.eval_iters = args.eval_iters
    cfg.checkpoint_interval = 10**9  # one checkpoint, at the end
    cfg.overwrite = True
    for name, value in options.items():
        setattr(cfg, name, value)
    return cfg


def run_one(spec: str) -> None:
    """In a child process: one training run, from a JSON spec."""
    import time

    import torch

    import lmtools.training.trainer
    from lmtools.config.train_config import TrainConfig
    from lmtools.training.trainer import train_model

    job = json.loads(spec)
    torch.set_num_threads(job["threads"])
    cfg = TrainConfig(**job["config"])
    # CPU seconds of training alone: evaluation's share is counted and taken out.
    validation_loss, eval_cpu = lmtools.training.trainer.validation_loss, [0.0]

    def timed_evaluate(*args, **kw):
        t0 = time.process_time()
        try:
            return validation_loss(*args, **kw)
        finally:
            eval_cpu[0] += time.process_time() - t0

    lmtools.training.trainer.validation_loss = timed_evaluate
    start, cpu = time.process_time(), {}

    def on_step(iteration, _max_iters, _loss, _lr):
        cpu[iteration] = time.process_time() - start - eval_cpu[0]

    train_model(cfg, explicit=frozenset(job["options"]), log=lambda _line: None, on_step=on_step)
    (Path(cfg.checkpoint_path).parent / "cpu.json").write_text(json.dumps(cpu))


def curve(run_dir: Path) -> list[dict]:
    """Evaluations in order: iter, val loss, val bpb, training CPU seconds so far, wall seconds."""
    cpu = {int(k): v for k, v in json.loads((run_dir / "cpu.json").read_text()).items()}
    points = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            points.append(
                {
                    "iter": rec["iter"],
                    "val_loss": rec["val_loss"],
                    "val_bpb": rec.get("val_bpb"),
                    "train_s": cpu[rec["iter"]],
                    "wall_s": rec["elapsed_s"],
                }
            )
    return points


def time_to(points: list[dict], target: float) -> float | None:
    """Training seconds at which the validation loss first reaches `target` (linear between evaluations)."""
    prev_s, prev_loss = 0.0, math.inf
    for p in points:
        if p["val_loss"] <= target:
            if not math.isfinite(prev_loss):
                return p["train_s"]
            frac = (prev_loss - target) / (prev_loss - p["val_loss"])
            return prev_s + frac * (p["train_s"] - prev_s)
        prev_s, prev_loss = p["train_s"], p["val_loss"]
    return None


def run_all(args: argparse.Namespace) -> dict:
    data = prepare(args.out, args.corpus_mb, args.tiny)
    results: dict[str, dict[int, list[dict]]] = {arm_name(a): {} for a in args.arms}
    for round_no, seed in enumerate(args.seeds):
        shift = round_no % len(args.arms)
        order = args.arms[shift:] + args.arms[:shift]
        width = args.parallel or len(order)
        for first in range(0, len(order), width):
            running = []
            for arm in order[first : first + width]:
                name, options = arm_name(arm), arm_options(arm)
                run_dir = args.out / "runs" / f"{name}-seed{seed}"
                cfg = run_config(args, data, run_dir, seed, options)
                job = {"config": cfg.to_dict(), "options": sorted(options), "threads": args.threads}
                running.append((name, run_dir, subprocess.Popen([sys.executable, __file__, "--one", json.dumps(job)])))
            for name, run_dir, proc in running:
                if proc.wait() != 0:
                    raise SystemExit(f"the {name} run of seed {seed} failed")
                points = curve(run_dir)
                results[name][seed] = points
                print(
                    f"{name:>16} seed {seed}: val bpb {points[-1]['val_bpb']:.4f}, "
                    f"{points[-1]['train_s']:.1f} CPU s, {points[-1]['wall_s']:.0f} s wall",
                    flush=True,
                )
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
    )
    return results


def combine(paths: list[Path]) -> dict:
    """The runs of several results.json files as one {arm: {seed: points}}."""
    merged: dict[str, dict[int, list[dict]]] = {}
    for path in paths:
        for name, runs in json.loads(path.read_text())["results"].items():
            merged.setdefault(name, {}).update({int(seed): points for seed, points in runs.items()})
    return merged


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def table(results: dict) -> str:
    base = results["default"]
    seeds = sorted(base)
    steps = base[seeds[0]][-1]["iter"]
    lines = [
        f"| arm | final val bpb ({steps} steps) | vs default | train CPU s | CPU time to default's final val loss | reached |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        bpb = [runs[s][-1]["val_bpb"] for s in seeds]
        ratio = [runs[s][-1]["val_bpb"] / base[s][-1]["val_bpb"] for s in seeds]
        secs = [runs[s][-1]["train_s"] for s in seeds]
        reach = [time_to(runs[s], base[s][-1]["val_loss"]) for s in seeds]
        reach_ratio = [t / base[s][-1]["train_s"] for s, t in zip(seeds, reach) if t is not None]
        lines.append(
            f"| {name} | {_mean_sd(bpb, '.4f')} | {_mean_sd(ratio, '.3f')}x | {_mean_sd(secs, '.0f')} | "
            f"{_mean_sd(reach_ratio, '.2f') + ('x' if reach_ratio else '')} | {len(reach_ratio)}/{len(seeds)} |"
        )
    per_seed = [
        "",
        "Per seed, final val bpb:",
        "",
        "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name, runs in results.items():
        per_seed.append(f"| {name} | " + " | ".join(f"{runs[s][-1]['val_bpb']:.4f}" for s in seeds) + " |")
    return "\n".join(lines + per_seed)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        run_one(args.one)
        return
    if args.combine:
        results = combine(args.combine)
        args.seeds = sorted({seed for runs in results.values() for seed in runs})
    else:
        if "default" not in [arm_name(a) for a in args.arms]:
            args.arms = ["default", *args.arms]
        results = run_all(args)
    import torch

    header = (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
        f"torch {torch.__version__} · seeds {' '.join(map(str, args.seeds))}"
    )
    text = f"{header}\n\n{table(results)}\n"
    print(text)
    if args.results is not None:
        args.results.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
