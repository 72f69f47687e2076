"""Throughput of the batch gather against the baselines it replaces, in the same run.

Every method produces what training consumes: inputs and targets, int64 torch tensors of shape
(batch_size, context_length), from random windows of a page-cached 100M-token uint16 memmap.

- lmtools_fill: the Rust sampler filling preallocated buffers (what BatchLoader's ring does).
- lmtools_fill_checked: the same, with the id check `lmtools train` runs (vocab_size=50257: every
  gathered window's ids checked to lie in 0..vocab_size).
- lmtools_get_batch: the public `lmtools.data.loader.get_batch`, fresh tensors every call.
- spec_python_loop: the original specification's `np.stack([data[i:i+T] for i in starts])`.
- nanogpt: nanoGPT's `torch.stack([torch.from_numpy(data[i:i+T].astype(np.int64)) ...])`.
- numpy_fancy: `data[starts[:, None] + arange(T)].astype(int64)` (the baseline of the ratios).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from lmtools import _sampler
from lmtools.data.loader import get_batch

SHAPES = [(32, 512), (64, 2048), (512, 1024)]
VOCAB = 50_257  # the ids of conftest's token_memmap lie below it
Batch = tuple[torch.Tensor, torch.Tensor]


def lmtools_fill(data: np.ndarray, b: int, t: int, vocab_size: int | None = None) -> Callable[[], Batch]:
    sampler = _sampler.Sampler([(1.0, [_sampler.TokenFile.from_buffer(data, "bench")])], t, vocab_size=vocab_size)
    x = torch.empty((b, t), dtype=torch.int64)
    y = torch.empty((b, t), dtype=torch.int64)
    xn, yn = x.numpy(), y.numpy()
    step = iter(range(1 << 62))

    def run() -> Batch:
        sampler.fill(xn, yn, 1234, 0, next(step), 0)
        return x, y

    return run


def lmtools_fill_checked(data: np.ndarray, b: int, t: int) -> Callable[[], Batch]:
    return lmtools_fill(data, b, t, vocab_size=VOCAB)


def lmtools_get_batch(data: np.ndarray, b: int, t: int) -> Callable[[], Batch]:
    return lambda: get_batch(data, b, t, "cpu")


def spec_python_loop(data: np.ndarray, b: int, t: int) -> Callable[[], Batch]:
    def run() -> Batch:
        starts = np.random.randint(0, len(data) - t, size=b)
        x = np.stack([data[i : i + t] for i in starts])
        y = np.stack([data[i + 1 : i + 1 + t] for i in starts])
        return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

    return run


def nanogpt(data: np.ndarray, b: int, t: int) -> Callable[[], Batch]:
    def run() -> Batch:
        ix = torch.randint(len(data) - t, (b,))
        x = torch.stack([torch.from_numpy(data[i : i + t].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + t].astype(np.int64)) for i in ix])
        return x, y

    return run


def numpy_fancy(data: np.ndarray, b: int, t: int) -> Callable[[], Batch]:
    offsets = np.arange(t)

    def run() -> Batch:
        starts = np.random.randint(0, len(data) - t, size=b)
        idx = starts[:, None] + offsets
        return torch.from_numpy(data[idx].astype(np.int64)), torch.from_numpy(data[idx + 1].astype(np.int64))

    return run


METHODS = {
    f.__name__: f
    for f in (lmtools_fill, lmtools_fill_checked, lmtools_get_batch, spec_python_loop, nanogpt, numpy_fancy)
}


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{t}" for b, t in SHAPES])
@pytest.mark.parametrize("method", list(METHODS))
def test_gather(benchmark, token_memmap: np.ndarray, results: dict, method: str, shape: tuple[int, int]) -> None:
    b, t = shape
    run = METHODS[method](token_memmap, b, t)
    x, y = run()
    assert x.shape == y.shape == (b, t) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    benchmark.group = f"{b}x{t}"
    benchmark.extra_info["tokens_per_batch"] = b * t
    benchmark.pedantic(
        run, rounds=30 if method in ("spec_python_loop", "nanogpt") else 200, warmup_rounds=5, iterations=1
    )
    results[(shape, method)] = benchmark.stats.stats.median
