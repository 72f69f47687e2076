"""The numerics policy of a training step, in one place.

A step's loss and gradient norm stay on the device until the host needs them: reading them
every step would make the host wait for the GPU each time. `NumericsGuard` keeps them pending
and decides, for every step, whether its update is applied:

- `guard.step(iteration, loss, grad_norm)` applies the optimizer update of a step whose
  gradients are ready (unscaled and clipped). With a fused optimizer a non-finite step is
  skipped on the device, with no wait; the host decides first only where it must: for
  --skip_spikes, or when the optimizer cannot skip on the device and --skip_nonfinite is on.
  More than MAX_PENDING_STEPS unread steps are read at once.
- `guard.read()` reads the pending steps with one wait and checks them in order: a non-finite
  step stops the run (`TrainingDiverged`) or, with --skip_nonfinite, counts as skipped; a loss
  spike (z-score over --spike_zscore) is logged and, with --skip_spikes, skipped.

float16 runs leave overflowing steps to the gradient scaler, which skips them itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from lmtools.errors import LMToolsError
from lmtools.runtime.distributed import DistInfo, all_reduce_max, all_reduce_mean
from lmtools.training.metrics import SpikeDetector

# A bound on steps left unread on the device when logs and checkpoints are far apart.
MAX_PENDING_STEPS = 256


class TrainingDiverged(LMToolsError):
    """The loss or gradient norm stopped being finite."""


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()`, which leaves every parameter and state untouched when `found_inf`
    (a float tensor on the parameters' device) is 1.

    This uses the hook torch's fused Adam/AdamW give `GradScaler`: `step` passes the optimizer's
    `grad_scale` and `found_inf` attributes to the fused kernel. The hook is not public API;
    tests/training/test_numerics.py fails if a torch upgrade changes it.
    """
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class NumericsGuard:
    """Deferred loss reads, non-finite and spike checks, and the skipping of updates they ask for.

    Holds what a run reports of its steps: `losses` (every step read so far), `last_loss`,
    `last_grad_norm`, `skipped` (updates skipped) and the losses read since `take_window`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        dtype: torch.dtype,
        dist: DistInfo,
        *,
        skip_nonfinite: bool,
        skip_spikes: bool,
        spike_zscore: float,
        log: Callable[[str], None],
        checkpoint_path: str | Path,
    ):
        self.optimizer, self.scaler, self.dtype, self.dist, self.log = optimizer, scaler, dtype, dist, log
        self.skip_nonfinite, self.skip_spikes, self.checkpoint_path = skip_nonfinite, skip_spikes, checkpoint_path
        self.spikes = SpikeDetector(spike_zscore)
        # A fused optimizer skips a non-finite update on the device, with no wait.
        self.skips_on_device = bool(optimizer.defaults.get("fused"))
        # The host must read each step before its update only to skip spikes, or without a fused optimizer.
        self.reads_each_step = skip_spikes or (skip_nonfinite and not self.skips_on_device)
        # Steps whose loss and gradient norm are still on the device: (iteration, loss, norm).
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.losses: list[float] = []
        self.window: list[float] = []
        self.last_loss: float | None = None
        self.last_grad_norm = 0.0
        self.skipped = 0

    def step(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Apply step `iteration`'s update unless the policy skips it."""
        self.pending.append((iteration, loss, grad_norm))
        if self.reads_each_step:
            skipped = self.read()  # the host's verdict, before the update
            if not skipped:
                self.apply_update(loss, grad_norm)
            return
        self.apply_update(loss, grad_norm)
        if len(self.pending) >= MAX_PENDING_STEPS:
            self.read()

    def apply_update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if self.dtype == torch.float16:
            self.scaler.step(self.optimizer)  # the scaler skips overflowing steps itself
            self.scaler.update()
        elif self.skips_on_device:
            # Applied only if the loss and gradient norm are finite on every rank: decided on
            # the device, so the host need not wait; `read` reports the outcome later.
            nonfinite = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
            step_unless_found_inf(self.optimizer, all_reduce_max(nonfinite, self.dist))
        else:
            self.optimizer.step()

    def read(self) -> bool:
        """Read the pending steps with one wait for the device and check them in order; returns
        whether the newest one's update is skipped. A non-finite step stops the run here, before
        any checkpoint after it is written."""
        if not self.pending:
            return False
        iters, losses, norms = zip(*self.pending)
        self.pending.clear()
        losses = all_reduce_mean(torch.stack(losses), self.dist)
        values = torch.stack([losses, torch.stack([n.to(losses) for n in norms])]).tolist()
        skipped = False
        for it, loss, norm in zip(iters, *values):
            reason = self.verdict(it, loss, norm)
            skipped = reason is not None
            if skipped:
                self.skipped += 1
                self.log(f"Skipped update at iter {it}: {reason} ({self.skipped} skipped so far)")
            self.losses.append(loss)
            self.window.append(loss)
            self.last_loss, self.last_grad_norm = loss, norm
        return skipped

    def take_window(self) -> list[float]:
        """The losses read since the last call."""
        window, self.window = self.window, []
        return window

    def verdict(self, it: int, loss: float, grad_norm: float) -> str | None:
        """Why update `it` must be skipped, or None; raises when a non-finite loss stops the run."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) and self.dtype != torch.float16:
            reason = "non-finite " + " and ".join(
                f"{name} ({value})"
                for name, value in (("loss", loss), ("gradient norm", grad_norm))
                if not math.isfinite(value)
            )
            if self.skip_nonfinite:
                return reason
            raise TrainingDiverged(
                f"{reason} at iter {it}; stopped, the last good checkpoint {self.checkpoint_path} is kept. "
                f"Lower --learning_rate, or pass --skip_nonfinite to skip such steps"
            )
        z = self.spikes.check(loss)
        if z is not None:
            self.log(f"Loss spike at iter {it}: {loss:.4f} (z-score {z:.1f})")
            if self.skip_spikes:
                return "loss spike"
        return None
