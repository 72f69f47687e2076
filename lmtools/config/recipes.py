"""Recipes: named sets of the training and architecture options beyond the specification.

`spec` (the default) is the specification's model and optimizer. `modern` is the set of
options that measured best on the CPU benchmark (benchmarks/RESULTS_recipe.md): Muon, QK-norm,
ReLU² and zero-initialised projections. The logit soft-cap (no gain there, 10% more time) and
document-aligned windows (far worse with documents much longer than the context) stay options.
A flag the user gives always wins over the recipe.

Model sizes (`--model_size`) are named model shapes, so that a first run needs no five numbers.
The shapes are those of well-known runs, with the specification's feed-forward width of four
times d_model; a shape flag the user gives wins over the size's value.
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


# Named shapes for --model_size: (num_layers, d_model, num_heads, context_length); d_ff = 4 * d_model.
_SHAPES = {
    "tiny": (4, 128, 4, 64),  # nanoGPT's README run for a laptop CPU (n_layer 4, n_embd 128, block 64)
    "small": (6, 384, 6, 256),  # nanoGPT's character-level Shakespeare "baby GPT"
    "base": (12, 768, 12, 512),  # the specification's defaults: GPT-2 small's shape (124M class)
    "medium": (24, 1024, 16, 1024),  # GPT-2 medium (350M class)
    "large": (36, 1280, 20, 1024),  # GPT-2 large (774M class)
}
MODEL_SIZES: dict[str, dict[str, int]] = {
    name: dict(num_layers=layers, d_model=width, num_heads=heads, d_ff=4 * width, context_length=context)
    for name, (layers, width, heads, context) in _SHAPES.items()
}
MODEL_SIZES_HELP = (
    "A named model shape, so that a first run needs no five numbers: tiny (4 layers x 128, context 64: "
    "nanoGPT's laptop-CPU run), small (6 x 384, context 256: nanoGPT's "
    "Shakespeare model), base (12 x 768, context 512: the specification's defaults, GPT-2 small's shape), "
    "medium (24 x 1024) and large (36 x 1280), GPT-2's, context 1024. d_ff is 4 x d_model. Shape flags "
    "given with it win."
)


def model_size_shape(name: str) -> dict[str, int]:
    if name not in MODEL_SIZES:
        raise ConfigError(f"--model_size must be one of {', '.join(MODEL_SIZES)}, got {name!r}")
    return MODEL_SIZES[name]


def apply_model_size(cfg: TrainConfig, explicit: frozenset[str] = frozenset()) -> TrainConfig:
    """A copy of `cfg` with its --model_size's shape, except the values the user named (`explicit`)
    or already moved off their default (as apply_recipe)."""
    if cfg.model_size is None:
        return cfg
    defaults = {f.name: f.default for f in fields(cfg)}
    changes = {
        name: value
        for name, value in model_size_shape(cfg.model_size).items()
        if name not in explicit and getattr(cfg, name) == defaults[name]
    }
    return replace(cfg, **changes)


def model_size_conflict(name: str | None, model: dict, explicit: frozenset[str]) -> str | None:
    """How the named size's shape differs from `model`'s fields (a checkpoint's, an --init_from
    source's), leaving out the fields the user named; None when they agree."""
    if name is None:
        return None
    differ = [
        f"{key}={model[key]}"
        for key, value in model_size_shape(name).items()
        if key not in explicit and key in model and model[key] != value
    ]
    return ", ".join(differ) or None


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
    if cfg.model_size is not None:
        model_size_shape(cfg.model_size)
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if not (math.isfinite(cfg.muon_lr) and cfg.muon_lr > 0):
        raise ConfigError(f"--muon_lr must be a positive number, got {cfg.muon_lr}")
    if cfg.optimizer == "muon" and cfg.fsdp:
        raise ConfigError("--optimizer muon does not work with --fsdp (Muon needs whole matrices); drop one")
