"""`lmtools train` and `lmtools resume`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from lmtools.cli.app import app, user_errors
from lmtools.cli.console import console_guard
from lmtools.config import TrainConfig

_D = TrainConfig()


def _opt(default, *names: str, help: str = "", **kw):
    return typer.Option(default, *names, help=help, **kw)


def _explicit(ctx: typer.Context) -> frozenset[str]:
    """The parameters the user typed (as opposed to defaults)."""
    return frozenset(
        # By name: typer may bundle its own click, whose enum is not click.core's.
        name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    )


class _Reporter:
    """Plain log lines when piped; on a terminal, the same lines above a live progress bar."""

    def __init__(self):
        import sys

        self.progress = None
        self.task = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} | lr {task.fields[lr]:.2e} | {task.fields[speed]}"),
                TimeRemainingColumn(),
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            with console_guard():
                self.progress.stop()

    def log(self, line: str) -> None:
        with console_guard():
            if self.progress is not None:
                self.progress.console.print(line, markup=False, highlight=False)
            else:
                typer.echo(line)

    def step(self, iteration: int, total: int, loss: float | None, lr: float) -> None:
        """`loss` is the newest one read from the device (they are read at log points)."""
        if self.progress is None:
            return
        import time

        now = time.perf_counter()
        loss = "-" if loss is None else f"{loss:.4f}"
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, completed=iteration, loss=loss, lr=lr, speed="")
            self._mark = (now, iteration)
        mark_t, mark_i = self._mark
        speed = f"{(iteration - mark_i) / (now - mark_t):.2f} it/s" if now > mark_t and iteration > mark_i else ""
        self.progress.update(self.task, completed=iteration, total=total, loss=loss, lr=lr, speed=speed)


def _run(cfg, **kw):
    from lmtools.train import train_model

    with _Reporter() as reporter:
        # Without a progress bar (a pipe, a file), the log lines carry the elapsed and remaining time.
        result = train_model(cfg, log=reporter.log, on_step=reporter.step, log_times=reporter.progress is None, **kw)
    _finish(result)


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    train_data: Optional[list[str]] = _opt(None, "--train_data", "--train-data", help="Token file (.npy/.bin), prepared folder, or PATH:WEIGHT for a mixture; repeat for several."),
    val_data: Optional[str] = _opt(None, "--val_data", "--val-data", help="Validation token file (default: val.npy beside a prepared train.npy)."),
    vocab_size: Optional[int] = _opt(None, "--vocab_size", "--vocab-size", help="Vocabulary size; by default from the dataset's meta.json, else 10000."),
    context_length: int = _opt(_D.context_length, "--context_length", "--context-length"),
    d_model: int = _opt(_D.d_model, "--d_model", "--d-model"),
    num_layers: int = _opt(_D.num_layers, "--num_layers", "--num-layers"),
    num_heads: int = _opt(_D.num_heads, "--num_heads", "--num-heads"),
    d_ff: int = _opt(_D.d_ff, "--d_ff", "--d-ff"),
    rope_theta: float = _opt(_D.rope_theta, "--rope_theta", "--rope-theta"),
    batch_size: int = _opt(_D.batch_size, "--batch_size", "--batch-size"),
    learning_rate: float = _opt(_D.learning_rate, "--learning_rate", "--learning-rate"),
    min_learning_rate: float = _opt(_D.min_learning_rate, "--min_learning_rate", "--min-learning-rate"),
    weight_decay: float = _opt(_D.weight_decay, "--weight_decay", "--weight-decay"),
    warmup_iters: int = _opt(_D.warmup_iters, "--warmup_iters", "--warmup-iters"),
    max_iters: int = _opt(_D.max_iters, "--max_iters", "--max-iters"),
    cosine_cycle_iters: Optional[int] = _opt(None, "--cosine_cycle_iters", "--cosine-cycle-iters", help="Iteration where the cosine reaches --min_learning_rate; by default --max_iters."),
    gradient_clip_val: float = _opt(_D.gradient_clip_val, "--gradient_clip_val", "--gradient-clip-val"),
    eval_interval: int = _opt(_D.eval_interval, "--eval_interval", "--eval-interval"),
    eval_iters: int = _opt(_D.eval_iters, "--eval_iters", "--eval-iters", help="Validation batches per evaluation (the same windows every time)."),
    log_interval: int = _opt(_D.log_interval, "--log_interval", "--log-interval"),
    checkpoint_interval: int = _opt(_D.checkpoint_interval, "--checkpoint_interval", "--checkpoint-interval"),
    checkpoint_path: str = _opt(_D.checkpoint_path, "--checkpoint_path", "--checkpoint-path"),
    max_minutes: Optional[float] = _opt(None, "--max_minutes", "--max-minutes", help="Stop with a checkpoint after training this many minutes."),
    resume: bool = _opt(False, "--resume", help="Continue from --checkpoint_path with the config stored in it."),
    auto_resume: bool = _opt(False, "--auto_resume", "--auto-resume", help="Resume when --checkpoint_path exists, else start a new run (safe under torchrun restarts)."),
    rollback: bool = _opt(False, "--rollback", help="Allow resuming from a snapshot older than the run's newest checkpoint (the later steps are discarded)."),
    allow_data_change: bool = _opt(False, "--allow_data_change", "--allow-data-change", help="Resume although the data or tokenizer differ from the checkpoint's fingerprint."),
    init_from: Optional[str] = _opt(None, "--init_from", "--init-from", help="Start a new run from these weights and model shape: a checkpoint or a Hugging Face model folder (fine-tuning, continued pretraining on new data)."),
    init_optimizer: bool = _opt(False, "--init_optimizer", "--init-optimizer", help="With --init_from CHECKPOINT: also take over its optimizer state."),
    overwrite: bool = _opt(False, "--overwrite", help="Start a new run even if --checkpoint_path already exists."),
    device: str = _opt(_D.device, "--device", help="cpu, cuda, cuda:N or mps."),
    seed: int = _opt(_D.seed, "--seed"),
    grad_accum_steps: int = _opt(_D.grad_accum_steps, "--grad_accum_steps", "--grad-accum-steps"),
    dtype: str = _opt(_D.dtype, "--dtype", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16 or float16."),
    compile: bool = _opt(_D.compile, "--compile", help="torch.compile the model."),
    fsdp: bool = _opt(_D.fsdp, "--fsdp", help="Shard the model across ranks with FSDP2 (under torchrun); checkpoints add a CHECKPOINT.dcp/ folder."),
    keep_last: int = _opt(_D.keep_last, "--keep_last", "--keep-last", help="Also keep the K newest checkpoints as CHECKPOINT-NNNNNNNN.pt."),
    data_dtype: Optional[str] = _opt(None, "--data_dtype", "--data-dtype", help="dtype of raw .bin token files (uint16, uint32, int32, int64)."),
    tensorboard: Optional[str] = _opt(None, "--tensorboard", help="Also log metrics to TensorBoard in this folder (needs tensorboard)."),
    wandb: Optional[str] = _opt(None, "--wandb", help="Also log metrics to this Weights & Biases project (needs wandb)."),
    skip_nonfinite: bool = _opt(False, "--skip_nonfinite", "--skip-nonfinite", help="Skip (and count) updates with a NaN/inf loss instead of stopping."),
    skip_spikes: bool = _opt(False, "--skip_spikes", "--skip-spikes", help="Skip updates whose loss is a spike (z-score above --spike_zscore)."),
    spike_zscore: float = _opt(_D.spike_zscore, "--spike_zscore", "--spike-zscore"),
    recipe: str = _opt(_D.recipe, "--recipe", help="spec: the specification's model and optimizer; modern: the options that measured best (see README, Recipes). Flags below override it."),
    optimizer: str = _opt(_D.optimizer, "--optimizer", help="adamw, or muon: Muon for the blocks' matrices, AdamW for embeddings, head and gains."),
    muon_lr: float = _opt(_D.muon_lr, "--muon_lr", "--muon-lr", help="Muon's peak learning rate (same schedule as --learning_rate)."),
    qk_norm: bool = _opt(_D.qk_norm, "--qk_norm", "--qk-norm", help="RMSNorm on queries and keys (--no_qk_norm: off, under a recipe)."),
    no_qk_norm: bool = _opt(False, "--no_qk_norm", "--no-qk-norm", hidden=True),
    ffn: str = _opt(_D.ffn, "--ffn", help="Feed-forward: swiglu or relu2."),
    zero_init_proj: bool = _opt(_D.zero_init_proj, "--zero_init_proj", "--zero-init-proj", help="Start the residual output projections at zero (--no_zero_init_proj: off)."),
    no_zero_init_proj: bool = _opt(False, "--no_zero_init_proj", "--no-zero-init-proj", hidden=True),
    logit_softcap: float = _opt(_D.logit_softcap, "--logit_softcap", "--logit-softcap", help="Cap logits smoothly at +-this value (0: off)."),
    doc_aligned: bool = _opt(_D.doc_aligned, "--doc_aligned", "--doc-aligned", help="Training windows start at document starts (needs the data's meta.json; --no_doc_aligned: off)."),
    no_doc_aligned: bool = _opt(False, "--no_doc_aligned", "--no-doc-aligned", hidden=True),
) -> None:
    """Train a Transformer LM on token files."""
    from lmtools.errors import ConfigError

    params = dict(ctx.params)
    explicit = _explicit(ctx)
    # --no_X turns an option off explicitly, over a recipe that turns it on.
    for name in ("qk_norm", "zero_init_proj", "doc_aligned"):
        if params.pop(f"no_{name}"):
            params[name] = False
            explicit |= {name}
    resume_flag = params.pop("resume")
    choices = {name: params.pop(name) for name in ("rollback", "allow_data_change")}
    auto = params.pop("auto_resume")
    params["train_data"] = list(params["train_data"] or [])
    cfg = TrainConfig(**params)
    resume_from = None
    if auto and (finished := _finished_run(cfg, explicit)) is not None:
        with console_guard():
            typer.echo(f"Training already finished at iter {finished}. Final checkpoint: {cfg.checkpoint_path}")
        return
    if resume_flag or (auto and os.path.lexists(cfg.checkpoint_path)):
        resume_from = cfg.checkpoint_path
        if not Path(resume_from).exists():
            raise ConfigError(
                f"--resume: checkpoint {resume_from} does not exist; check --checkpoint_path or start without --resume"
            )
    _run(cfg, resume_from=resume_from, explicit=explicit, **choices)


def _finished_run(cfg: TrainConfig, explicit) -> int | None:
    """The iteration of the checkpoint at --checkpoint_path when it already reached max_iters
    (so that a restarted --auto_resume job ends at once instead of failing)."""
    from lmtools.runguard import peek_checkpoint

    path = Path(cfg.checkpoint_path)
    payload = peek_checkpoint(path) if path.is_file() else None
    if payload is None:
        return None
    stored = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    max_iters = cfg.max_iters if "max_iters" in explicit else stored.get("max_iters", cfg.max_iters)
    iteration = int(payload["iteration"])
    return iteration if iteration >= int(max_iters) else None


@app.command()
@user_errors
def resume(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by lmtools train."),
    max_iters: Optional[int] = _opt(None, "--max_iters", "--max-iters", help="New total iteration count."),
    device: Optional[str] = _opt(None, "--device", help="Override the stored device."),
    max_minutes: Optional[float] = _opt(None, "--max_minutes", "--max-minutes", help="Stop with a checkpoint after training this many minutes (a budget per invocation)."),
    rollback: bool = _opt(False, "--rollback", help="Allow resuming from a snapshot older than the run's newest checkpoint (the later steps are discarded)."),
    allow_data_change: bool = _opt(False, "--allow_data_change", "--allow-data-change", help="Resume although the data or tokenizer differ from the checkpoint's fingerprint."),
) -> None:
    """Continue a run from its checkpoint alone: config, data, RNG and data position come from it."""
    from lmtools.checkpoint import snapshot_base

    cfg = TrainConfig(checkpoint_path=str(snapshot_base(checkpoint)))
    explicit = {"checkpoint_path"}
    if max_iters is not None:
        cfg.max_iters = max_iters
        explicit.add("max_iters")
    if device is not None:
        cfg.device = device
        explicit.add("device")
    if max_minutes is not None:
        cfg.max_minutes = max_minutes
        explicit.add("max_minutes")
    _run(cfg, resume_from=str(checkpoint), explicit=frozenset(explicit), rollback=rollback,
         allow_data_change=allow_data_change)


def _finish(result) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    with console_guard():
        if result.stopped_by_signal or result.stopped_by_time:
            why = "by signal" if result.stopped_by_signal else "at the --max_minutes limit"
            typer.echo(f"Stopped {why} at iter {result.iteration}; resume with: lmtools resume {result.checkpoint_path}")
        else:
            typer.echo(f"Training finished at iter {result.iteration}. Final checkpoint: {result.checkpoint_path}")
