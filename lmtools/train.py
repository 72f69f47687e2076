"""The training core: set-up, the loop, evaluation and checkpoints.

`train_model` reads top to bottom: resolve the device and data, build the model and optimizer,
restore a checkpoint when resuming, then loop. The loop takes its batches from one
`BatchLoader`, and calls out for logging, evaluation and checkpointing.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmtools import __version__
from lmtools.checkpoint import (
    FORMAT_VERSION,
    keep_snapshot,
    load_state,
    read_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    snapshot_base,
)
from lmtools.config import TrainConfig
from lmtools.data import BatchLoader, parse_source_spec
from lmtools.device import peak_flops, resolve_device
from lmtools.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    any_rank,
    barrier,
    init_distributed,
    shutdown,
)
from lmtools.errors import CheckpointError, ConfigError, DataChanged, DataError, LMToolsError
from lmtools.fingerprint import DataIdentity, verify_resume_data
from lmtools.layout import METRICS_FILE
from lmtools.metrics import ExternalLoggers, MetricsWriter, SpikeDetector, format_log_line
from lmtools.model import MODEL_FIELDS, ModelConfig, TransformerLM
from lmtools.optim import cross_entropy, make_optimizer, run_gradient_clipping
from lmtools.preflight import MemoryEstimate, check_stored_config, check_training_run
from lmtools.prepare import read_meta
from lmtools.recipe import apply_recipe, describe_options, document_eot
from lmtools.rundata import absolute_spec, data_tokenizer_identity, normalise_specs, resolve_data
from lmtools.runguard import RunGuard, check_new_run_target, check_rollback, start_fresh_metrics
from lmtools.signals import StopSignal, stop_requested
from lmtools.tokenizer import read_tokenizer_json

if TYPE_CHECKING:
    from lmtools.init_from import InitSource


class TrainingDiverged(LMToolsError):
    """The loss or gradient norm stopped being finite."""


@dataclass
class TrainResult:
    iteration: int
    checkpoint_path: str
    last_loss: float | None = None
    last_val_loss: float | None = None
    stopped_by_signal: bool = False
    stopped_by_time: bool = False
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)


# A bound on steps left unread on the device when logs and checkpoints are far apart.
MAX_PENDING_STEPS = 256


# ---- set-up helpers -----------------------------------------------------------------------


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


# ---- the core -----------------------------------------------------------------------------


def train_model(
    cfg: TrainConfig,
    *,
    resume_from: str | None = None,
    explicit: frozenset[str] = frozenset(),
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int, float | None, float], None] | None = None,
    rollback: bool = False,
    allow_data_change: bool = False,
    log_times: bool = False,
) -> TrainResult:
    """Train (or resume) a TransformerLM as `cfg` describes; returns where it stopped.

    `explicit` names the flags the user typed, so that a resumed run can tell an override
    (max_iters, log_interval, ...) from a contradiction (a different model shape or data).
    `on_step(iteration, max_iters, loss, lr)` is called after every step (for a progress bar);
    `loss` is the newest one read from the device, which happens at log points and checkpoints.
    `rollback` allows resuming from a snapshot older than the run's newest checkpoint;
    `allow_data_change` allows resuming on data whose fingerprint differs from the checkpoint's.
    `log_times`: each log line also gives the elapsed time and an estimate of the time left
    (for logs that go to a file, where no progress bar shows them).
    """
    guard = RunGuard()
    try:
        payload, init, notes = None, None, []
        user_config = cfg.to_dict()  # what the user passed, before the data resolves the rest
        if resume_from is not None:
            from lmtools.inspect import check_checkpoint_file

            # Locked before reading: a second run or resume on this path fails at once.
            target = cfg.checkpoint_path if "checkpoint_path" in explicit else snapshot_base(resume_from)
            _lock(guard, Path(target))
            check_checkpoint_file(Path(resume_from), "resume")
            payload = read_checkpoint(resume_from)
            check_stored_config(payload.get("config") if isinstance(payload.get("config"), dict) else {}, resume_from)
            user_config = resumed_user_config(payload, cfg, explicit)
            cfg, note = merge_resume_config(payload, cfg, explicit, resume_from)
            notes += [note] if note else []
            _lock(guard, Path(cfg.checkpoint_path))
            check_resume_point(payload, cfg, Path(resume_from), rollback, log)
        else:
            check_checkpoint_folder(Path(cfg.checkpoint_path))
            _lock(guard, Path(cfg.checkpoint_path))
            check_new_run_target(Path(cfg.checkpoint_path), cfg.overwrite)
            cfg, init = resolve_new_run(apply_recipe(cfg, explicit), explicit)
        cfg.validate()
        if payload is None and cfg.warmup_warning():
            notes.append(cfg.warmup_warning())
        device = resolve_device(cfg.device)
        dist_info, device = init_distributed(device)
        try:
            if cfg.fsdp and not dist_info.enabled:
                raise ConfigError(
                    "--fsdp shards the model across ranks: launch with torchrun --nproc_per_node N (N > 1), "
                    "or drop --fsdp"
                )
            memory = check_training_run(cfg, device, dist_info.world_size)
            if not dist_info.is_main:
                log, on_step = (lambda _line: None), None
            trainer = Trainer(
                cfg,
                payload,
                device,
                dist_info,
                log,
                on_step,
                init=init,
                notes=notes,
                log_times=log_times,
                memory=memory,
                allow_data_change=allow_data_change,
                started_from=Path(resume_from) if resume_from else None,
                user_config=user_config,
            )
            return trainer.run()
        finally:
            shutdown(dist_info)
    finally:
        guard.release()


def _lock(guard: RunGuard, path: Path) -> None:
    """Only the process that writes checkpoints (rank 0 under torchrun) holds the locks."""
    if os.environ.get("RANK", "0") == "0":
        guard.lock(path)


def check_resume_point(payload: dict, cfg: TrainConfig, resume_from: Path, rollback: bool, log) -> None:
    """A resume must have steps left, and may go back past newer checkpoints only when asked."""
    iteration = int(payload.get("iteration", 0))
    if iteration >= cfg.max_iters:
        raise ConfigError(
            f"{resume_from} is at iter {iteration}, at or past --max_iters {cfg.max_iters}: nothing left to train; "
            f"pass --max_iters above {iteration} to continue"
        )
    check_rollback(resume_from, Path(cfg.checkpoint_path), iteration, rollback, log)


def resolve_new_run(cfg: TrainConfig, explicit: frozenset[str]) -> tuple[TrainConfig, InitSource | None]:
    """A fresh run's data, vocabulary and, with --init_from, the model it starts from."""
    if not cfg.init_from:
        if cfg.init_optimizer:
            raise ConfigError("--init_optimizer takes the optimizer state of --init_from CHECKPOINT; add that flag")
        return resolve_data(cfg, explicit_vocab="vocab_size" in explicit), None
    from lmtools.init_from import apply_model_shape, check_init_flags, check_vocabulary, read_init_source

    if cfg.fsdp:
        raise ConfigError("--init_from does not work with --fsdp yet; start the run without --fsdp")
    init = read_init_source(cfg.init_from)
    # Every architecture option spelled out, so the source's model overrides a recipe's.
    init.model_config = asdict(ModelConfig.from_dict(init.model_config))
    cfg.init_from = init.path
    check_init_flags(cfg, init)
    apply_model_shape(cfg, init, explicit)
    cfg = resolve_data(cfg, explicit_vocab=False)
    check_vocabulary(cfg, init, data_tokenizer_identity(cfg))
    return cfg, init


