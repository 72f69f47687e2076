"""The training core: one run's loop, its evaluation, logs and checkpoints.

`train_model` plans the run (`lmtools.training.plan`: a new run's config resolved from its data,
a resumed run's from its checkpoint), takes the device and the ranks, and hands over to a
`Trainer`. `Trainer.run` is the loop, one call per thing a step does:

    learning rate (`schedule`) -> forward and backward over the micro-batches -> clip ->
    guarded optimizer step (`numerics`) -> evaluate (`validation`) -> log -> checkpoint
    (`state` holds what it carries) -> stop check

`Trainer.__init__` builds what the loop uses, in that order of need: data, model and optimizer
(`build`), numerics guard and run state (restored when resuming), the training module, logs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtools import __version__
from lmtools.checkpoint import FORMAT_VERSION, keep_snapshot, load_state, save_checkpoint, save_sharded_checkpoint
from lmtools.config.recipes import describe_options
from lmtools.config.train_config import TrainConfig
from lmtools.data.fingerprint import DataIdentity, verify_resume_data
from lmtools.data.loader import BatchLoader
from lmtools.data.tokenizer import read_tokenizer_json
from lmtools.errors import ConfigError, DataChanged, DataError
from lmtools.layout import METRICS_FILE
from lmtools.runtime.device import peak_flops, resolve_device
from lmtools.runtime.distributed import DistInfo, all_reduce_mean, any_rank, barrier, init_distributed, shutdown
from lmtools.runtime.run_lock import RunGuard, start_fresh_metrics
from lmtools.runtime.signals import StopSignal, stop_requested
from lmtools.training.build import autocast, autocast_dtype, build_model, build_sharded_model, training_module
from lmtools.training.interrupt import StepDropped, StepInterrupt
from lmtools.training.metrics import ExternalLoggers, MetricsWriter, format_log_line
from lmtools.training.numerics import NumericsGuard
from lmtools.training.optim import cross_entropy, make_optimizer, run_gradient_clipping
from lmtools.training.plan import RunPlan, plan_run
from lmtools.training.preflight import MemoryEstimate, check_training_run
from lmtools.training.schedule import lr_at
from lmtools.training.state import RunState, seed_everything
from lmtools.training.timing import (
    StepClock,
    estimated_step_seconds,
    matmul_rate,
    per_step,
    span,
    too_long_warning,
)
from lmtools.training.validation import validation_loader, validation_loss


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
    run_guard = RunGuard()
    # Only the process that writes checkpoints (rank 0 under torchrun) holds the locks.
    lock = run_guard.lock if os.environ.get("RANK", "0") == "0" else (lambda _path: None)
    try:
        plan = plan_run(cfg, explicit=explicit, lock=lock, resume_from=resume_from, rollback=rollback, log=log)
        dist_info, device = init_distributed(resolve_device(plan.config.device))
        try:
            if plan.config.fsdp and not dist_info.enabled:
                raise ConfigError(
                    "--fsdp shards the model across ranks: launch with torchrun --nproc_per_node N (N > 1), "
                    "or drop --fsdp"
                )
            memory = check_training_run(plan.config, device, dist_info.world_size)
            if not dist_info.is_main:
                log, on_step = (lambda _line: None), None
            trainer = Trainer(
                plan,
                device,
                dist_info,
                log,
                on_step,
                log_times=log_times,
                memory=memory,
                allow_data_change=allow_data_change,
            )
            return trainer.run()
        finally:
            shutdown(dist_info)
    finally:
        run_guard.release()


@dataclass
class Due:
    """What follows the step just taken, by its iteration."""

    eval: bool  # evaluate the validation sets
    log: bool  # a log line and a metrics record
    save: bool  # a checkpoint


class Trainer:
    """One run: set-up in `__init__`, the loop in `run`, one method per thing the loop does.

    `self.model` is the model checkpoints save; `self.loss_module` computes the loss with it,
    wrapped for DDP and compilation when asked.
    """

    def __init__(
        self,
        plan: RunPlan,
        device: torch.device,
        dist_info: DistInfo,
        log: Callable[[str], None],
        on_step,
        *,
        log_times: bool = False,
        memory: MemoryEstimate | None = None,
        allow_data_change: bool = False,
    ):
        cfg, self.data = plan.config, plan.data
        self.cfg, self.device, self.dist, self.log, self.on_step = cfg, device, dist_info, log, on_step
        self.user_config, self.log_times, self.started_from = plan.user_config, log_times, plan.started_from
        self.ckpt_path = Path(cfg.checkpoint_path)
        self.saved_at = int(plan.payload["iteration"]) if plan.payload is not None else None
        seed_everything(cfg.seed + dist_info.rank)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls

        self.loader, self.val_sets, self.identity = self.open_data()
        data_changed = plan.payload is not None and verify_resume_data(
            self.identity, plan.payload, allow_data_change, log
        )
        self.check_token_ranges()
        self.model = build_sharded_model(cfg, device, dist_info) if cfg.fsdp else build_model(cfg, device)
        self.optimizer = make_optimizer(
            self.model, cfg.learning_rate, cfg.weight_decay, device, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr
        )
        if plan.init is not None:
            plan.init.load_into(self.model, self.optimizer if cfg.init_optimizer else None)
        self.dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.amp = autocast(device, self.dtype)
        self.guard = NumericsGuard(
            self.optimizer,
            self.scaler,
            self.dtype,
            dist_info,
            skip_nonfinite=cfg.skip_nonfinite,
            skip_spikes=cfg.skip_spikes,
            spike_zscore=cfg.spike_zscore,
            log=log,
            checkpoint_path=self.ckpt_path,
        )
        self.state = RunState(self.loader, self.guard, device)
        # Stored in every checkpoint, so that it needs no dataset folder to be sampled or exported.
        self.tokenizer_json = (
            read_tokenizer_json(self.data.tokenizer)
            or (plan.payload or {}).get("tokenizer_json")
            or (plan.init.tokenizer_text if plan.init is not None else None)
        )
        if plan.payload is not None:
            self.restore(plan.payload, data_changed)
        self.loss_module = training_module(self.model, cfg, device, dist_info)
        # A stop signal ends a step inside its passes (see training/interrupt.py for where not).
        self.interrupt = StepInterrupt(self.model, enabled=not dist_info.enabled and not cfg.compile)
        self.clock = StepClock()
        self.open_logs(resuming=plan.payload is not None)
        self.log_header(plan, memory)

    # ---- set-up -----------------------------------------------------------------------------

    def open_data(self) -> tuple[BatchLoader, list[tuple[str | None, BatchLoader]], DataIdentity]:
        """The training batches, a (name, loader) per validation set (a lone --val_data has no
        name), and the identity of every file they read."""
        cfg = self.cfg
        loader = BatchLoader(
            self.data.train,
            cfg.batch_size,
            cfg.context_length,
            self.device,
            seed=cfg.seed,
            rank=self.dist.rank,
            grad_accum_steps=cfg.grad_accum_steps,
            dtype=cfg.data_dtype,
            doc_eot=self.data.doc_eot,
            vocab_size=cfg.vocab_size,
            known_ranges=self.data.token_ranges,
        )
        val_sets = [
            (
                name,
                validation_loader(
                    cfg, path, self.device, vocab_size=cfg.vocab_size, known_ranges=self.data.token_ranges
                ),
            )
            for name, path in self.data.val.items()
        ]
        identity = DataIdentity(loader.paths + [p for _name, ld in val_sets for p in ld.paths], self.data.tokenizer)
        return loader, val_sets, identity

    def check_token_ranges(self) -> None:
        check_token_range(self.loader, self.cfg.vocab_size, "--train_data")
        for name, val_loader in self.val_sets:
            check_token_range(val_loader, self.cfg.vocab_size, "--val_data" if name is None else f"val set {name}")

    def open_logs(self, resuming: bool) -> None:
        """metrics.jsonl (cut back to the checkpoint's iteration when resuming), TensorBoard and
        W&B, and the constants the log lines' throughput figures need."""
        cfg, is_main = self.cfg, self.dist.is_main
        if is_main:
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            if not resuming and cfg.metrics:
                start_fresh_metrics(self.ckpt_path, self.log)
        self.metrics = MetricsWriter(self.ckpt_path.with_name(METRICS_FILE) if cfg.metrics and is_main else None)
        if resuming and (damaged := self.metrics.truncate_after(self.state.iteration)):
            self.log(f"warning: skipped {damaged} damaged line(s) in {self.metrics.path}")
        self.external = ExternalLoggers(
            cfg.tensorboard if is_main else None, cfg.wandb if is_main else None, cfg.to_dict()
        )
        self.tokens_per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum_steps * self.dist.world_size
        self.flops_per_token = self.model.config.flops_per_token()
        self.peak_flops = peak_flops(self.device)
        self.bytes_per_token = self.data.bytes_per_token

    def log_header(self, plan: RunPlan, memory: MemoryEstimate | None) -> None:
        lines = header_lines(
            self.cfg, self.loader, self.val_sets, self.model, self.device, self.dtype, self.dist, self.tokens_per_step
        )
        if memory is not None:
            lines.append(f"memory : {memory.describe()}")
        lines.append(f"run    : {self.ckpt_path.parent}{os.sep} | checkpoint {self.ckpt_path.name}")
        lines += self.time_estimate()
        if plan.payload is not None:
            lines.append(f"Resumed from {self.ckpt_path} at iter {self.state.iteration}")
        if plan.init is not None:
            optimizer = "its optimizer state" if self.cfg.init_optimizer else "a fresh optimizer"
            lines.append(
                f"Initialised from {plan.init.kind} {plan.init.path}: its weights, a new schedule from iter 0, "
                f"{optimizer}"
            )
        for line in lines + plan.notes:
            self.log(line)

    def time_estimate(self) -> list[str]:
        """The header's estimate of the time a step and the run take, and a warning when the run
        would take more than a day."""
        flops = self.flops_per_token * self.tokens_per_step / self.dist.world_size  # one rank's share
        rate = matmul_rate(self.device, self.dtype)
        step_s = estimated_step_seconds(flops, rate)
        self.estimated_run_s = step_s * (self.cfg.max_iters - self.state.iteration)
        lines = [
            f"time   : about {per_step(step_s)} estimated ({flops / 1e12:.3g} TFLOP a step, matmuls here at "
            f"{rate / 1e9:,.0f} GFLOP/s) | {self.steps_left_words()} about {span(self.estimated_run_s)}"
        ]
        if warning := too_long_warning(self.estimated_run_s, self.device):
            lines.append(warning)
        return lines

    def steps_left_words(self) -> str:
        left = self.cfg.max_iters - self.state.iteration
        return f"{left:,} steps" if self.state.iteration == 0 else f"{left:,} steps left"

    def report_time(self) -> None:
        """Once, after the first steps: the measured time per step and for the run (with the
        warning, when the estimate did not already give it and the run would take over a day)."""
        clock = self.clock
        if not clock.due_report():
            return
        clock.reported = True
        if self.device.type == "cuda":  # the steps the device still owes count as theirs
            waited = time.perf_counter()
            torch.cuda.synchronize(self.device)
            clock.add_wait(time.perf_counter() - waited)
        left = self.cfg.max_iters - self.state.iteration
        if left <= 0:
            return
        step_s = clock.step_seconds
        run_s = step_s * (self.cfg.max_iters - self.start_iteration)
        self.log(
            f"time   : {per_step(step_s)} measured over {clock.steps} steps | "
            f"{self.cfg.max_iters - self.start_iteration:,} steps about {span(run_s)}, "
            f"{span(step_s * left)} left"
        )
        if too_long_warning(self.estimated_run_s, self.device) is None and (
            warning := too_long_warning(run_s, self.device)
        ):
            self.log(warning)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """The training loop. A step's loss and gradient norm stay on the device until the guard
        reads them: at log points and checkpoints, or when too many are pending."""
        cfg, state, guard = self.cfg, self.state, self.guard
        result = TrainResult(iteration=state.iteration, checkpoint_path=str(self.ckpt_path))
        try:
            with StopSignal() as stop:
                self.start()
                while state.iteration < cfg.max_iters:
                    if not self.dist.enabled and stop.requested:  # came during iter 0's loss
                        self.save()
                        result.stopped_by_signal = True
                        break
                    lr = self.set_learning_rate(state.iteration + 1)
                    self.clock.begin()
                    loss = self.forward_backward()
                    if loss is None:  # a stop signal came inside the step: it is dropped
                        self.save()
                        result.stopped_by_signal = True
                        break
                    guard.step(state.iteration + 1, loss, self.clip_gradients())
                    self.optimizer.zero_grad(set_to_none=True)
                    state.iteration += 1
                    due = self.due()
                    if due.log or due.save:
                        guard.read()  # one wait for the device; a non-finite step stops the run here
                    self.clock.end()
                    self.report_time()
                    val = self.evaluate() if due.eval else None
                    if due.log:
                        self.log_window(lr, val)
                    stop_reason = self.stop_reason(stop)  # the same on every rank
                    if due.save or stop_reason:
                        self.save()
                    self.show_progress(lr)
                    if stop_reason:
                        result.stopped_by_signal = stop_reason == "signal"
                        result.stopped_by_time = stop_reason == "time"
                        break
        except DataChanged as exc:
            raise DataChanged(f"{exc}; {self.last_checkpoint_note()}") from None
        finally:
            self.close()
        result.iteration, result.skipped_steps, result.losses = state.iteration, guard.skipped, guard.losses
        result.last_loss, result.last_val_loss = self.last_window_loss, self.last_val_loss
        return result

    def set_learning_rate(self, iteration: int) -> float:
        """The schedule's rate for `iteration`, set on every parameter group."""
        lr = lr_at(self.cfg, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups keep their own peak
        return lr

    def forward_backward(self) -> torch.Tensor | None:
        """Gradients of one step over grad_accum_steps micro-batches; returns the step's loss, left
        on the device. None when a stop signal came inside the step and dropped it (one process
        only: ranks must agree on every step): between micro-batches, or inside a forward or
        backward pass of a step that has barely begun (`StepClock.barely_begun`)."""
        start = self.loader.state_dict()
        try:
            with self.interrupt.armed(self.clock.barely_begun):
                return self.micro_batches(start)
        except StepDropped:
            self.drop_step(start, "inside its forward or backward pass")
            return None

    def drop_step(self, loader_start: dict, where: str) -> None:
        """Undo the step in progress (its gradients, the loader's position) and say so."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loader.load_state_dict(loader_start)
        took = f" of about {self.clock.step_seconds:.3g} s a step" if self.clock.step_seconds else ""
        self.log(
            f"Stop signal {where}, {self.clock.in_step():.3g} s into step {self.state.iteration + 1}{took}: "
            f"the step in progress was dropped; the checkpoint holds iter {self.state.iteration}"
        )

    def micro_batches(self, loader_start: dict) -> torch.Tensor | None:
        cfg = self.cfg
        self.loss_module.train()
        step_loss = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum_steps):
            if micro and not self.dist.enabled and stop_requested():
                self.drop_step(loader_start, "between micro-batches")
                return None
            x, y = self.loader.next()
            # DDP averages gradients across ranks only on the last micro-batch.
            sync = micro == cfg.grad_accum_steps - 1 or not self.dist.enabled
            if cfg.fsdp:
                self.model.set_requires_gradient_sync(sync)
            no_sync = contextlib.nullcontext() if sync or cfg.fsdp else self.loss_module.no_sync()
            with no_sync, self.amp:
                # Scaled so that the accumulated gradient is that of one batch accum times larger.
                loss = self.loss_module(x, y) / cfg.grad_accum_steps
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        return step_loss

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (float16) and clip the gradients; returns their norm before clipping, on the device."""
        self.scaler.unscale_(self.optimizer)
        return run_gradient_clipping(self.model.parameters(), self.cfg.gradient_clip_val)

    def due(self) -> Due:
        cfg, it = self.cfg, self.state.iteration
        last = it == cfg.max_iters
        at_eval = bool(self.val_sets) and (it % cfg.eval_interval == 0 or last)
        return Due(
            eval=at_eval,
            log=it % cfg.log_interval == 0 or at_eval or last,
            save=it % cfg.checkpoint_interval == 0 or last,
        )

    def stop_reason(self, stop: StopSignal) -> str | None:
        """Why the run stops after this step: "signal", "time" (--max_minutes), or None to go on.
        Every rank takes part, so that all stop at the same step."""
        cfg = self.cfg
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - self.run_start > 60 * cfg.max_minutes
        if not any_rank(stop.requested or out_of_time, self.dist):
            return None
        return "signal" if stop.requested else "time"

    def show_progress(self, lr: float) -> None:
        if self.on_step is not None:
            self.on_step(self.state.iteration, self.cfg.max_iters, self.guard.last_loss, lr)

    def last_checkpoint_note(self) -> str:
        if self.saved_at is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint, {self.ckpt_path} at iter {self.saved_at}, was written before it"

    # ---- logs and evaluation ----------------------------------------------------------------

    def start(self) -> None:
        """Start the clocks; a new run first logs iter 0 (see `log_start`)."""
        self.run_start, self.window_eval_seconds = time.perf_counter(), 0.0
        self.last_window_loss: float | None = None  # the newest log line's training loss
        self.last_val_loss: float | None = None
        if self.state.iteration == 0:
            self.log_start()
        self.start_window()
        self.start_iteration, self.train_start = self.state.iteration, self.window_start

    def log_start(self) -> None:
        """Iter 0: the loss of the first step's batches under the initial weights (about
        ln(vocab_size) for a new model: the first sanity check) and the validation loss before
        training. Forward passes only, on batches recomputed by position: the run's batches,
        RNG and losses are the same as without it. A stop signal here skips it."""
        with torch.no_grad():
            self.model.eval()
            total = torch.zeros((), device=self.device)
            try:
                with self.interrupt.armed(lambda: True):
                    for micro in range(self.cfg.grad_accum_steps):
                        if not self.dist.enabled and stop_requested():  # the loop stops before its first step
                            return
                        x, y = self.loader.batch_at(0, micro)
                        with self.amp:
                            total += cross_entropy(self.model(x), y)
            except StepDropped:
                return
            finally:
                self.model.train()
        loss = float(all_reduce_mean(total / self.cfg.grad_accum_steps, self.dist))
        val = self.evaluate() if self.val_sets else None
        self.write_record({"iter": 0, "loss": loss, "lr": lr_at(self.cfg, 0)}, {}, val)

    def start_window(self) -> None:
        """A new span of steps for the next log line's averages and throughput."""
        self.guard.take_window()
        self.loader.reset_wait()
        self.window_start = time.perf_counter()
        self.window_eval_seconds = 0.0  # evaluation is not training time

    def evaluate(self) -> tuple[float | None, dict[str, float]]:
        """The validation loss (the token-weighted mean over named sets) and each named set's loss;
        (None, {}) when a stop signal ended the evaluation."""
        started = time.perf_counter()
        losses = {
            name: validation_loss(self.model, loader, self.cfg.eval_iters, self.amp, self.dist, lockstep=self.cfg.fsdp)
            for name, loader in self.val_sets
        }
        if None in losses:
            val = losses[None], {}
        elif any(loss is None for loss in losses.values()):
            val = None, {}
        else:
            sizes = {name: loader.num_tokens for name, loader in self.val_sets}
            val = sum(losses[name] * sizes[name] for name in losses) / sum(sizes.values()), losses
        self.last_val_loss = val[0]
        self.window_eval_seconds += time.perf_counter() - started
        return val

    def log_window(self, lr: float, val: tuple[float | None, dict[str, float]] | None) -> None:
        """The log line and metrics record for the steps since the last one (all read)."""
        now = time.perf_counter() - self.window_eval_seconds  # as if the evaluation took no time
        elapsed = now - self.window_start
        window = self.guard.take_window()
        train_loss = sum(window) / max(len(window), 1)
        tok_s = len(window) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        wait_share = self.loader.data_wait_seconds / elapsed if elapsed > 0 else 0.0
        record = {
            "iter": self.state.iteration,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": self.guard.last_grad_norm,
            "tokens_per_s": tok_s,
            "data_wait": wait_share,
            "elapsed_s": now - self.run_start,
            "skipped_steps": self.guard.skipped,
        }
        extra = {"tok/s": f"{tok_s:,.0f}", "data wait": f"{100 * wait_share:.1f}%"}
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.peak_flops:
            record["mfu"] = tok_s * self.flops_per_token / self.dist.world_size / self.peak_flops
            extra["MFU"] = f"{100 * record['mfu']:.1f}%"
        if self.log_times:
            extra.update(self.times(now))
        self.write_record(record, extra, val)
        self.last_window_loss = train_loss
        self.start_window()

    def write_record(self, record: dict, extra: dict, val: tuple[float | None, dict[str, float]] | None) -> None:
        """One log line and one metrics record, with the validation losses when evaluated."""
        val_loss = None
        if val is not None:
            val_loss, per_set = val
            record["val_loss"] = val_loss
            record.update({f"val/{name}": value for name, value in per_set.items()})
            if self.bytes_per_token and val_loss is not None:
                record["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
            extra = {**{f"val/{name}": f"{value:.4f}" for name, value in per_set.items()}, **extra}
        self.log(format_log_line(record["iter"], record["loss"], record["lr"], val_loss, **extra))
        self.metrics.write(record)
        self.external.write(record)
        self.state.last_metrics = record

    def times(self, now: float) -> dict[str, str]:
        """Elapsed time and an estimate of the time left, for logs without a progress bar."""
        done = self.state.iteration - self.start_iteration
        left = (now - self.train_start) / done * (self.cfg.max_iters - self.state.iteration) if done > 0 else None
        return {"elapsed": _clock(now - self.run_start), "left": "-" if left is None else _clock(left)}

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self) -> None:
        """The mirror of `restore`: model, optimizer and run state, with what describes the run.

        Every pending step is read first (a non-finite one stops the run before a checkpoint
        holds it), and the data is checked: a checkpoint written after a silent change would
        resume on data it was not trained on."""
        self.guard.read()
        changed = self.identity.changed_during_run()
        if any_rank(changed is not None, self.dist):
            raise DataChanged(f"{changed or 'a data file changed on another rank'} during the run; stopped")
        state = self.state.state_dict()
        iteration = state.pop("iteration")
        extra = dict(
            config=self.cfg.to_dict(),  # resolved from the data: what the run trains with
            user_config=self.user_config,  # as passed: what `inspect --config` reproduces
            model_config=self.model.config.to_dict(),
            **state,
            tokenizer=self.cfg.tokenizer,
            tokenizer_json=self.tokenizer_json,
            world_size=self.dist.world_size,
            lmtools_version=__version__,
            torch_version=str(torch.__version__),
            format_version=FORMAT_VERSION,
            data_fingerprint=self.identity.state_dict(),
            data_reading=self.data.reading,  # how the text was read: `eval` reads text the same way
        )
        if self.cfg.fsdp:  # every rank writes its shards; rank 0 the file beside them
            save_sharded_checkpoint(
                self.model, self.optimizer, iteration, self.ckpt_path, is_main=self.dist.is_main, **extra
            )
            self.log(f"Saved checkpoint at iter {iteration} to {self.ckpt_path} (+ .dcp shards)")
        else:
            if self.dist.is_main:
                save_checkpoint(self.model, self.optimizer, iteration, self.ckpt_path, **extra)
                keep_snapshot(self.ckpt_path, iteration, self.cfg.keep_last, protect=self.started_from)
                self.log(f"Saved checkpoint at iter {iteration} to {self.ckpt_path}")
            barrier(self.dist)
        self.saved_at = iteration

    def restore(self, payload: dict, data_changed: bool) -> None:
        """The mirror of `save`: model and optimizer, then the run state. On data changed with
        --allow_data_change, the sampler takes the new data's size."""
        state = {key: payload[key] for key in RunState.KEYS if key in payload}
        state["iteration"] = load_state(payload, self.model, self.optimizer)
        if data_changed and isinstance(state.get("sampler"), dict):
            state["sampler"] = {k: v for k, v in state["sampler"].items() if k != "num_tokens"}
        self.state.load_state_dict(state)

    def close(self) -> None:
        self.interrupt.remove()
        self.metrics.close()
        self.external.close()
        self.loader.close()
        for _name, val_loader in self.val_sets:
            val_loader.close()


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


def header_lines(cfg, loader, val_sets, model, device, dtype, dist_info, tokens_per_step: int) -> list[str]:
    def describe(name: str, ld: BatchLoader) -> list[str]:
        d = ld.describe()
        lines = []
        for src in d["sources"]:
            lines.append(
                f"{name:<7}: {src['path']} | {src['tokens']:,} tokens | {src['dtype']} | "
                f"{'memory-mapped' if src.get('mmap') else 'in memory'}"
                + (f" | weight {src['weight']:.3g}" if src.get("weight") is not None and len(d["sources"]) > 1 else "")
            )
        lines.append(
            f"{'':<7}  token ids {d['min_token']}..{d['max_token']}" + (" (meta.json)" if d["range_from_meta"] else "")
        )
        return lines

    mc = model.config
    n_params = model.num_parameters()
    lines = ["lmtools train"]
    lines += describe("data", loader)
    for name, val_loader in val_sets:
        lines += describe("val" if name is None else f"val/{name}", val_loader)
    lines.append(
        "model  : "
        + (f"{cfg.model_size} | " if cfg.model_size else "")
        + f"{mc.num_layers} layers | d_model {mc.d_model} | {mc.num_heads} heads | d_ff {mc.d_ff} | "
        f"vocab {mc.vocab_size} | {n_params / 1e6:.2f}M parameters"
    )
    if options := describe_options(cfg):
        lines.append(options)
    ranks = f" | {dist_info.world_size} ranks" if dist_info.enabled else ""
    lines.append(
        f"device : {device} | {str(dtype).removeprefix('torch.')}{' | compiled' if cfg.compile else ''}{ranks}"
    )
    lines.append(
        f"batch  : {cfg.batch_size} x context {cfg.context_length}"
        + (f" x {cfg.grad_accum_steps} accum" if cfg.grad_accum_steps > 1 else "")
        + f" = {tokens_per_step:,} tokens/step | max_iters {cfg.max_iters}"
    )
    return lines
