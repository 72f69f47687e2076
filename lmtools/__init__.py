"""lmtools: from raw text to a trained Transformer language model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> module. Imported on first use (PEP 562) so that `lmtools prepare` and
# `lmtools --help` start without importing torch.
_EXPORTS = {
    "AdamW": "lmtools.training.optim",
    "BatchLoader": "lmtools.data.loader",
    "TransformerLM": "lmtools.model",
    "cross_entropy": "lmtools.training.optim",
    "get_batch": "lmtools.data.loader",
    "load_checkpoint": "lmtools.checkpoint",
    "load_dataset": "lmtools.data.loader",
    "parse_source_spec": "lmtools.data.dataset",
    "run_get_lr_cosine_schedule": "lmtools.training.schedule",
    "run_gradient_clipping": "lmtools.training.optim",
    "save_checkpoint": "lmtools.checkpoint",
    "train_model": "lmtools.training.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmtools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from lmtools.checkpoint import load_checkpoint, save_checkpoint
    from lmtools.data.dataset import parse_source_spec
    from lmtools.data.loader import BatchLoader, get_batch, load_dataset
    from lmtools.model import TransformerLM
    from lmtools.training.optim import AdamW, cross_entropy, run_gradient_clipping
    from lmtools.training.schedule import run_get_lr_cosine_schedule
    from lmtools.training.trainer import train_model
