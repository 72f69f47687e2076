"""torch.distributed set-up for runs launched by torchrun (DDP; nccl on CUDA, gloo on the CPU)."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Host-side flags travel over gloo even when tensors use nccl: agreeing on them then
    # never waits for the GPU.
    cpu_group: Any = field(default=None, compare=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_joined = False  # whether this process joined a process group (see `joined_process_group`)


def joined_process_group() -> bool:
    """Whether this process took part in a distributed run (its end needs care: lmtools.cli.app.main)."""
    return _joined


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment; a no-op for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, store=_attempt_store(), rank=rank, world_size=world_size)
    global _joined
    _joined = True
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return DistInfo(rank, world_size, local_rank, cpu_group), device


def _attempt_store() -> dist.Store:
    """The store torchrun's environment names, with this attempt's keys kept apart.

    A job that torchrun restarts (--max_restarts, a lost worker) keeps one store server across
    attempts (the c10d rendezvous shares its TCPStore with the workers and never renews it), and
    the process group's keys of the attempt before (its workers' addresses) are still in it: a
    restarted worker could read a dead peer's address and fail to connect, or wait on it for good.
    Each attempt's keys get a prefix of their own, one that every rank agrees on. (The agents'
    TORCHELASTIC_RESTART_COUNT is no such key: only the agent whose worker failed counts a
    restart; the others restart theirs on the membership change and keep their old count.)"""
    store, rank, world_size = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"lmtools/attempt-{agree_on_attempt(store, rank, world_size)}", store)


_HANDSHAKE = "lmtools/attempt-handshake"


def agree_on_attempt(store: dist.Store, rank: int, world_size: int, timeout: float = 1800.0) -> str:
    """A name for this attempt, chosen by rank 0 and handed to every other rank.

    It relies on what torch's elastic agents guarantee: every worker of an attempt has ended
    before any worker of the next one starts. Rank 0 first deletes the "hello" keys that earlier
    attempts left; from then on a hello can only come from a live worker of this attempt. Each
    other rank writes a fresh random nonce as its hello (again whenever it finds it deleted) and
    waits for the name under a key made of its own nonce, which no earlier attempt can have
    written."""
    if rank == 0:
        name = uuid.uuid4().hex
        hellos = [f"{_HANDSHAKE}/hello/{peer}" for peer in range(1, world_size)]
        for key in hellos:
            store.delete_key(key)
        for key in hellos:
            store.wait([key], timedelta(seconds=timeout))
            store.set(f"{_HANDSHAKE}/name/{store.get(key).decode()}", name)
        return name
    nonce = uuid.uuid4().hex
    hello, answer = f"{_HANDSHAKE}/hello/{rank}", f"{_HANDSHAKE}/name/{nonce}"
    store.set(hello, nonce)
    deadline = time.monotonic() + timeout
    while not store.check([answer]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: rank 0 of this attempt did not answer within {timeout:.0f} s")
        if not store.check([hello]):  # rank 0 cleared the old ones after this rank wrote its own
            store.set(hello, nonce)
        time.sleep(0.02)
    return store.get(answer).decode()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
