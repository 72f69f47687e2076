"""The run configuration: one typed place for every training flag and its default."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from typing import TYPE_CHECKING

from lmtools.errors import ConfigError

if TYPE_CHECKING:
    from lmtools.model import ModelConfig

DEFAULT_VOCAB_SIZE = 10000
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    train_data: list[str] = field(default_factory=list)
    val_data: str | None = None
    # None: from the dataset's meta.json, else DEFAULT_VOCAB_SIZE.
    vocab_size: int | None = None
    context_length: int = 512
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_ff: int = 3072
    rope_theta: float = 10000.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-5
    weight_decay: float = 0.01
    warmup_iters: int = 2000
    max_iters: int = 100000
    # The cosine reaches min_learning_rate here; None: at max_iters.
    cosine_cycle_iters: int | None = None
    gradient_clip_val: float = 1.0
    eval_interval: int = 1000
    eval_iters: int = 20
    log_interval: int = 100
    checkpoint_interval: int = 5000
    checkpoint_path: str = "checkpoint.pt"
    # Wall-clock budget: the run stops with a checkpoint once it has trained this long.
    max_minutes: float | None = None
    device: str = "cpu"
    seed: int = 0
    grad_accum_steps: int = 1
    dtype: str = "auto"
    compile: bool = False
    # Shard parameters, gradients and optimizer state across ranks (FSDP2); needs torchrun.
    fsdp: bool = False
    keep_last: int = 0
    data_dtype: str | None = None
    skip_nonfinite: bool = False
    skip_spikes: bool = False
    spike_zscore: float = 6.0
    metrics: bool = True
    tensorboard: str | None = None
    wandb: str | None = None
    # A fresh run refuses to replace an existing checkpoint unless this is set.
    overwrite: bool = False
    tokenizer: str | None = None
    # Validation files by name (one per prepared folder of a mixture), evaluated and logged apart.
    val_sets: dict[str, str] = field(default_factory=dict)
    # A new run that starts from these weights and model shape (a checkpoint or a Hugging Face folder).
    init_from: str | None = None
    # With init_from: also take over the checkpoint's optimizer state.
    init_optimizer: bool = False
    # Set when a resume moves the schedule's end (max_iters): from each `start`, a cosine from
    # `from_lr` (the rate there, so the rate stays continuous) to `to_lr` at `end`.
    schedule_extensions: list[dict] = field(default_factory=list)
    # A named set of the options below (lmtools/recipe.py); "spec" is the specification's run.
    recipe: str = "spec"
    optimizer: str = "adamw"
    # Muon's peak learning rate (it follows the same schedule as --learning_rate).
    muon_lr: float = 0.02
    qk_norm: bool = False
    ffn: str = "swiglu"
    zero_init_proj: bool = False
    logit_softcap: float = 0.0
    # Training windows start at document starts (needs the end-of-text id from meta.json).
    doc_aligned: bool = False

    def model_config(self) -> "ModelConfig":
        from lmtools.model import ModelConfig  # imports torch: only when a model is built

        return ModelConfig(
            vocab_size=self.vocab_size or DEFAULT_VOCAB_SIZE,
            context_length=self.context_length,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            rope_theta=self.rope_theta,
            qk_norm=self.qk_norm,
            ffn=self.ffn,
            zero_init_proj=self.zero_init_proj,
            logit_softcap=self.logit_softcap,
        )

    def lr_at(self, update: int) -> float:
        """The learning rate of update number `update` (1-based): the loop's and inspect's rule."""
        from lmtools.optim import run_get_lr_cosine_schedule

        for ext in reversed(self.schedule_extensions):
            if update > ext["start"]:
                progress = min((update - ext["start"]) / (ext["end"] - ext["start"]), 1.0)
                return ext["to_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (ext["from_lr"] - ext["to_lr"])
        return run_get_lr_cosine_schedule(
            update, self.learning_rate, self.min_learning_rate, self.warmup_iters, self._first_cosine_end(),
        )

    def _first_cosine_end(self) -> int:
        """Where the run's first cosine ends: before any extension, where it did when the run started."""
        if self.cosine_cycle_iters is not None:
            return self.cosine_cycle_iters
        return self.schedule_extensions[0]["previous_end"] if self.schedule_extensions else self.max_iters

    def extend_schedule(self, new_max_iters: int, iteration: int) -> str | None:
        """Move max_iters to `new_max_iters` for a run resumed at `iteration`, keeping the rate
        continuous there; returns the line that says what the schedule now is, or None when it
        is unchanged (the rates of the steps still to come are the original schedule's)."""
        old_max = self.max_iters
        self.max_iters = new_max_iters
        if new_max_iters == old_max or new_max_iters <= iteration or self.cosine_cycle_iters is not None:
            return None  # the cosine's end does not move, or no step is left
        if not self.schedule_extensions and iteration <= self.warmup_iters:
            # Still warming up: the rates so far do not depend on where the cosine ends.
            return (
                f"Schedule: max_iters {old_max} -> {new_max_iters}; warmup to iter {self.warmup_iters}, "
                f"then cosine to {self.min_learning_rate:.2e} at iter {new_max_iters}"
            )
        self.max_iters = old_max
        rate = self.lr_at(iteration)
        self.max_iters = new_max_iters
        self.schedule_extensions = [
            *self.schedule_extensions,
            {"start": iteration, "end": new_max_iters, "from_lr": rate, "to_lr": self.min_learning_rate,
             "previous_end": old_max},
        ]
        if math.isclose(rate, self.min_learning_rate, rel_tol=1e-9, abs_tol=0.0):
            return (
                f"Schedule: max_iters {old_max} -> {new_max_iters}; the rate had decayed to its minimum and "
                f"stays at {rate:.2e} (to decay from a higher rate, start a new run with --init_from)"
            )
        return (
            f"Schedule: max_iters {old_max} -> {new_max_iters}; cosine from {rate:.2e} (the rate at iter "
            f"{iteration}) to {self.min_learning_rate:.2e} at iter {new_max_iters}"
        )

    def describe_schedule(self) -> str:
        """The schedule in words, extensions included (for inspect)."""
        text = (
            f"warmup to {self.learning_rate:.2e} over {self.warmup_iters} iters, "
            f"cosine to {self.min_learning_rate:.2e} at iter {self._first_cosine_end()}"
        )
        if self.cosine_cycle_iters is not None and self.cosine_cycle_iters < self.max_iters:
            text += f", then constant until iter {self.max_iters}"
        for ext in self.schedule_extensions:
            text += (
                f"; extended at iter {ext['start']}: cosine from {ext['from_lr']:.2e} "
                f"to {ext['to_lr']:.2e} at iter {ext['end']}"
            )
        return text

    def warmup_warning(self) -> str | None:
        """One line when warmup is not shorter than the run (the rate never reaches its peak)."""
        if self.warmup_iters < self.max_iters:
            return None
        peak = self.lr_at(self.max_iters)
        return (
            f"Warning: --warmup_iters {self.warmup_iters} is not shorter than --max_iters {self.max_iters}: "
            f"the learning rate only reaches {peak:.2e}, never --learning_rate {self.learning_rate:.2e}; "
            f"pass --warmup_iters {self.max_iters // 10} (a tenth of the run)"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        """Raise ConfigError naming the first value out of range and how to fix it."""
        if not self.train_data:
            raise ConfigError("--train_data is required: pass a token file (.npy or .bin) or a prepared folder")
        positive_ints = (
            "context_length", "batch_size", "max_iters", "eval_interval", "eval_iters",
            "log_interval", "checkpoint_interval", "grad_accum_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {value}")
        if self.cosine_cycle_iters is not None and self.cosine_cycle_iters <= 0:
            raise ConfigError(f"--cosine_cycle_iters must be a positive integer, got {self.cosine_cycle_iters}")
        for name in ("warmup_iters", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be zero or positive, got {getattr(self, name)}")
        for name in ("learning_rate", "gradient_clip_val"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name} must be a positive number, got {value}")
        for name in ("min_learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be zero or positive, got {value}")
        if self.min_learning_rate > self.learning_rate:
            raise ConfigError(
                f"--min_learning_rate {self.min_learning_rate} is above --learning_rate {self.learning_rate}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(f"--max_minutes must be a positive number, got {self.max_minutes}")
        if not self.spike_zscore > 0:
            raise ConfigError(f"--spike_zscore must be positive, got {self.spike_zscore}")
        if not self.checkpoint_path:
            raise ConfigError("--checkpoint_path must not be empty")
        if self.fsdp and self.keep_last:
            raise ConfigError("--keep_last does not work with --fsdp (its shards live in one .dcp folder); drop one")
        if self.fsdp and self.dtype == "float16":
            raise ConfigError("--fsdp does not support --dtype float16 (its gradient scaler); use bfloat16")
        from lmtools.model import validate_config
        from lmtools.recipe import validate_recipe_options

        validate_recipe_options(self)
        validate_config(self.model_config())
