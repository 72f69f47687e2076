"""The training core: set-up, the loop, evaluation and checkpoints.

`train_model` reads top to bottom: resolve the device and data, build the model and optimizer,
restore a checkpoint when resuming, then loop. The loop takes its batches from one
`BatchLoader`, and calls out for logging, evaluation and checkpointing.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmtools import __version__
from lmtools.checkpoint import FORMAT_VERSION, keep_snapshot, load_state, read_checkpoint, save_checkpoint
from lmtools.config import DEFAULT_VOCAB_SIZE, TrainConfig
from lmtools.data import BatchLoader, parse_source_spec
from lmtools.device import peak_flops, resolve_device
from lmtools.distributed import DistInfo, all_reduce_mean, any_rank, barrier, init_distributed, shutdown
from lmtools.errors import ConfigError, DataError, LMToolsError
from lmtools.metrics import MetricsWriter, SpikeDetector, format_log_line
from lmtools.model import TransformerLM
from lmtools.prepare import read_meta
from lmtools.optim import cross_entropy, make_optimizer, run_get_lr_cosine_schedule, run_gradient_clipping


class TrainingDiverged(LMToolsError):
    """The loss or gradient norm stopped being finite."""


@dataclass
class TrainResult:
    iteration: int
    checkpoint_path: str
    last_loss: float | None = None
    last_val_loss: float | None = None
    stopped_by_signal: bool = False
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)


# ---- set-up helpers -----------------------------------------------------------------------


def resolve_data(cfg: TrainConfig, explicit_vocab: bool) -> TrainConfig:
    """Fill vocab size, validation file and tokenizer from a prepared dataset's meta.json.

    A prepared folder given as --train_data means its train.npy.
    """
    train = []
    for spec in cfg.train_data:
        path = Path(spec)
        if path.is_dir() and (path / "train.npy").is_file() and (path / "meta.json").is_file():
            spec = str(path / "train.npy")
        train.append(spec)
    cfg.train_data = train
    meta = read_meta(parse_source_spec(train[0])[0]) if len(train) == 1 else None
    if meta is None:
        if cfg.vocab_size is None:
            cfg.vocab_size = DEFAULT_VOCAB_SIZE
        return cfg
    meta_vocab = int(meta["vocab_size"])
    if explicit_vocab and cfg.vocab_size is not None and cfg.vocab_size != meta_vocab:
        raise ConfigError(
            f"--vocab_size {cfg.vocab_size} contradicts the dataset's meta.json ({meta_vocab}); drop the flag"
        )
    cfg.vocab_size = meta_vocab
    folder = Path(train[0]).parent
    if cfg.val_data is None and (folder / "val.npy").is_file() and Path(train[0]).name == "train.npy":
        cfg.val_data = str(folder / "val.npy")
    if cfg.tokenizer is None and meta.get("tokenizer"):
        tok = Path(meta["dir"]) / meta["tokenizer"]
        if tok.is_file():
            cfg.tokenizer = str(tok.resolve())
    return cfg


def _absolute(spec: str) -> str:
    """Absolute path of a data spec (keeping a `:weight` suffix), so resume works from anywhere."""
    path, weight = parse_source_spec(spec)
    return str(Path(path).resolve()) + (f":{weight}" if weight is not None else "")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def rng_state(device: torch.device) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _numpy_state_to_plain(state) -> tuple:
    # weights_only loading accepts tensors and plain data, not numpy arrays.
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopSignal:
    """SIGTERM/SIGINT: the first asks for a checkpoint and a clean exit; a second exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Checkpoints are written by atomic rename, so stopping mid-write loses nothing.
            import os

            os._exit(128 + signum)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ---- the core -----------------------------------------------------------------------------


def train_model(
    cfg: TrainConfig,
    *,
    resume_from: str | None = None,
    explicit: frozenset[str] = frozenset(),
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int, float, float], None] | None = None,
) -> TrainResult:
    """Train (or resume) a TransformerLM as `cfg` describes; returns where it stopped.

    `explicit` names the flags the user typed, so that a resumed run can tell an override
    (max_iters, log_interval, ...) from a contradiction (a different model shape).
    `on_step(iteration, max_iters, loss, lr)` is called after every step (for a progress bar).
    """
    payload = None
    if resume_from is not None:
        payload = read_checkpoint(resume_from)
        cfg = merge_resume_config(payload, cfg, explicit)
    else:
        cfg = resolve_data(cfg, explicit_vocab="vocab_size" in explicit)
    cfg.validate()
    device = resolve_device(cfg.device)
    dist_info, device = init_distributed(device)
    try:
        if not dist_info.is_main:
            log, on_step = (lambda _line: None), None
        return _train(cfg, payload, device, dist_info, log, on_step)
    finally:
        shutdown(dist_info)