def resumed_user_config(payload: dict, cfg: TrainConfig, explicit: frozenset[str]) -> dict:
    """The config the user passed for a resumed run: the first invocation's (older checkpoints
    hold only the resolved one) with the values typed this time."""
    stored = payload.get("user_config") or payload.get("config") or {}
    return {**stored, **{name: getattr(cfg, name) for name in explicit if hasattr(cfg, name)}}


# Flags a resumed run cannot honour: its data, batches and starting point are the checkpoint's.
RESUME_FIXED = (
    "train_data",
    "val_data",
    "data_dtype",
    "seed",
    "batch_size",
    "grad_accum_steps",
    "init_from",
    "init_optimizer",
)


def merge_resume_config(
    payload: dict, cfg: TrainConfig, explicit: frozenset[str], source: str = "CHECKPOINT"
) -> tuple[TrainConfig, str | None]:
    """The stored run config with the typed overrides applied, and the line that says how the
    schedule changed (when --max_iters moves its end), or None."""
    stored = payload.get("config")
    if not isinstance(stored, dict):
        raise ConfigError("the checkpoint holds no run config; it was not written by lmtools train")
    resumed = TrainConfig.from_dict(stored)
    note = None
    for name in sorted(explicit):
        ours, theirs = getattr(cfg, name, None), getattr(resumed, name, None)
        if name in MODEL_FIELDS and ours != theirs:
            raise ConfigError(
                f"--{name} {ours} contradicts the checkpoint, which was trained with {name}={theirs}; "
                f"drop the flag to resume"
            )
        if name in RESUME_FIXED:
            check_resume_keeps(name, ours, theirs, source)
        elif name == "max_iters":
            note = resumed.extend_schedule(ours, int(payload.get("iteration", 0)))
        elif name not in MODEL_FIELDS and name != "resume":
            setattr(resumed, name, ours)
    return resumed, note


