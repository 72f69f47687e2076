"""What a checkpoint carries for a run besides the model and optimizer, saved and restored in one place.

`RunState.state_dict()` gives the checkpoint's entries and `load_state_dict()` takes them back:
the iteration, the updates skipped, the spike detector's window, the last metrics record, the
sampler's position and the random number generators. The schedule (with its extensions) is part
of the run config, stored beside it.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from lmtools.data.loader import BatchLoader
from lmtools.errors import CheckpointError, LMToolsError
from lmtools.training.numerics import NumericsGuard


def rng_state(device: torch.device) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _numpy_state_to_plain(state) -> tuple:
    # weights_only loading accepts tensors and plain data, not numpy arrays.
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunState:
    """The run's position: its iteration and last metrics, with the guard's and sampler's state."""

    KEYS = ("iteration", "sampler", "rng", "spikes", "skipped_steps", "metrics")  # its checkpoint entries

    def __init__(self, loader: BatchLoader, guard: NumericsGuard, device: torch.device):
        self.loader, self.guard, self.device = loader, guard, device
        self.iteration = 0
        self.last_metrics: dict = {}

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "sampler": self.loader.state_dict(),
            "rng": rng_state(self.device),
            "spikes": self.guard.spikes.state_dict(),
            "skipped_steps": self.guard.skipped,
            "metrics": self.last_metrics,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave; a damaged entry is a CheckpointError naming the way out."""
        try:
            self.iteration = int(state["iteration"])
            self.loader.load_state_dict(dict(state.get("sampler") or {}))
            self.guard.spikes.load_state_dict(state.get("spikes", {}))
            self.guard.skipped = int(state.get("skipped_steps", 0))
            self.last_metrics = dict(state.get("metrics") or {})
            if "rng" in state:
                set_rng_state(state["rng"], self.device)
        except LMToolsError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError, AttributeError) as exc:
            detail = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise CheckpointError(
                f"the checkpoint's run state (sampler, RNG or spike window) is damaged ({type(exc).__name__}: "
                f"{detail}); resume from another checkpoint"
            ) from None