def merge_resume_config(payload: dict, cfg: TrainConfig, explicit: frozenset[str]) -> TrainConfig:
    stored = payload.get("config")
    if not isinstance(stored, dict):
        raise ConfigError("the checkpoint holds no run config; it was not written by lmtools train")
    resumed = TrainConfig.from_dict(stored)
    model_fields = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta")
    for name in explicit:
        ours, theirs = getattr(cfg, name, None), getattr(resumed, name, None)
        if name in model_fields and ours != theirs:
            raise ConfigError(
                f"--{name} {ours} contradicts the checkpoint, which was trained with {name}={theirs}; "
                f"drop the flag to resume"
            )
        if name not in model_fields and name not in ("train_data", "resume"):
            setattr(resumed, name, ours)
    return resumed


def _train(cfg: TrainConfig, payload: dict | None, device: torch.device, dist_info: DistInfo, log, on_step) -> TrainResult:
    seed_everything(cfg.seed + dist_info.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Data.
    train_specs = [_absolute(s) for s in cfg.train_data]
    loader = BatchLoader(
        train_specs, cfg.batch_size, cfg.context_length, device,
        seed=cfg.seed, rank=dist_info.rank, grad_accum_steps=cfg.grad_accum_steps, dtype=cfg.data_dtype,
    )
    val_loader = None
    if cfg.val_data:
        cfg.val_data = _absolute(cfg.val_data)
        # A fixed seed and batch_at(i): every evaluation sees the same windows.
        val_loader = BatchLoader(
            [cfg.val_data], cfg.batch_size, cfg.context_length, device, seed=cfg.seed + 1, prefetch=0,
            dtype=cfg.data_dtype,
        )
    cfg.train_data = train_specs
    check_token_range(loader, cfg.vocab_size, "--train_data")
    if val_loader is not None:
        check_token_range(val_loader, cfg.vocab_size, "--val_data")

    # Model and optimizer.
    model = TransformerLM.from_config(cfg.model_config()).to(device)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, device)
    start_iter = 0
    spikes = SpikeDetector(cfg.spike_zscore)
    skipped = 0
    if payload is not None:
        start_iter = load_state(payload, model, optimizer)
        loader.load_state_dict(payload.get("sampler", {}))
        spikes.load_state_dict(payload.get("spikes", {}))
        skipped = int(payload.get("skipped_steps", 0))
        if "rng" in payload:
            set_rng_state(payload["rng"], device)
    dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_module: torch.nn.Module = model
    if dist_info.enabled:
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_module = torch.compile(train_module)
    amp = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )

    ckpt_path = Path(cfg.checkpoint_path)
    if dist_info.is_main:
        check_checkpoint_folder(ckpt_path)
        if payload is None and ckpt_path.exists() and not cfg.overwrite:
            raise ConfigError(
                f"{ckpt_path} already holds a checkpoint; continue it with --resume, "
                f"or pass --overwrite to start a new run over it"
            )
    metrics = MetricsWriter(ckpt_path.with_name("metrics.jsonl") if cfg.metrics and dist_info.is_main else None)
    if payload is not None:
        metrics.truncate_after(start_iter)

    for line in header_lines(cfg, loader, val_loader, model, device, dtype, dist_info):
        log(line)
    if payload is not None:
        log(f"Resumed from {ckpt_path} at iter {start_iter}")

    tokens_per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum_steps * dist_info.world_size
    flops_per_token = model.config.flops_per_token()
    peak = peak_flops(device)
    result = TrainResult(iteration=start_iter, checkpoint_path=str(ckpt_path), skipped_steps=skipped)
    last_metrics: dict = dict(payload.get("metrics", {})) if payload else {}

    def save(iteration: int) -> None:
        if dist_info.is_main:
            save_checkpoint(
                model, optimizer, iteration, ckpt_path,
                config=cfg.to_dict(),
                model_config=model.config.to_dict(),
                sampler=loader.state_dict(),
                rng=rng_state(device),
                spikes=spikes.state_dict(),
                skipped_steps=skipped,
                metrics=last_metrics,
                tokenizer=cfg.tokenizer,
                lmtools_version=__version__,
                torch_version=str(torch.__version__),
                format_version=FORMAT_VERSION,
            )
            keep_snapshot(ckpt_path, iteration, cfg.keep_last)
        barrier(dist_info)

    window_loss = torch.zeros((), device=device)
    window_steps = 0
    window_start = time.perf_counter()
    run_start = window_start
    loader.reset_wait()
    iteration = start_iter
    try:
        with StopSignal() as stop:
            while iteration < cfg.max_iters:
                lr = run_get_lr_cosine_schedule(
                    iteration + 1, cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_iters,
                    cfg.cosine_cycle_iters or cfg.max_iters,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                train_module.train()
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum_steps):
                    x, y = loader.next()
                    # DDP averages gradients across ranks only on the last micro-batch.
                    sync = micro == cfg.grad_accum_steps - 1 or not dist_info.enabled
                    ctx = contextlib.nullcontext() if sync else train_module.no_sync()
                    with ctx, amp:
                        loss = cross_entropy(train_module(x), y) / cfg.grad_accum_steps
                    scaler.scale(loss).backward()
                    step_loss += loss.detach()
                scaler.unscale_(optimizer)
                grad_norm = run_gradient_clipping(model.parameters(), cfg.gradient_clip_val)
                loss_value = float(all_reduce_mean(step_loss, dist_info))
                norm_value = float(grad_norm)
                reason = None
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)) and dtype != torch.float16:
                    reason = f"non-finite loss ({loss_value}) or gradient norm ({norm_value})"
                    if not cfg.skip_nonfinite:
                        optimizer.zero_grad(set_to_none=True)
                        raise TrainingDiverged(
                            f"{reason} at iter {iteration + 1}; stopped, the last good checkpoint {ckpt_path} is kept. "
                            f"Lower --learning_rate, or pass --skip_nonfinite to skip such steps"
                        )
                elif (z := spikes.check(loss_value)) is not None:
                    log(f"Loss spike at iter {iteration + 1}: {loss_value:.4f} (z-score {z:.1f})")
                    if cfg.skip_spikes:
                        reason = "loss spike"
                if reason is not None:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    log(f"Skipped update at iter {iteration + 1}: {reason} ({skipped} skipped so far)")
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                iteration += 1
                result.losses.append(loss_value)
                if on_step is not None:
                    on_step(iteration, cfg.max_iters, loss_value, lr)
                window_loss += step_loss
                window_steps += 1

                at_log = iteration % cfg.log_interval == 0 or iteration == cfg.max_iters
                at_eval = val_loader is not None and (iteration % cfg.eval_interval == 0 or iteration == cfg.max_iters)
                if at_log or at_eval:
                    now = time.perf_counter()
                    elapsed = now - window_start
                    train_loss = float(all_reduce_mean(window_loss, dist_info)) / window_steps
                    tok_s = window_steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
                    wait_share = loader.data_wait_seconds / elapsed if elapsed > 0 else 0.0
                    val_loss = evaluate(model, val_loader, cfg.eval_iters, amp, dist_info) if at_eval else None
                    record = {
                        "iter": iteration, "loss": train_loss, "lr": lr, "grad_norm": norm_value,
                        "tokens_per_s": tok_s, "data_wait": wait_share, "elapsed_s": now - run_start,
                        "skipped_steps": skipped,
                    }
                    extra = {"tok/s": f"{tok_s:,.0f}", "data wait": f"{100 * wait_share:.1f}%"}
                    if device.type == "cuda":
                        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if peak:
                        record["mfu"] = tok_s * flops_per_token / dist_info.world_size / peak
                        extra["MFU"] = f"{100 * record['mfu']:.1f}%"
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                        if cfg.tokenizer and (bpt := _bytes_per_token(cfg)):
                            record["val_bpb"] = val_loss / math.log(2) / bpt
                        result.last_val_loss = val_loss
                    log(format_log_line(iteration, train_loss, lr, val_loss, **extra))
                    metrics.write(record)
                    last_metrics = record
                    result.last_loss = train_loss
                    window_loss.zero_()
                    window_steps = 0
                    loader.reset_wait()
                    window_start = time.perf_counter()

                stopping = any_rank(stop.requested, dist_info, device)
                if iteration % cfg.checkpoint_interval == 0 or iteration == cfg.max_iters or stopping:
                    save(iteration)
                    log(f"Saved checkpoint at iter {iteration} to {ckpt_path}")
                if stopping:
                    result.stopped_by_signal = True
                    break
    finally:
        metrics.close()
        loader.close()
        if val_loader is not None:
            val_loader.close()
    result.iteration = iteration
    result.skipped_steps = skipped
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader, eval_iters: int, amp, dist_info: DistInfo) -> float:
    """Mean loss over the same `eval_iters` validation batches every time (split across ranks)."""
    model.eval()
    total = torch.zeros((), device=next(model.parameters()).device)
    count = 0
    for i in range(dist_info.rank, eval_iters, dist_info.world_size):
        x, y = loader.batch_at(i)
        with amp:
            total += cross_entropy(model(x), y)
        count += 1
    model.train()
    if dist_info.enabled:
        import torch.distributed as dist

        packed = torch.stack([total, torch.tensor(float(count), device=total.device)])
        dist.all_reduce(packed)
        return float(packed[0] / packed[1])
    return float(total) / max(count, 1)


