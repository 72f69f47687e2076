"""What a run trains: the model built (whole, or sharded across ranks with FSDP2, each rank
materialising only its own slice), the module the loop calls (loss inside, compiled and wrapped
for DDP as asked), and the mixed precision of its forward passes."""

from __future__ import annotations

import contextlib

import torch

from lmtools.config.train_config import TrainConfig
from lmtools.model import TransformerLM
from lmtools.runtime.distributed import DistInfo
from lmtools.training.optim import cross_entropy


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes; float32 runs without it."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


class NextTokenLoss(torch.nn.Module):
    """The model and its loss as one module, so that `--compile` and DDP see the whole step:
    compiled together, the float32 upcast of the logits fuses into the log-softmax."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.model(token_ids), targets)


def training_module(model: TransformerLM, cfg: TrainConfig, device: torch.device, dist: DistInfo) -> torch.nn.Module:
    """The model and its loss, wrapped for DDP and compiled when asked. An FSDP model needs no
    wrapper: fully_shard made it reduce its own gradients."""
    module: torch.nn.Module = NextTokenLoss(model)
    if dist.enabled and not cfg.fsdp:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        module = torch.compile(module)
    return module


def build_model(cfg: TrainConfig, device: torch.device) -> TransformerLM:
    """The model built on the meta device, given storage straight on `device`, then initialised
    from the run's seed (no full copy on the host first)."""
    return materialise(meta_model(cfg), device, cfg.seed)


def meta_model(cfg: TrainConfig) -> TransformerLM:
    """The model's structure, without storage."""
    with torch.device("meta"):
        return TransformerLM.from_config(cfg.model_config())


def materialise(model: TransformerLM, device: torch.device, seed: int, store=None) -> TransformerLM:
    """Give a meta model storage on `device` and draw its weights from `seed` alone
    (`store`: see TransformerLM.reset_parameters)."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_parameters(store)
    return model


def build_sharded_model(cfg: TrainConfig, device: torch.device, dist_info: DistInfo) -> TransformerLM:
    """The model sharded with FSDP2 block by block, without any rank ever holding all of it.

    As `build_model`, but sharded before it gets storage. Each rank then draws every weight at
    its full shape, one at a time, from the run's seed, and keeps its own slice: the shards
    together equal the weights `build_model` gives one process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = meta_model(cfg)
    mesh = init_device_mesh(device.type, (dist_info.world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def keep_own_slice(param: torch.Tensor, value: torch.Tensor) -> None:
        # src_data_rank=None: every rank holds the same value, so slicing needs no communication.
        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())

    return materialise(model, device, cfg.seed, keep_own_slice)
