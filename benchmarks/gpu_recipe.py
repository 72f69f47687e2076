"""The default run against `--recipe modern` on a GPU, at the GPT-2-small shape, for a fixed
wall-clock budget per arm: validation loss, bits per byte and tokens/s as a Markdown table.

Run on a CUDA machine (no network needed; not part of the test suite):

    python benchmarks/gpu_recipe.py --seconds 90 [--data PREPARED_FOLDER_OR_TOKENS.npy]

Without `--data` the corpus is Python source that ships with the machine: the standard
library (as `lmtools demo` gathers it) and the installed packages' modules (torch's among
them), one document per module, up to `--corpus_mb`, tokenized here with a byte-level BPE of
`--vocab_size` tokens. The table's header says how many epochs of it each arm saw. A bare `.npy`
token file gives its last 2% as validation. Each arm first times a few steps (which also warms
torch.compile's cache), turns the budget into a step count so that its cosine schedule runs
its whole course, then trains (bf16, compiled, as `benchmarks/gpu_throughput.py` does).
`--tiny` runs a tiny model on the CPU, uncompiled: it checks the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmtools.config.train_config import TrainConfig
from lmtools.training.trainer import train_model

ARMS = {"default": {}, "modern": {"recipe": "modern"}}
GPT2_SMALL = dict(context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=3072)
TINY = dict(context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=90.0, help="training budget per arm")
    p.add_argument("--data", type=Path, default=None, help="a prepared folder or a .npy token file")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=6e-4)
    p.add_argument("--corpus_mb", type=float, default=64.0, help="Python source to tokenize when --data is not given")
    p.add_argument("--vocab_size", type=int, default=8192, help="BPE size when --data is not given")
    p.add_argument("--probe_steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU, uncompiled: checks the script")
    return p.parse_args(argv)


def data_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, float | None]:
    """(train file, val file, bytes per token or None); sets args.model_vocab for a bare file."""
    from lmtools.data.prepare import read_meta

    if args.data is None:
        import sysconfig

        from lmtools.data.prepare import prepare_corpus
        from lmtools.demo import write_stdlib_corpus

        budget = int(args.corpus_mb * 1e6)
        _, stdlib_bytes = write_stdlib_corpus(tmp / "stdlib.jsonl", budget, seed=0)
        corpora = [tmp / "stdlib.jsonl"]
        if budget > stdlib_bytes:
            packages = Path(sysconfig.get_paths()["purelib"])
            write_stdlib_corpus(tmp / "packages.jsonl", budget - stdlib_bytes, seed=0, root=packages)
            corpora.append(tmp / "packages.jsonl")
        prepare_corpus(corpora, tmp / "data", vocab_size=args.vocab_size, val_fraction=0.02, seed=0, force=True)
        args.data = tmp / "data"
    if args.data.is_dir():
        meta = read_meta(args.data)
        args.train_tokens = int(np.load(args.data / "train.npy", mmap_mode="r").shape[0])
        return args.data / "train.npy", args.data / "val.npy", (meta or {}).get("bytes_per_token")
    tokens = np.load(args.data, mmap_mode="r")
    args.model_vocab = -(-(int(tokens.max()) + 1) // 64) * 64  # no meta.json: from the ids, padded
    cut = len(tokens) - max(len(tokens) // 50, 4096)
    args.train_tokens = cut
    # Train on the head only, so that no validation window was trained on.
    np.save(tmp / "train.npy", np.asarray(tokens[:cut]))
    np.save(tmp / "val.npy", np.asarray(tokens[cut:]))
    meta = read_meta(args.data) if (args.data.parent / "meta.json").is_file() else None
    if meta:
        args.model_vocab = int(meta["vocab_size"])
    return tmp / "train.npy", tmp / "val.npy", (meta or {}).get("bytes_per_token")


def arm_config(args, train: Path, val: Path, folder: Path, options: dict, max_iters: int) -> TrainConfig:
    shape = TINY if args.tiny else GPT2_SMALL
    interval = max(max_iters // 4, 1)
    cfg = TrainConfig(
        train_data=[str(train)],
        val_data=str(val),
        **shape,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        min_learning_rate=args.learning_rate / 10,
        weight_decay=0.1,
        warmup_iters=max(min(max_iters // 20, 100), 1),
        max_iters=max_iters,
        eval_interval=interval,
        eval_iters=4 if args.tiny else 20,
        log_interval=interval,
        checkpoint_interval=10**9,
        checkpoint_path=str(folder / "ckpt.pt"),
        device="cpu" if args.tiny else "cuda",
        compile=not args.tiny,
        seed=args.seed,
        overwrite=True,
        # A safety net: a slower machine than the probe promised still stops near the budget.
        max_minutes=1.25 * args.seconds / 60 + 1.0,
    )
    for name, value in options.items():
        setattr(cfg, name, value)
    if getattr(args, "model_vocab", None):
        cfg.vocab_size = args.model_vocab
    return cfg


def probe_steps_per_second(args, train, val, folder, options) -> float:
    """Steps per second after the first (compiling) window, from the run's own metrics."""
    cfg = arm_config(args, train, val, folder, options, args.probe_steps)
    cfg.log_interval, cfg.eval_interval, cfg.eval_iters = args.probe_steps // 2, 10**9, 1
    train_model(cfg, explicit=frozenset(options), log=lambda _line: None)
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(folder)
    return last["tokens_per_s"] / (cfg.batch_size * cfg.context_length)


