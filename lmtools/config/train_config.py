"""The run configuration: one typed place for every training flag and its default."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from lmtools.config.recipes import MODEL_SIZES_HELP, validate_recipe_options
from lmtools.errors import ConfigError

if TYPE_CHECKING:
    from lmtools.model import ModelConfig

DEFAULT_VOCAB_SIZE = 10000
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The checkpoint's name inside a run folder, and where run folders go when none is named.
CHECKPOINT_FILE = "checkpoint.pt"
RUNS_FOLDER = "runs"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    cli: bool = True,
    negatable: bool = False,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A TrainConfig field with its help text: the one declaration the `train` flags (--snake_case
    and --kebab-case), run configs (TOML) and checkpoints are generated from. `cli=False` marks
    state the run records but no flag sets; `negatable` adds a hidden --no_NAME, which turns the
    option off explicitly (over a recipe that turns it on); `aliases` are other names of the flag."""
    metadata = {"help": help, "cli": cli, "negatable": negatable, "aliases": aliases}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    train_data: list[str] = option(
        factory=list,
        help="Token file (.npy/.bin), prepared folder, or PATH:WEIGHT for a mixture; repeat for several.",
    )
    val_data: str | None = option(None, "Validation token file (default: val.npy beside a prepared train.npy).")
    vocab_size: int | None = option(
        None, f"Vocabulary size; by default from the dataset's meta.json, else {DEFAULT_VOCAB_SIZE}."
    )
    model_size: str | None = option(None, MODEL_SIZES_HELP)
    context_length: int = option(512, "Tokens per training window (the model's maximum context).")
    d_model: int = option(768, "Width of the residual stream.")
    num_layers: int = option(12, "Number of Transformer blocks.")
    num_heads: int = option(12, "Attention heads per block (must divide --d_model).")
    d_ff: int = option(3072, "Hidden width of the feed-forward layers.")
    rope_theta: float = option(10000.0, "Base of the rotary position embedding's frequencies.")
    batch_size: int = option(32, "Windows per micro-batch (per rank under torchrun).")
    learning_rate: float = option(1e-4, "Peak learning rate, reached at the end of warmup.")
    min_learning_rate: float = option(1e-5, "Learning rate at the end of the cosine decay.")
    weight_decay: float = option(0.01, "AdamW's decoupled weight decay.")
    warmup_iters: int = option(2000, "Iterations of linear warmup to --learning_rate.")
    max_iters: int = option(100000, "Total training iterations (optimizer updates).")
    cosine_cycle_iters: int | None = option(
        None, "Iteration where the cosine reaches --min_learning_rate; by default --max_iters."
    )
    gradient_clip_val: float = option(1.0, "Clip the gradients' global L2 norm to this value.")
    eval_interval: int = option(1000, "Evaluate on the validation data every this many iterations.")
    eval_iters: int = option(20, "Validation batches per evaluation (the same windows every time).")
    log_interval: int = option(100, "Log the training loss every this many iterations.")
    checkpoint_interval: int = option(5000, "Write a checkpoint every this many iterations.")
    out_dir: str | None = option(
        None,
        f"The run's folder: its checkpoint is OUT_DIR/{CHECKPOINT_FILE}, with metrics.jsonl and snapshots beside "
        f"it. By default {RUNS_FOLDER}/NAME, NAME the --train_data folder's name (a token file's stem).",
        aliases=("run_dir",),
    )
    checkpoint_path: str = option(
        CHECKPOINT_FILE,
        "Where the checkpoint is written (and read by --resume); by default in the run folder (--out_dir). "
        "Given with --out_dir, a relative path is taken inside it.",
    )
    max_minutes: float | None = option(None, "Stop with a checkpoint after training this many minutes.")
    device: str = option("cpu", "cpu, cuda, cuda:N or mps.")
    seed: int = option(0, "Seed of the model's initialisation and the batch order.")
    grad_accum_steps: int = option(1, "Micro-batches accumulated per optimizer update.")
    dtype: str = option("auto", "auto (bfloat16 on CUDA, else float32), float32, bfloat16 or float16.")
    compile: bool = option(False, "torch.compile the model.")
    fsdp: bool = option(
        False, "Shard the model across ranks with FSDP2 (under torchrun); checkpoints add a CHECKPOINT.dcp/ folder."
    )
    keep_last: int = option(0, "Also keep the K newest checkpoints as CHECKPOINT-NNNNNNNN.pt.")
    data_dtype: str | None = option(None, "dtype of raw .bin token files (uint16, uint32, int32, int64).")
    skip_nonfinite: bool = option(False, "Skip (and count) updates with a NaN/inf loss instead of stopping.")
    skip_spikes: bool = option(False, "Skip updates whose loss is a spike (z-score above --spike_zscore).")
    spike_zscore: float = option(6.0, "z-score of the loss against its recent window above which a step is a spike.")
    metrics: bool = option(True, "Write metrics.jsonl beside the checkpoint.", cli=False)
    tensorboard: str | None = option(None, "Also log metrics to TensorBoard in this folder (needs tensorboard).")
    wandb: str | None = option(None, "Also log metrics to this Weights & Biases project (needs wandb).")
    overwrite: bool = option(False, "Start a new run even if --checkpoint_path already exists.")
    tokenizer: str | None = option(None, "The tokenizer.json of the run's data (resolved from it).", cli=False)
    val_sets: dict[str, str] = option(
        factory=dict,
        cli=False,
        help="Validation files by name (one per prepared folder of a mixture), evaluated and logged apart.",
    )
    init_from: str | None = option(
        None,
        "Start a new run from these weights and model shape: a checkpoint or a Hugging Face model folder "
        "(fine-tuning, continued pretraining on new data).",
    )
    init_optimizer: bool = option(False, "With --init_from CHECKPOINT: also take over its optimizer state.")
    # Set when a resume moves the schedule's end (max_iters): from each `start`, a cosine from
    # `from_lr` (the rate there, so the rate stays continuous) to `to_lr` at `end`.
    schedule_extensions: list[dict] = option(
        factory=list, cli=False, help="Where resumes moved the schedule's end (set by resume --max_iters)."
    )
    # A named set of the options below (lmtools/config/recipes.py); "spec" is the specification's run.
    recipe: str = option(
        "spec",
        "spec: the specification's model and optimizer; modern: the options that measured best (see README, "
        "Recipes). Flags below override it.",
    )
    optimizer: str = option(
        "adamw", "adamw, or muon: Muon for the blocks' matrices, AdamW for embeddings, head and gains."
    )
    muon_lr: float = option(0.02, "Muon's peak learning rate (same schedule as --learning_rate).")
    qk_norm: bool = option(False, "RMSNorm on queries and keys (--no_qk_norm: off, under a recipe).", negatable=True)
    ffn: str = option("swiglu", "Feed-forward: swiglu or relu2.")
    zero_init_proj: bool = option(
        False, "Start the residual output projections at zero (--no_zero_init_proj: off).", negatable=True
    )
    logit_softcap: float = option(0.0, "Cap logits smoothly at +-this value (0: off).")
    doc_aligned: bool = option(
        False,
        "Training windows start at document starts (needs the data's meta.json; --no_doc_aligned: off).",
        negatable=True,
    )

    def with_run_folder(
        self, explicit: frozenset[str] = frozenset(), run_name: Callable[[list[str]], str] = lambda _: "run"
    ) -> tuple[TrainConfig, frozenset[str]]:
        """The config with its checkpoint path in the run folder: OUT_DIR/checkpoint.pt for
        --out_dir, runs/NAME/checkpoint.pt when no --checkpoint_path was named either (a named
        one, or one moved off the default, is kept as it is). --out_dir is folded into
        checkpoint_path (so that a stored config, reused, names the same file once); the names
        returned then hold checkpoint_path instead of out_dir. `run_name`: NAME for the training
        data (`lmtools.data.dataset.default_run_name`)."""
        from pathlib import Path

        for name in ("out_dir", "checkpoint_path"):
            if "\x00" in (getattr(self, name) or ""):
                raise ConfigError(f"--{name} holds a NUL character, which no path may hold; choose another")
        named = "checkpoint_path" in explicit or self.checkpoint_path != CHECKPOINT_FILE
        if self.out_dir is not None:
            if not self.out_dir:
                raise ConfigError("--out_dir must not be empty; name the run's folder")
            if named and Path(self.checkpoint_path).is_absolute():
                raise ConfigError(
                    f"--out_dir {self.out_dir} and --checkpoint_path {self.checkpoint_path} (absolute) both say where "
                    f"the run goes: pass one of them"
                )
            path = Path(self.out_dir) / (self.checkpoint_path if named else CHECKPOINT_FILE)
        elif named or not self.train_data:
            return self, explicit
        else:
            path = Path(RUNS_FOLDER) / run_name(self.train_data) / CHECKPOINT_FILE
        cfg = TrainConfig.from_dict(self.to_dict() | {"checkpoint_path": str(path), "out_dir": None})
        return cfg, (explicit - {"out_dir"}) | {"checkpoint_path"}

    def model_config(self) -> ModelConfig:
        from lmtools.model import ModelConfig  # imports torch: only when a model is built

        # Every model field is a run field of the same name.
        return ModelConfig.from_dict(self.to_dict() | {"vocab_size": self.vocab_size or DEFAULT_VOCAB_SIZE})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        """Raise ConfigError naming the first value out of range and how to fix it."""
        if not self.train_data:
            raise ConfigError("--train_data is required: pass a token file (.npy or .bin) or a prepared folder")
        positive_ints = (
            "context_length",
            "batch_size",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "checkpoint_interval",
            "grad_accum_steps",
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
        from lmtools.model import validate_config  # imports torch: not at `--help`'s start-up

        validate_recipe_options(self)
        validate_config(self.model_config())


# The panels of `train --help`, by topic; every flag field is in one (a test checks).
HELP_PANELS = {
    "Data": ("train_data", "val_data", "vocab_size", "data_dtype", "doc_aligned"),
    "Model": (
        "model_size",
        "context_length",
        "d_model",
        "num_layers",
        "num_heads",
        "d_ff",
        "rope_theta",
        "qk_norm",
        "ffn",
        "zero_init_proj",
        "logit_softcap",
        "init_from",
        "init_optimizer",
    ),
    "Optimisation": (
        "batch_size",
        "grad_accum_steps",
        "optimizer",
        "learning_rate",
        "min_learning_rate",
        "muon_lr",
        "weight_decay",
        "gradient_clip_val",
        "seed",
        "skip_nonfinite",
        "skip_spikes",
        "spike_zscore",
    ),
    "Schedule": ("max_iters", "warmup_iters", "cosine_cycle_iters", "max_minutes"),
    "Evaluation and logging": ("eval_interval", "eval_iters", "log_interval", "tensorboard", "wandb"),
    "Checkpoints": ("out_dir", "checkpoint_path", "checkpoint_interval", "keep_last", "overwrite"),
    "Scale": ("device", "dtype", "compile", "fsdp"),
    "Recipe": ("recipe",),
}
PANEL_OF = {name: panel for panel, names in HELP_PANELS.items() for name in names}
