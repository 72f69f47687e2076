"""RunState: what a checkpoint carries for a run saves and restores as mirror images."""

from __future__ import annotations

import random

import numpy as np
import torch

from lmtools.data.loader import BatchLoader
from lmtools.runtime.distributed import DistInfo
from lmtools.training.numerics import NumericsGuard
from lmtools.training.state import RunState


def test_load_state_dict_restores_what_state_dict_gave(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, np.random.default_rng(0).integers(0, 500, 50_000).astype(np.uint16))
    cpu = torch.device("cpu")
    loader = BatchLoader([str(path)], 4, 16, cpu, seed=3, prefetch=0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    guard = NumericsGuard(
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        torch.float32,
        DistInfo(),
        skip_nonfinite=True,
        skip_spikes=False,
        spike_zscore=6.0,
        log=lambda _: None,
        checkpoint_path="run.pt",
    )
    state = RunState(loader, guard, cpu)
    for _ in range(3):
        loader.next()
    state.iteration, state.last_metrics, guard.skipped = 3, {"iter": 3, "loss": 5.5}, 1
    guard.spikes.check(5.5)
    saved = state.state_dict()
    expected_batch, expected_draws = loader.next(), (random.random(), np.random.rand(), torch.rand(2))

    for _ in range(5):  # move everything on
        loader.next()
    state.iteration, state.last_metrics, guard.skipped = 9, {}, 4
    guard.spikes.check(7.0)
    random.random(), np.random.rand(), torch.rand(3)

    state.load_state_dict(saved)
    assert (state.iteration, state.last_metrics, guard.skipped) == (3, {"iter": 3, "loss": 5.5}, 1)
    assert guard.spikes.state_dict() == {"values": [5.5]}
    x, y = loader.next()
    assert torch.equal(x, expected_batch[0]) and torch.equal(y, expected_batch[1])
    assert (random.random(), np.random.rand()) == expected_draws[:2] and torch.equal(torch.rand(2), expected_draws[2])
    loader.close()