def run_arm(args, name: str, train: Path, val: Path, tmp: Path, bytes_per_token) -> dict:
    options = dict(ARMS[name])
    if options and not (Path(train).parent / "meta.json").is_file():
        options["doc_aligned"] = False  # a bare token file does not name its end-of-text id
    steps_per_s = probe_steps_per_second(args, train, val, tmp / f"{name}-probe", options)
    max_iters = max(int(args.seconds * steps_per_s), 4)
    folder = tmp / name
    cfg = arm_config(args, train, val, folder, options, max_iters)
    start = time.perf_counter()
    result = train_model(cfg, explicit=frozenset(options), log=print)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    val_loss = result.last_val_loss
    return {
        "arm": name,
        "steps": result.iteration,
        "planned": max_iters,
        "wall_s": wall,
        "epochs": result.iteration * cfg.batch_size * cfg.context_length / args.train_tokens,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "val_loss": val_loss,
        "val_bpb": val_loss / math.log(2) / bytes_per_token if val_loss is not None and bytes_per_token else None,
        "curve": [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r],
    }


def table(args, rows: list[dict]) -> str:
    device = "cpu (tiny)" if args.tiny else torch.cuda.get_device_name()
    shape = TINY if args.tiny else GPT2_SMALL
    lines = [
        f"{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}, "
        f"d{shape['d_model']} L{shape['num_layers']} T{shape['context_length']} batch {args.batch_size}"
        f"{'' if args.tiny else ' bf16 compiled'}, {args.seconds:g} s per arm, data {args.data}",
        "",
        "| arm | steps | epochs | tokens/s | val loss | val bpb | vs default | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next((r for r in rows if r["arm"] == "default"), None)
    for r in rows:
        bpb = "n/a" if r["val_bpb"] is None else f"{r['val_bpb']:.4f}"
        ratio = f"{r['val_loss'] / base['val_loss']:.3f}x" if base and base["val_loss"] and r["val_loss"] else "n/a"
        lines.append(
            f"| {r['arm']} | {r['steps']} | {r['epochs']:.2f} | {r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} | {bpb} | {ratio} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --tiny to check the script on the CPU)")
    if args.tiny:
        args.batch_size, args.learning_rate, args.probe_steps = 4, 3e-3, 6
        args.corpus_mb, args.vocab_size = min(args.corpus_mb, 0.3), min(args.vocab_size, 512)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, val, bytes_per_token = data_folder(args, tmp)
        rows = [run_arm(args, name, train, val, tmp, bytes_per_token) for name in args.arms]
    text = table(args, rows)
    print()
    print(text)
    print()
    print("validation curves (iter, loss):", json.dumps({r["arm"]: r["curve"] for r in rows}))
    return text


if __name__ == "__main__":
    main()