def check_resume_keeps(name: str, ours, theirs, source: str) -> None:
    """A resumed run keeps what fixes its batches; asking for another is an error naming the way."""
    if name == "train_data":
        ours, theirs = normalise_specs(list(ours)), list(theirs or [])
    elif name == "val_data" and ours is not None:
        ours = absolute_spec(ours)
    if ours == theirs or (name == "init_optimizer" and not ours):
        return
    if name in ("init_from", "init_optimizer"):
        raise ConfigError(f"--{name} starts a new run and --resume continues one; drop one of them")
    shown = " ".join(ours) if isinstance(ours, list) else ours
    raise ConfigError(
        f"--{name} {shown}: a resumed run keeps its checkpoint's {name} ({theirs}); to train these weights "
        f"with it, start a new run: lmtools train --init_from {source} --{name} ... --checkpoint_path NEW.pt"
    )


class Trainer:
    """One run: set-up in `__init__`, the loop in `run`, one method per thing the loop does."""

    def __init__(
        self,
        cfg: TrainConfig,
        payload: dict | None,
        device: torch.device,
        dist_info: DistInfo,
        log: Callable[[str], None],
        on_step,
        *,
        init: InitSource | None = None,
        notes: list[str] = (),
        log_times: bool = False,
        memory: MemoryEstimate | None = None,
        allow_data_change: bool = False,
        started_from: Path | None = None,
        user_config: dict | None = None,
    ):
        self.cfg, self.device, self.dist, self.log, self.on_step = cfg, device, dist_info, log, on_step
        self.user_config = cfg.to_dict() if user_config is None else user_config
        self.log_times = log_times
        seed_everything(cfg.seed + dist_info.rank)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls

        self.ckpt_path = Path(cfg.checkpoint_path)
        self.started_from = started_from  # never pruned as a snapshot
        self.saved_at = int(payload["iteration"]) if payload is not None else None

        # Data: absolute paths, so that `resume` works from any folder.
        cfg.train_data = [absolute_spec(s) for s in cfg.train_data]
        self.loader = BatchLoader(
            cfg.train_data,
            cfg.batch_size,
            cfg.context_length,
            device,
            seed=cfg.seed,
            rank=dist_info.rank,
            grad_accum_steps=cfg.grad_accum_steps,
            dtype=cfg.data_dtype,
            doc_eot=document_eot(cfg),
        )
        # (name, loader) per validation set; a lone --val_data has no name.
        self.val_sets: list[tuple[str | None, BatchLoader]] = []
        if cfg.val_data:
            cfg.val_data = absolute_spec(cfg.val_data)
            self.val_sets.append((None, self.make_val_loader(cfg.val_data)))
        else:
            cfg.val_sets = {name: absolute_spec(path) for name, path in cfg.val_sets.items()}
            self.val_sets += [(name, self.make_val_loader(path)) for name, path in cfg.val_sets.items()]
        self.identity = DataIdentity(
            self.loader.paths + [p for _name, ld in self.val_sets for p in ld.paths], cfg.tokenizer
        )
        sampler_state = dict(payload.get("sampler") or {}) if payload is not None else {}
        if payload is not None and verify_resume_data(self.identity, payload, allow_data_change, log):
            sampler_state.pop("num_tokens", None)  # the new data's size is wanted
        check_token_range(self.loader, cfg.vocab_size, "--train_data")
        for name, val_loader in self.val_sets:
            check_token_range(val_loader, cfg.vocab_size, "--val_data" if name is None else f"val set {name}")

        # Model, optimizer, and the state a checkpoint restores.
        if cfg.fsdp:
            self.model = build_sharded_model(cfg, device, dist_info)
        else:
            self.model = build_model(cfg, device)
        self.optimizer = make_optimizer(
            self.model, cfg.learning_rate, cfg.weight_decay, device, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr
        )
        if init is not None:
            init.load_into(self.model, self.optimizer if cfg.init_optimizer else None)
        self.spikes = SpikeDetector(cfg.spike_zscore)
        # Steps whose loss and gradient norm are still on the device: (iteration, loss, norm).
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        # A fused optimizer skips a non-finite update on the device, with no wait; the host
        # must decide before the update only to skip spikes, or without a fused optimizer.
        self.skips_on_device = bool(self.optimizer.defaults.get("fused"))
        self.verdict_each_step = cfg.skip_spikes or (cfg.skip_nonfinite and not self.skips_on_device)
        self.losses: list[float] = []
        self.window_losses: list[float] = []  # since the last report
        self.last_loss: float | None = None
        self.last_grad_norm = 0.0
        self.iteration = 0
        self.skipped = 0
        self.last_metrics: dict = {}
        # Stored in every checkpoint, so that it needs no dataset folder to be sampled or exported.
        self.tokenizer_json = (
            read_tokenizer_json(cfg.tokenizer)
            or (payload or {}).get("tokenizer_json")
            or (init.tokenizer_text if init is not None else None)
        )
        if payload is not None:
            self.iteration = load_state(payload, self.model, self.optimizer)
            try:
                self.loader.load_state_dict(sampler_state)
                self.spikes.load_state_dict(payload.get("spikes", {}))
                self.skipped = int(payload.get("skipped_steps", 0))
                self.last_metrics = dict(payload.get("metrics") or {})
                if "rng" in payload:
                    set_rng_state(payload["rng"], device)
            except LMToolsError:
                raise
            except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError, AttributeError) as exc:
                raise CheckpointError(
                    f"the checkpoint's run state (sampler, RNG or spike window) is damaged ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); resume from another checkpoint"
                ) from None

        # Precision, DDP and compilation wrap the module that trains; checkpoints save `self.model`.
        # An FSDP model needs no wrapper: fully_shard made it reduce its own gradients.
        self.dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.amp = (
            torch.autocast(device.type, dtype=self.dtype) if self.dtype != torch.float32 else contextlib.nullcontext()
        )
        self.module: torch.nn.Module = NextTokenLoss(self.model)
        if dist_info.enabled and not cfg.fsdp:
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile:
            self.module = torch.compile(self.module)

        if dist_info.is_main:
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            if payload is None and cfg.metrics:
                start_fresh_metrics(self.ckpt_path, log)
        self.metrics = MetricsWriter(
            self.ckpt_path.with_name(METRICS_FILE) if cfg.metrics and dist_info.is_main else None
        )
        if payload is not None and (damaged := self.metrics.truncate_after(self.iteration)):
            log(f"warning: skipped {damaged} damaged line(s) in {self.metrics.path}")
        self.external = ExternalLoggers(
            cfg.tensorboard if dist_info.is_main else None, cfg.wandb if dist_info.is_main else None, cfg.to_dict()
        )
        self.tokens_per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum_steps * dist_info.world_size
        self.flops_per_token = self.model.config.flops_per_token()
        self.peak_flops = peak_flops(device)
        self.bytes_per_token = _bytes_per_token(cfg)

        for line in header_lines(cfg, self.loader, self.val_sets, self.model, device, self.dtype, dist_info):
            log(line)
        if memory is not None:
            log(f"memory : {memory.describe()}")
        if payload is not None:
            log(f"Resumed from {self.ckpt_path} at iter {self.iteration}")
        if init is not None:
            optimizer = "its optimizer state" if cfg.init_optimizer else "a fresh optimizer"
            log(f"Initialised from {init.kind} {init.path}: its weights, a new schedule from iter 0, {optimizer}")
        for line in notes:
            log(line)

    def make_val_loader(self, path: str) -> BatchLoader:
        # A fixed seed and batch_at(i): every evaluation sees the same windows.
        return BatchLoader(
            [path],
            self.cfg.batch_size,
            self.cfg.context_length,
            self.device,
            seed=self.cfg.seed + 1,
            prefetch=0,
            dtype=self.cfg.data_dtype,
        )

    def run(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(iteration=self.iteration, checkpoint_path=str(self.ckpt_path))
        self.run_start = time.perf_counter()
        try:
            with StopSignal() as stop:
                if self.iteration == 0:
                    self.report_start(result)
                self._start_window()
                self.start_iteration, self.train_start = self.iteration, self.window_start
                while self.iteration < cfg.max_iters:
                    lr = cfg.lr_at(self.iteration + 1)
                    if not self.step(lr):  # a stop request between micro-batches: the step is dropped
                        self.settle()
                        self.save()
                        result.stopped_by_signal = True
                        break
                    self.iteration += 1
                    last = self.iteration == cfg.max_iters
                    at_eval = bool(self.val_sets) and (self.iteration % cfg.eval_interval == 0 or last)
                    at_log = self.iteration % cfg.log_interval == 0 or at_eval or last
                    out_of_time = (
                        cfg.max_minutes is not None and time.perf_counter() - self.run_start > 60 * cfg.max_minutes
                    )
                    stopping = any_rank(stop.requested or out_of_time, self.dist)
                    at_save = self.iteration % cfg.checkpoint_interval == 0 or last or stopping
                    if at_log or at_save or len(self.pending) >= MAX_PENDING_STEPS:
                        self.settle()
                    if self.on_step is not None:
                        self.on_step(self.iteration, cfg.max_iters, self.last_loss, lr)
                    if at_log:
                        self.report(lr, at_eval, result)
                    if at_eval and not stopping:  # a signal during the evaluation stops here
                        stopping = any_rank(stop.requested, self.dist)
                        at_save = at_save or stopping
                    if at_save:
                        self.save()
                    if stopping:
                        result.stopped_by_signal = stop.requested
                        result.stopped_by_time = not stop.requested
                        break
        except DataChanged as exc:
            raise DataChanged(f"{exc}; {self.last_checkpoint_note()}") from None
        finally:
            self.close()
        result.iteration = self.iteration
        result.skipped_steps = self.skipped
        result.losses = self.losses
        return result

    def last_checkpoint_note(self) -> str:
        if self.saved_at is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint, {self.ckpt_path} at iter {self.saved_at}, was written before it"

    def step(self, lr: float) -> bool:
        """One optimizer step over grad_accum_steps micro-batches; False when a stop signal
        came between micro-batches (one process only: ranks must agree on every step), in which
        case the step is dropped and the loader put back at its start.

        Nothing here waits for the device: the loss and gradient norm stay there until `settle`
        reads them, unless --skip_spikes needs the host's verdict before the update.
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups keep their own peak
        self.module.train()
        step_loss = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum_steps):
            if micro and not self.dist.enabled and stop_requested():
                self.optimizer.zero_grad(set_to_none=True)
                self.loader.load_state_dict(dict(self.loader.state_dict(), micro=0))
                return False
            x, y = self.loader.next()
            # DDP averages gradients across ranks only on the last micro-batch.
            sync = micro == cfg.grad_accum_steps - 1 or not self.dist.enabled
            if cfg.fsdp:
                self.model.set_requires_gradient_sync(sync)
            no_sync = contextlib.nullcontext() if sync or cfg.fsdp else self.module.no_sync()
            with no_sync, self.amp:
                # Scaled so that the accumulated gradient is that of one batch accum times larger.
                loss = self.module(x, y) / cfg.grad_accum_steps
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = run_gradient_clipping(self.model.parameters(), cfg.gradient_clip_val)
        self.pending.append((self.iteration + 1, step_loss, grad_norm))

        skipped_by_host = self.verdict_each_step and self.settle()
        if not skipped_by_host:
            self.update(step_loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def update(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The optimizer step, skipped on the device when the step was not finite."""
        if self.dtype == torch.float16:
            self.scaler.step(self.optimizer)  # the scaler skips overflowing steps itself
            self.scaler.update()
        elif self.skips_on_device:
            # Applied only if the loss and gradient norm are finite on every rank: decided on
            # the device, so the host need not wait; `settle` reads the outcome later.
            nonfinite = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()
            self.optimizer.found_inf = all_reduce_max(nonfinite, self.dist)
            self.optimizer.step()
            del self.optimizer.found_inf
        else:
            self.optimizer.step()

    def settle(self) -> bool:
        """Read the losses and gradient norms of the steps not yet read, with one wait for the
        device, and check them in order; returns whether the newest step's update is skipped.

        Between reads the host runs ahead of the GPU, which is what keeps a fast GPU busy.
        A non-finite step found here stops the run before any checkpoint after it is written.
        """
        if not self.pending:
            return False
        iters, losses, norms = zip(*self.pending)
        self.pending.clear()
        losses = all_reduce_mean(torch.stack(losses), self.dist)
        values = torch.stack([losses, torch.stack([n.to(losses) for n in norms])]).tolist()
        skipped = False
        for it, loss, norm in zip(iters, *values):
            reason = self.check_numerics(it, loss, norm)
            skipped = reason is not None
            if skipped:
                self.skipped += 1
                self.log(f"Skipped update at iter {it}: {reason} ({self.skipped} skipped so far)")
            self.losses.append(loss)
            self.window_losses.append(loss)
            self.last_loss, self.last_grad_norm = loss, norm
        return skipped

    def check_numerics(self, it: int, loss: float, grad_norm: float) -> str | None:
        """Why update `it` must be skipped, or None; raises when a non-finite loss stops the run."""
        # float16's gradient scaler skips overflowing steps by itself.
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) and self.dtype != torch.float16:
            reason = "non-finite " + " and ".join(
                f"{name} ({value})"
                for name, value in (("loss", loss), ("gradient norm", grad_norm))
                if not math.isfinite(value)
            )
            if self.cfg.skip_nonfinite:
                return reason
            raise TrainingDiverged(
                f"{reason} at iter {it}; stopped, the last good checkpoint {self.ckpt_path} is kept. "
                f"Lower --learning_rate, or pass --skip_nonfinite to skip such steps"
            )
        z = self.spikes.check(loss)
        if z is not None:
            self.log(f"Loss spike at iter {it}: {loss:.4f} (z-score {z:.1f})")
            if self.cfg.skip_spikes:
                return "loss spike"
        return None

    def _start_window(self) -> None:
        self.window_losses = []
        self.loader.reset_wait()
        self.window_start = time.perf_counter()

    def report(self, lr: float, at_eval: bool, result: TrainResult) -> None:
        """The log line and metrics record for the steps since the last report (all settled)."""
        now = time.perf_counter()
        elapsed = now - self.window_start
        steps = len(self.window_losses)
        train_loss = sum(self.window_losses) / max(steps, 1)
        grad_norm = self.last_grad_norm
        tok_s = steps * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        wait_share = self.loader.data_wait_seconds / elapsed if elapsed > 0 else 0.0
        record = {
            "iter": self.iteration,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tok_s,
            "data_wait": wait_share,
            "elapsed_s": now - self.run_start,
            "skipped_steps": self.skipped,
        }
        extra = {"tok/s": f"{tok_s:,.0f}", "data wait": f"{100 * wait_share:.1f}%"}
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.peak_flops:
            record["mfu"] = tok_s * self.flops_per_token / self.dist.world_size / self.peak_flops
            extra["MFU"] = f"{100 * record['mfu']:.1f}%"
        if self.log_times:
            extra.update(self.times(now))
        self.log_and_record(record, extra, at_eval, result)
        result.last_loss = train_loss
        self._start_window()

    def report_start(self, result: TrainResult) -> None:
        """Iter 0: the loss of the first step's batches under the initial weights (about
        ln(vocab_size) for a new model: the first sanity check) and the validation loss before
        training. Forward passes only, on batches recomputed by position: the run's batches,
        RNG and losses are the same as without it."""
        with torch.no_grad():
            self.model.eval()
            total = torch.zeros((), device=self.device)
            for micro in range(self.cfg.grad_accum_steps):
                if not self.dist.enabled and stop_requested():  # the loop stops before its first step
                    self.model.train()
                    return
                x, y = self.loader.batch_at(0, micro)
                with self.amp:
                    total += cross_entropy(self.model(x), y)
            self.model.train()
        loss = float(all_reduce_mean(total / self.cfg.grad_accum_steps, self.dist))
        record = {"iter": 0, "loss": loss, "lr": self.cfg.lr_at(0)}
        self.log_and_record(record, {}, bool(self.val_sets), result)

    def log_and_record(self, record: dict, extra: dict, at_eval: bool, result: TrainResult) -> None:
        """Evaluate (when asked), then one log line and one metrics record."""
        val_loss = None
        if at_eval:
            val_loss, per_set = self.evaluate_sets()
            record["val_loss"] = val_loss
            record.update({f"val/{name}": value for name, value in per_set.items()})
            if self.bytes_per_token and val_loss is not None:
                record["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
            extra = {**{f"val/{name}": f"{value:.4f}" for name, value in per_set.items()}, **extra}
            result.last_val_loss = val_loss
        self.log(format_log_line(record["iter"], record["loss"], record["lr"], val_loss, **extra))
        self.metrics.write(record)
        self.external.write(record)
        self.last_metrics = record

    def evaluate_sets(self) -> tuple[float | None, dict[str, float]]:
        """The validation loss (the token-weighted mean over named sets) and each named set's loss."""
        losses = {
            name: evaluate(self.model, loader, self.cfg.eval_iters, self.amp, self.dist, lockstep=self.cfg.fsdp)
            for name, loader in self.val_sets
        }
        if None in losses:
            return losses[None], {}
        if any(loss is None for loss in losses.values()):  # a stop signal ended the evaluation
            return None, {}
        sizes = {name: loader.num_tokens for name, loader in self.val_sets}
        mean = sum(losses[name] * sizes[name] for name in losses) / sum(sizes.values())
        return mean, losses

    def times(self, now: float) -> dict[str, str]:
        """Elapsed time and an estimate of the time left, for logs without a progress bar."""
        done = self.iteration - self.start_iteration
        left = (now - self.train_start) / done * (self.cfg.max_iters - self.iteration) if done > 0 else None
        return {"elapsed": _clock(now - self.run_start), "left": "-" if left is None else _clock(left)}

    def save(self) -> None:
        # The data is checked before every checkpoint: one written after a silent change would
        # resume on data it was not trained on.
        changed = self.identity.changed_during_run()
        if any_rank(changed is not None, self.dist):
            raise DataChanged(f"{changed or 'a data file changed on another rank'} during the run; stopped")
        extra = dict(
            config=self.cfg.to_dict(),  # resolved from the data: what the run trains with
            user_config=self.user_config,  # as passed: what `inspect --config` reproduces
            model_config=self.model.config.to_dict(),
            sampler=self.loader.state_dict(),
            rng=rng_state(self.device),
            spikes=self.spikes.state_dict(),
            skipped_steps=self.skipped,
            metrics=self.last_metrics,
            tokenizer=self.cfg.tokenizer,
            tokenizer_json=self.tokenizer_json,
            world_size=self.dist.world_size,
            lmtools_version=__version__,
            torch_version=str(torch.__version__),
            format_version=FORMAT_VERSION,
            data_fingerprint=self.identity.state_dict(),
        )
        if self.cfg.fsdp:
            # Every rank writes its shards; rank 0 the file beside them.
            save_sharded_checkpoint(
                self.model, self.optimizer, self.iteration, self.ckpt_path, is_main=self.dist.is_main, **extra
            )
            self.log(f"Saved checkpoint at iter {self.iteration} to {self.ckpt_path} (+ .dcp shards)")
            self.saved_at = self.iteration
            return
        if self.dist.is_main:
            save_checkpoint(self.model, self.optimizer, self.iteration, self.ckpt_path, **extra)
            keep_snapshot(self.ckpt_path, self.iteration, self.cfg.keep_last, protect=self.started_from)
            self.log(f"Saved checkpoint at iter {self.iteration} to {self.ckpt_path}")
        barrier(self.dist)
        self.saved_at = self.iteration

    def close(self) -> None:
        self.metrics.close()
        self.external.close()
        self.loader.close()
        for _name, val_loader in self.val_sets:
            val_loader.close()


class NextTokenLoss(torch.nn.Module):
    """The model and its loss as one module, so that `--compile` and DDP see the whole step:
    compiled together, the float32 upcast of the logits fuses into the log-softmax."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.model(token_ids), targets)


def build_model(cfg: TrainConfig, device: torch.device) -> TransformerLM:
    """The model built on the meta device, given storage straight on `device`, then initialised
    from the run's seed (no full copy on the host first)."""
    return materialise(meta_model(cfg), device, cfg.seed)


def meta_model(cfg: TrainConfig) -> TransformerLM:
    """The model's structure, without storage."""
    with torch.device("meta"):
        return TransformerLM.from_config(cfg.model_config())


def materialise(model: TransformerLM, device: torch.device, seed: int, store=None) -> TransformerLM:
    """Give a meta model storage on `device` and draw its weights from `seed` alone
    (`store`: see TransformerLM.reset_parameters)."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_parameters(store)
    return model


def build_sharded_model(cfg: TrainConfig, device: torch.device, dist_info: DistInfo) -> TransformerLM:
    """The model sharded with FSDP2 block by block, without any rank ever holding all of it.

    As `build_model`, but sharded before it gets storage. Each rank then draws every weight at
    its full shape, one at a time, from the run's seed, and keeps its own slice: the shards
    together equal the weights `build_model` gives one process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = meta_model(cfg)
    mesh = init_device_mesh(device.type, (dist_info.world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def keep_own_slice(param: torch.Tensor, value: torch.Tensor) -> None:
        # src_data_rank=None: every rank holds the same value, so slicing needs no communication.
        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())

    return materialise(model, device, cfg.seed, keep_own_slice)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: BatchLoader, eval_iters: int, amp, dist_info: DistInfo, *, lockstep: bool = False
) -> float | None:
    """Mean loss over the same `eval_iters` validation batches every time (split across ranks).

    `lockstep`: a sharded model's forward is a collective, so every rank runs as many forwards
    as the busiest one (the surplus ones count for nothing). Otherwise a stop signal ends the
    evaluation between batches, and it returns None (no partial value is reported).
    """
    model.eval()
    total = torch.zeros((), device=next(model.parameters()).device)
    count = 0
    interrupted = False
    for j in range(-(-eval_iters // dist_info.world_size)):
        i = dist_info.rank + j * dist_info.world_size
        if i >= eval_iters and not lockstep:
            break
        if not lockstep and stop_requested():
            interrupted = True
            break
        x, y = loader.batch_at(i % eval_iters)
        with amp:
            loss = cross_entropy(model(x), y)
        if i < eval_iters:
            total += loss
            count += 1
    model.train()
    if dist_info.enabled:
        import torch.distributed as dist

        packed = torch.stack([total, torch.tensor(float(count), device=total.device)])
        dist.all_reduce(packed)
        return None if interrupted else float(packed[0] / packed[1])
    return None if interrupted else float(total) / max(count, 1)


def _clock(seconds: float) -> str:
    """h:mm:ss"""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_token_range(loader: BatchLoader, vocab_size: int, flag: str) -> None:
    lo, hi = loader.token_range()
    if lo < 0:
        raise DataError(f"{flag} holds a negative token id ({lo}); token files must hold ids in [0, vocab_size)")
    if hi >= vocab_size:
        raise DataError(
            f"{flag} holds token id {hi} but --vocab_size is {vocab_size}; pass --vocab_size {hi + 1} or more"
        )


def check_checkpoint_folder(path: Path) -> None:
    """Fail early, without creating anything, when the checkpoint folder cannot be made or written."""
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"cannot create the checkpoint folder {folder}: {existing} is a file; choose another --checkpoint_path"
        )
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"checkpoint folder {folder} is not writable; choose another --checkpoint_path")


def _bytes_per_token(cfg: TrainConfig) -> float | None:
    meta = read_meta(parse_source_spec(cfg.train_data[0])[0]) if len(cfg.train_data) == 1 else None
    return float(meta["bytes_per_token"]) if meta and meta.get("bytes_per_token") else None


def header_lines(cfg, loader, val_sets, model, device, dtype, dist_info) -> list[str]:
    def describe(name: str, ld: BatchLoader) -> list[str]:
        d = ld.describe()
        lines = []
        for src in d["sources"]:
            lines.append(
                f"{name:<7}: {src['path']} | {src['tokens']:,} tokens | {src['dtype']} | "
                f"{'memory-mapped' if src.get('mmap') else 'in memory'}"
                + (f" | weight {src['weight']:.3g}" if src.get("weight") is not None and len(d["sources"]) > 1 else "")
            )
        lines.append(f"{'':<7}  token ids {d['min_token']}..{d['max_token']}")
        return lines

    mc = model.config
    n_params = model.num_parameters()
    lines = ["lmtools train"]
    lines += describe("data", loader)
    for name, val_loader in val_sets:
        lines += describe("val" if name is None else f"val/{name}", val_loader)
    lines.append(
        f"model  : {mc.num_layers} layers | d_model {mc.d_model} | {mc.num_heads} heads | d_ff {mc.d_ff} | "
        f"vocab {mc.vocab_size} | {n_params / 1e6:.2f}M parameters"
    )
    if options := describe_options(cfg):
        lines.append(options)
    ranks = f" | {dist_info.world_size} ranks" if dist_info.enabled else ""
    lines.append(
        f"device : {device} | {str(dtype).removeprefix('torch.')}{' | compiled' if cfg.compile else ''}{ranks}"
    )
    per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum_steps * dist_info.world_size
    lines.append(
        f"batch  : {cfg.batch_size} x context {cfg.context_length}"
        + (f" x {cfg.grad_accum_steps} accum" if cfg.grad_accum_steps > 1 else "")
        + f" = {per_step:,} tokens/step | max_iters {cfg.max_iters}"
    )
    return lines
