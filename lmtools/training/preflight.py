"""Pre-flight checks: values nobody would choose on purpose, and runs that cannot fit.

A flag or a checkpoint's stored config is input like any other: each value is held to a sane
bound before anything is built (a stored `num_layers` of a million would otherwise make a
model for minutes, then fail to allocate it). Then the memory a run needs (weights, gradients,
optimizer state, activations of one micro-batch) is estimated and compared with the device's:
the RAM for the CPU, the GPU's own memory for CUDA. What cannot fit is refused in one line
with the estimate and the fix; the estimate is printed in the run's header.

The estimate is deliberately rough (within a factor of about two): it exists to refuse what is
far out of reach at once, not to predict the peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmtools.errors import ConfigError

# Far beyond any model trained today, small enough that building or allocating one cannot hang.
MODEL_BOUNDS = {
    "vocab_size": 1 << 24,
    "context_length": 1 << 22,
    "d_model": 1 << 16,
    "num_layers": 4096,
    "num_heads": 1 << 12,
    "d_ff": 1 << 18,
}
# Loop counts beyond which a run would spend its life in one step or one evaluation.
RUN_BOUNDS = {"grad_accum_steps": 100_000, "eval_iters": 100_000, "batch_size": 1 << 20}


def check_bounds(values: dict, where: str = "--") -> None:
    """Refuse the first value above its bound; `where` prefixes the name ("--" for flags)."""
    for name, bound in (MODEL_BOUNDS | RUN_BOUNDS).items():
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise ConfigError(f"{where}{name} {value:,} is beyond the sane bound of {bound:,}; use a smaller value")


def check_stored_config(config: dict, checkpoint) -> None:
    """A checkpoint's stored model config, held to the same bounds as flags."""
    check_bounds(config, where=f"checkpoint {checkpoint}: ")


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    available: int | None
    where: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {_gib(v)}"
            for name, v in (
                ("weights", self.weights),
                ("gradients", self.gradients),
                ("optimizer", self.optimizer),
                ("activations", self.activations),
            )
            if v
        )
        of = f" of {_gib(self.available)} {self.where}" if self.available else ""
        return f"~{_gib(self.total)} estimated ({parts}){of}"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def parameter_count(mc) -> int:
    """Parameters of the model a config describes (embedding, layers, final norm, head)."""
    per_layer = 4 * mc.d_model * mc.d_model + 3 * mc.d_model * mc.d_ff + 2 * mc.d_model
    return 2 * mc.vocab_size * mc.d_model + mc.num_layers * per_layer + mc.d_model


def estimate_training_memory(
    mc, batch_size: int, act_bytes: int, shards: int = 1, training: bool = True, device=None
) -> MemoryEstimate:
    """Weights in float32, AdamW's two moments, gradients, and the activations a micro-batch
    keeps for the backward pass (about 10 d_model + 4 d_ff values per token and layer, plus the
    logits and their float32 copies); with `shards` (FSDP) the first three are split."""
    params = parameter_count(mc)
    tokens = batch_size * mc.context_length
    rope = 2 * mc.context_length * (mc.d_model // max(mc.num_heads, 1)) // 2 * 4
    if training:
        per_token = mc.num_layers * (10 * mc.d_model + 4 * mc.d_ff) * act_bytes + mc.vocab_size * (act_bytes + 8)
    else:  # one forward at a time: a layer's values and the logits
        per_token = (10 * mc.d_model + 4 * mc.d_ff) * act_bytes + mc.vocab_size * (act_bytes + 4)
    available, where = device_memory(device)
    return MemoryEstimate(
        weights=4 * params // shards + rope,
        gradients=4 * params // shards if training else 0,
        optimizer=8 * params // shards if training else 0,
        activations=tokens * per_token,
        available=available,
        where=where,
    )


def device_memory(device) -> tuple[int | None, str]:
    """Total memory of `device` in bytes (the GPU's own, else the machine's RAM) and its name."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory, f"on {device}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of RAM"
    except (ValueError, OSError, AttributeError):
        return None, "of RAM"


def check_fits(estimate: MemoryEstimate, fix: str) -> None:
    if estimate.available is not None and estimate.total > estimate.available:
        raise ConfigError(f"this cannot fit: {estimate.describe()}; {fix}")


def check_training_run(cfg, device, world_size: int = 1) -> MemoryEstimate:
    """Bounds of the run's flags, then its memory estimate against the device."""
    check_bounds(cfg.to_dict())
    act_bytes = 4 if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda") else 2
    mc = cfg.model_config()
    estimate = estimate_training_memory(
        mc, cfg.batch_size, act_bytes, shards=world_size if cfg.fsdp else 1, device=device
    )
    weights_heavy = estimate.weights + estimate.gradients + estimate.optimizer > estimate.activations
    fix = (
        "shrink the model (--d_model, --num_layers, --d_ff, --vocab_size) or shard it with --fsdp across more GPUs"
        if weights_heavy
        else "lower --batch_size (and raise --grad_accum_steps to keep the tokens per step) or --context_length"
    )
    check_fits(estimate, fix)
    return estimate


def check_inference_model(mc, checkpoint, device=None) -> None:
    """The model a checkpoint describes must fit in memory to be loaded for sampling."""
    check_bounds({k: getattr(mc, k) for k in MODEL_BOUNDS}, where=f"checkpoint {checkpoint}: ")
    check_fits(
        estimate_training_memory(mc, 1, 4, training=False, device=device),
        "this checkpoint's model is larger than this machine can load",
    )
