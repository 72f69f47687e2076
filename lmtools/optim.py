"""Loss, optimizer, gradient clipping and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

# Decoupled weight decay, torch's implementation; `make_optimizer` picks the fused kernel.
AdamW = torch.optim.AdamW


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `targets` under `logits` (..., vocab).

    torch's fused log-softmax and NLL, which subtract the row maximum (log-sum-exp) and so stay
    finite for logits in the thousands; the arithmetic runs in float32 even under bf16 autocast.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def run_gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float) -> torch.Tensor:
    """Scale all gradients in place so that their global L2 norm is at most `max_l2_norm`.

    Returns the norm before clipping, as a tensor (reading it would wait for the GPU).
    Parameters without a gradient (frozen) are skipped. torch's multi-tensor kernels do the
    work: a handful of launches instead of two per parameter.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    # Sharded (FSDP) gradients are DTensors: their norm is partial until reduced across ranks.
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_l2_norm, norm)
    return norm


def run_get_lr_cosine_schedule(
    it: int,
    max_learning_rate: float,
    min_learning_rate: float,
    warmup_iters: int,
    cosine_cycle_iters: int,
) -> float:
    """Linear warmup to max, cosine decay to min at `cosine_cycle_iters`, then min."""
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it > cosine_cycle_iters:
        return min_learning_rate
    span = cosine_cycle_iters - warmup_iters
    progress = (it - warmup_iters) / span if span > 0 else 1.0
    return min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains).

    Fused (one kernel over all parameters) on CUDA and the CPU; the fused kernel can also skip
    an update on the device when told the step was not finite.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))
