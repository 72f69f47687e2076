"""Loss, optimizer, gradient clipping and the learning-rate schedule."""

from __future__ import annotations

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


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    device: torch.device,
    *,
    optimizer: str = "adamw",
    muon_lr: float = 0.02,
) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW with weight decay on matrices only (not on norms' gains); or, with
    `optimizer="muon"`, Muon for the blocks' 2-D weights and that AdamW for the rest.

    Fused (one kernel over all parameters) on CUDA and the CPU; the fused kernel can also skip
    an update on the device when told the step was not finite.
    """
    hidden = set()
    if optimizer == "muon":
        hidden = {id(p) for p in hidden_matrices(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in hidden:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    adamw = AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))
    if optimizer != "muon":
        return adamw
    muon = torch.optim.Muon(
        [{"params": [p for p in hidden_matrices(model)], "lr_scale": muon_lr / lr}],
        lr=muon_lr,
        weight_decay=weight_decay,
        momentum=0.95,
        nesterov=True,
    )
    return MuonWithAdamW(muon, adamw)


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the Transformer blocks (attention and feed-forward), which Muon
    orthogonalises; the embedding and the head stay with AdamW."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return []
    return [p for p in layers.parameters() if p.requires_grad and p.dim() == 2]


class MuonWithAdamW:
    """Muon and AdamW stepping as one optimizer: one `param_groups` list (the loop sets each
    group's lr to the schedule's value times the group's `lr_scale`), one state dict holding
    both, so that a resumed run continues both exactly."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        # Not fused as a whole: a non-finite step is skipped by the host, not on the device.
        self.defaults: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure=None) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"adamw", "muon"}:
            raise ValueError("the optimizer state is not Muon with AdamW; resume with the run's own --optimizer")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
