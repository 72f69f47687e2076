"""Recipes: named sets of the training and architecture options beyond the specification.

`spec` (the default) is the specification's model and optimizer. `modern` is the set of
options that measured best on the CPU benchmark (benchmarks/RESULTS_recipe.md): Muon, QK-norm,
ReLU² and zero-initialised projections. The logit soft-cap (no gain there, 10% more time) and
document-aligned windows (far worse with documents much longer than the context) stay options.
A flag the user gives always wins over the recipe.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from lmtools.errors import ConfigError

if TYPE_CHECKING:
    from lmtools.config.train_config import TrainConfig

OPTIMIZERS = ("adamw", "muon")

RECIPES: dict[str, dict] = {
    "spec": {},
    "modern": {
        "optimizer": "muon",
        "qk_norm": True,
        "ffn": "relu2",
        "zero_init_proj": True,
    },
}


def apply_recipe(cfg: TrainConfig, explicit: frozenset[str] = frozenset()) -> TrainConfig:
    """A copy of `cfg` with the recipe's options, except those the user named (`explicit`) or
    already moved off their default. The options themselves are checked by TrainConfig.validate."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    defaults = {f.name: f.default for f in fields(cfg)}
    changes = {
        name: value
        for name, value in RECIPES[cfg.recipe].items()
        if name not in explicit and getattr(cfg, name) == defaults[name]
    }
    return replace(cfg, **changes)


def describe_options(cfg: TrainConfig) -> str | None:
    """The run's options beyond the specification, for its header; None when there are none."""
    parts = []
    if cfg.optimizer == "muon":
        parts.append(f"Muon (lr {cfg.muon_lr:g}) + AdamW")
    if cfg.qk_norm:
        parts.append("QK-norm")
    if cfg.ffn != "swiglu":
        parts.append(f"{cfg.ffn} feed-forward")
    if cfg.zero_init_proj:
        parts.append("zero-init projections")
    if cfg.logit_softcap:
        parts.append(f"logit soft-cap {cfg.logit_softcap:g}")
    if cfg.doc_aligned:
        parts.append("document-aligned windows")
    if not parts and cfg.recipe == "spec":
        return None
    return f"recipe : {cfg.recipe} | " + (" | ".join(parts) or "no options")


def validate_recipe_options(cfg: TrainConfig) -> None:
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if not (math.isfinite(cfg.muon_lr) and cfg.muon_lr > 0):
        raise ConfigError(f"--muon_lr must be a positive number, got {cfg.muon_lr}")
    if cfg.optimizer == "muon" and cfg.fsdp:
        raise ConfigError("--optimizer muon does not work with --fsdp (Muon needs whole matrices); drop one")