def check_token_range(loader: BatchLoader, vocab_size: int, flag: str) -> None:
    lo, hi = loader.token_range()
    if lo < 0:
        raise DataError(f"{flag} holds a negative token id ({lo}); token files must hold ids in [0, vocab_size)")
    if hi >= vocab_size:
        raise DataError(
            f"{flag} holds token id {hi} but --vocab_size is {vocab_size}; pass --vocab_size {hi + 1} or more"
        )


def check_checkpoint_folder(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the checkpoint folder {folder}: {exc.strerror}; choose another --checkpoint_path") from None
    import os

    if not os.access(folder, os.W_OK):
        raise ConfigError(f"checkpoint folder {folder} is not writable; choose another --checkpoint_path")


def _bytes_per_token(cfg: TrainConfig) -> float | None:
    meta = read_meta(parse_source_spec(cfg.train_data[0])[0]) if len(cfg.train_data) == 1 else None
    return float(meta["bytes_per_token"]) if meta and meta.get("bytes_per_token") else None


def header_lines(cfg, loader, val_loader, model, device, dtype, dist_info) -> list[str]:
    def describe(name: str, ld: BatchLoader) -> list[str]:
        d = ld.describe()
        lines = []
        for src in d["sources"]:
            lines.append(
                f"{name:<7}: {src['path']} | {src['tokens']:,} tokens | {src['dtype']} | "
                f"{'memory-mapped' if src.get('mmap') else 'in memory'}"
                + (f" | weight {src['weight']:.3g}" if src.get("weight") is not None and len(d['sources']) > 1 else "")
            )
        lines.append(f"{'':<7}  token ids {d['min_token']}..{d['max_token']}")
        return lines

    mc = model.config
    n_params = model.num_parameters()
    lines = ["lmtools train"]
    lines += describe("data", loader)
    if val_loader is not None:
        lines += describe("val", val_loader)
    lines.append(
        f"model  : {mc.num_layers} layers | d_model {mc.d_model} | {mc.num_heads} heads | d_ff {mc.d_ff} | "
        f"vocab {mc.vocab_size} | {n_params / 1e6:.2f}M parameters"
    )
    ranks = f" | {dist_info.world_size} ranks" if dist_info.enabled else ""
    lines.append(f"device : {device} | {str(dtype).removeprefix('torch.')}{' | compiled' if cfg.compile else ''}{ranks}")
    per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum_steps * dist_info.world_size
    lines.append(
        f"batch  : {cfg.batch_size} x context {cfg.context_length}"
        + (f" x {cfg.grad_accum_steps} accum" if cfg.grad_accum_steps > 1 else "")
        + f" = {per_step:,} tokens/step | max_iters {cfg.max_iters}"
    )
    return lines
