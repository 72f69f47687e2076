"""GPU training throughput of a GPT-2-small-sized model: tokens/s, MFU, data wait, peak memory.

Run on a CUDA machine (not part of the test suite):

    python benchmarks/gpu_throughput.py --iters 100 --batch_size 32

It writes a 200M-token uint16 token file (random ids), trains through `lmtools.train_model`
with bf16 autocast and torch.compile, and prints a Markdown table from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmtools.config import TrainConfig
from lmtools.train import train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--context_length", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=200_000_000)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.npy"
        arr = np.lib.format.open_memmap(data, mode="w+", dtype=np.uint16, shape=(args.tokens,))
        arr[:] = np.random.default_rng(0).integers(0, 50257, args.tokens, dtype=np.uint16)
        arr.flush()
        del arr
        cfg = TrainConfig(
            train_data=[str(data)], vocab_size=50304, context_length=args.context_length, d_model=768,
            num_layers=12, num_heads=12, d_ff=3072, batch_size=args.batch_size, learning_rate=6e-4,
            min_learning_rate=6e-5, warmup_iters=10, max_iters=args.iters, log_interval=max(args.iters // 5, 1),
            eval_interval=10**9, checkpoint_interval=10**9, checkpoint_path=str(Path(tmp) / "ckpt.pt"),
            device="cuda", dtype=args.dtype, compile=not args.no_compile,
        )
        train_model(cfg, log=print)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first window holds compilation
    name = torch.cuda.get_device_name()
    tok_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    mfu = sum(r.get("mfu", 0.0) for r in steady) / len(steady)
    wait = sum(r["data_wait"] for r in steady) / len(steady)
    mem = max(r.get("peak_mem_gib", 0.0) for r in records)
    print(f"\n| device | config | tokens/s | MFU | data wait | peak memory |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {name} | d768 L12 H12 T{args.context_length} B{args.batch_size} {args.dtype}"
        f"{'' if args.no_compile else ' compile'} | {tok_s:,.0f} | {100 * mfu:.1f}% | {100 * wait:.2f}% | {mem:.1f} GiB |"
    )


if __name__ == "__main__":
    main()
