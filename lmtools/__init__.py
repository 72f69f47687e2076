"""lmtools: from raw text to a trained Transformer language model."""

__version__ = "0.1.0"

from lmtools.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lmtools.data import BatchLoader, get_batch, load_dataset, parse_source_spec  # noqa: E402
from lmtools.model import TransformerLM  # noqa: E402
from lmtools.optim import AdamW, cross_entropy, run_get_lr_cosine_schedule, run_gradient_clipping  # noqa: E402
from lmtools.train import train_model  # noqa: E402

__all__ = [
    "AdamW",
    "BatchLoader",
    "TransformerLM",
    "cross_entropy",
    "get_batch",
    "load_dataset",
    "load_checkpoint",
    "parse_source_spec",
    "run_get_lr_cosine_schedule",
    "run_gradient_clipping",
    "save_checkpoint",
    "train_model",
]
