"""Ending a step that a stop signal arrived in, inside its forward or backward pass.

A step of a large model on a CPU takes minutes; a stop signal checked only between steps (or
between micro-batches) waits for all of it. A forward pre-hook on every module and a gradient
hook on every parameter look at the stop request, so that a forward or backward pass ends at
the next module when the step may be dropped (`timing.StepClock.barely_begun`). The hooks
change no value: the run's losses and weights are bit for bit the same with them.

One process only: ranks must agree on every step, and a rank leaving a forward or backward
pass alone would leave its peers waiting in a collective. Not under torch.compile either, which
would trace the hooks into its graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from lmtools.runtime.signals import stop_requested


class StepDropped(Exception):
    """Raised inside a forward or backward pass that a stop signal ends; caught by the trainer."""


class StepInterrupt:
    """The hooks on `model` (none when not `enabled`); they act only while `armed`."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self._may_drop: Callable[[], bool] | None = None
        self._handles = []
        if enabled:
            self._handles += [module.register_forward_pre_hook(self._check) for module in model.modules()]
            self._handles += [p.register_hook(self._check) for p in model.parameters() if p.requires_grad]

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def _check(self, *_args) -> None:
        if self._may_drop is not None and stop_requested() and self._may_drop():
            self._may_drop = None  # once: the trainer takes over
            raise StepDropped

    @contextlib.contextmanager
    def armed(self, may_drop: Callable[[], bool]) -> Iterator[None]:
        """While entered, a stop request ends the pass in progress when `may_drop()` says so."""
        self._may_drop = may_drop
        try:
            yield
        finally:
            self._may_drop = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
