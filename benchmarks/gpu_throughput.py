"""Training throughput of a GPT-2-small-sized model: tokens/s, MFU, data wait, peak memory.

Run on a CUDA machine (not part of the test suite):

    python benchmarks/gpu_throughput.py --batch_size 16 32 --iters 100

For each batch size it writes nothing but a temporary uint16 token file (random ids), trains
through `lmtools.train_model` exactly as `lmtools train` does (bf16 autocast, torch.compile by
default), and prints a Markdown table from the run's metrics.jsonl, with the date and device.
The first logged window holds compilation and is left out of the averages. `--device cpu`
with a small model checks the script itself on a machine without a GPU (no MFU there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmtools.config.train_config import TrainConfig
from lmtools.model import MODEL_FIELDS
from lmtools.training.trainer import train_model

# nanoGPT's learning rates for GPT-2 and a short warm-up: the throughput does not depend on them.
SCHEDULE = dict(learning_rate=6e-4, min_learning_rate=6e-5, warmup_iters=10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--windows", type=int, default=5, help="log windows per run (the first is left out)")
    parser.add_argument("--context_length", type=int, default=1024)
    parser.add_argument("--d_model", type=int, default=768)
    parser.add_argument("--num_layers", type=int, default=12)
    parser.add_argument("--num_heads", type=int, default=12)
    parser.add_argument("--d_ff", type=int, default=3072)
    # 50257 padded to a multiple of 64, as nanoGPT does: the lm_head matmul tiles evenly.
    parser.add_argument("--vocab_size", type=int, default=50304)
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, batch_size: int, data: Path, folder: Path) -> dict:
    """One training run; the averages of its steady-state log windows."""
    cfg = TrainConfig(
        train_data=[str(data)],
        **{name: value for name, value in vars(args).items() if name in MODEL_FIELDS},
        batch_size=batch_size,
        **SCHEDULE,
        max_iters=args.iters,
        log_interval=max(args.iters // args.windows, 1),
        eval_interval=10**9,
        checkpoint_interval=10**9,
        checkpoint_path=str(folder / "ckpt.pt"),
        device=args.device,
        dtype=args.dtype,
        compile=not args.no_compile,
        metrics=True,
    )
    train_model(cfg, log=print)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    mean = lambda key: sum(r.get(key, 0.0) for r in steady) / len(steady)  # noqa: E731
    return {
        "batch_size": batch_size,
        "tokens_per_s": mean("tokens_per_s"),
        "mfu": mean("mfu") if "mfu" in steady[-1] else None,
        "data_wait": mean("data_wait"),
        "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in records) if "peak_mem_gib" in records[-1] else None,
    }


def table(args: argparse.Namespace, rows: list[dict]) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    model = (
        f"d{args.d_model} L{args.num_layers} H{args.num_heads} ff{args.d_ff} V{args.vocab_size} "
        f"T{args.context_length} {args.dtype}{'' if args.no_compile else ' compiled'}"
    )
    lines = [
        f"{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}, {model}, {args.iters} steps",
        "",
        "| batch | tokens/s | MFU | data wait | peak memory |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
        lines.append(f"| {r['batch_size']} | {r['tokens_per_s']:,.0f} | {mfu} | {100 * r['data_wait']:.2f}% | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu to check the script)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.npy"
        arr = np.lib.format.open_memmap(data, mode="w+", dtype=np.uint16, shape=(args.tokens,))
        arr[:] = np.random.default_rng(0).integers(0, min(args.vocab_size, 50257), args.tokens, dtype=np.uint16)
        arr.flush()
        del arr
        for batch_size in args.batch_size:
            folder = Path(tmp) / f"b{batch_size}"
            folder.mkdir()
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            rows.append(run(args, batch_size, data, folder))
    print()
    print(table(args, rows))


if __name__ == "__main__":
    main()
