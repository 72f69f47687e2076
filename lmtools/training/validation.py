"""Validation: the windows a run validates on (the same ones at every evaluation, and for
`lmtools eval --val_windows`), and their mean loss, split across ranks."""

from __future__ import annotations

import torch

from lmtools.config.train_config import TrainConfig
from lmtools.data.loader import BatchLoader
from lmtools.runtime.distributed import DistInfo
from lmtools.runtime.signals import stop_requested
from lmtools.training.optim import cross_entropy


def validation_loader(
    cfg: TrainConfig, path: str, device: torch.device, *, vocab_size: int | None = None, known_ranges=None
) -> BatchLoader:
    """The windows a run validates on in `path`: batch_at(i) of a loader seeded seed + 1, so that
    every evaluation (and `lmtools eval --val_windows`) sees the same ones. `vocab_size` and
    `known_ranges`: as BatchLoader's (the id check of every batch, ranges from meta.json)."""
    return BatchLoader(
        [path],
        cfg.batch_size,
        cfg.context_length,
        device,
        seed=cfg.seed + 1,
        prefetch=0,
        dtype=cfg.data_dtype,
        vocab_size=vocab_size,
        known_ranges=known_ranges,
    )


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, loader: BatchLoader, eval_iters: int, amp, dist_info: DistInfo, *, lockstep: bool = False
) -> float | None:
    """Mean loss over the same `eval_iters` validation batches every time (split across ranks).

    `lockstep`: a sharded model's forward is a collective, so every rank runs as many forwards
    as the busiest one (the surplus ones count for nothing). Otherwise a stop signal ends the
    evaluation between batches, and it returns None (no partial value is reported).
    """
    model.eval()
    total = torch.zeros((), device=next(model.parameters()).device)
    count = 0
    interrupted = False
    for j in range(-(-eval_iters // dist_info.world_size)):
        i = dist_info.rank + j * dist_info.world_size
        if i >= eval_iters and not lockstep:
            break
        if not lockstep and stop_requested():
            interrupted = True
            break
        x, y = loader.batch_at(i % eval_iters)
        with amp:
            loss = cross_entropy(model(x), y)
        if i < eval_iters:
            total += loss
            count += 1
    model.train()
    if dist_info.enabled:
        import torch.distributed as dist

        packed = torch.stack([total, torch.tensor(float(count), device=total.device)])
        dist.all_reduce(packed)
        return None if interrupted else float(packed[0] / packed[1])
    return None if interrupted else float(total) / max(count, 1)
