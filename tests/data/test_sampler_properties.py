"""Contracts of the window sampler, as properties and statistics.

Every row is a window of the data with its targets shifted by one; batches are a pure function
of (seed, rank, step, micro); starts cover exactly [0, len - T - 1], uniformly; mixtures and
shards split rows as promised. The statistical tests use fixed seeds, so they cannot flake.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtools.data.loader import BatchLoader, get_batch

DTYPES = [np.uint16, np.uint32, np.int32, np.int64]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def token_arrays(draw: st.DrawFn, min_len: int = 2, max_len: int = 400) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    n = draw(st.integers(min_len, max_len))
    info = np.iinfo(dtype)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Extremes included: widening must keep negative and large ids intact.
    return rng.integers(info.min, info.max, size=n, dtype=dtype, endpoint=True)


@FAST
@given(data=token_arrays(), b=st.integers(1, 16), t_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**64 - 1))
def test_rows_are_windows_and_targets_shift(data: np.ndarray, b: int, t_frac: float, seed: int) -> None:
    t = max(1, int(t_frac * (len(data) - 1)))
    loader = BatchLoader(data, b, t, seed=seed, prefetch=0)
    x, y = loader.batch_at(3)
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (b, t)
    wide = data.astype(np.int64)
    for row, (_, start) in enumerate(loader.windows_at(3)):
        assert 0 <= start <= len(data) - t - 1
        np.testing.assert_array_equal(x[row].numpy(), wide[start : start + t])
        np.testing.assert_array_equal(y[row].numpy(), wide[start + 1 : start + t + 1])


@FAST
@given(data=token_arrays(min_len=2, max_len=300), b=st.integers(1, 8), t=st.integers(1, 64))
def test_get_batch_rows_are_windows(data: np.ndarray, b: int, t: int) -> None:
    t = min(t, len(data) - 1)
    x, y = get_batch(data, b, t, "cpu")
    wide = data.astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(wide, t + 1)  # every valid window
    for row in range(b):
        full = np.concatenate([x[row].numpy(), y[row].numpy()[-1:]])
        np.testing.assert_array_equal(x[row].numpy()[1:], y[row].numpy()[:-1])
        assert (windows == full).all(axis=1).any()


@FAST
@given(
    seed=st.integers(0, 2**64 - 1),
    step=st.integers(0, 2**40),
    micro=st.integers(0, 7),
    b=st.integers(4, 16),
    dtype=st.sampled_from(DTYPES),
)
def test_batches_are_pure_functions_of_seed_rank_step(seed: int, step: int, micro: int, b: int, dtype: type) -> None:
    data = np.arange(100_000, dtype=dtype)
    a = BatchLoader(data, b, 32, seed=seed, rank=0, grad_accum_steps=8, prefetch=0)
    again = BatchLoader(data, b, 32, seed=seed, rank=0, grad_accum_steps=8, prefetch=0)
    other_rank = BatchLoader(data, b, 32, seed=seed, rank=1, grad_accum_steps=8, prefetch=0)
    x0, y0 = a.batch_at(step, micro)
    x1, y1 = again.batch_at(step, micro)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x2, _ = other_rank.batch_at(step, micro)
    assert not torch.equal(x0, x2)
    assert not torch.equal(x0, a.batch_at(step + 1, micro)[0])


@pytest.mark.parametrize("t", [1, 10, 50, 98, 99])
def test_get_batch_covers_exactly_the_valid_starts(t: int) -> None:
    torch.manual_seed(1234)
    data = np.arange(100, dtype=np.uint16)  # the first input token is the start
    seen: set[int] = set()
    for _ in range(100):
        x, y = get_batch(data, 64, t, "cpu")
        seen.update(x[:, 0].tolist())
        assert torch.equal(y[:, 0], x[:, 0] + 1)
    assert seen == set(range(100 - t))  # [0, 100 - t - 1], nothing outside


def test_get_batch_starts_are_uniform_chi_square() -> None:
    torch.manual_seed(7)
    n_starts, t = 50, 10
    data = np.arange(n_starts + t, dtype=np.int32)
    starts = torch.cat([get_batch(data, 1000, t, "cpu")[0][:, 0] for _ in range(50)])
    counts = np.bincount(starts.numpy(), minlength=n_starts)
    assert len(counts) == n_starts
    expected = len(starts) / n_starts
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 85.35, chi2  # 49 degrees of freedom, 0.999 quantile


def test_get_batch_is_reproducible_with_torch_manual_seed() -> None:
    data = np.arange(10_000, dtype=np.uint32)
    torch.manual_seed(3)
    a = get_batch(data, 8, 16, "cpu")
    torch.manual_seed(3)
    b = get_batch(data, 8, 16, "cpu")
    c = get_batch(data, 8, 16, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(b[0], c[0])


def test_mixture_weights_are_honoured() -> None:
    small = np.arange(0, 1_000, dtype=np.int32)
    large = np.arange(100_000, 300_000, dtype=np.int32)
    loader = BatchLoader([small, large], 2000, 8, weights=[0.7, 0.3], seed=5, prefetch=0)
    firsts = torch.cat([loader.batch_at(s)[0][:, 0] for s in range(10)])
    share = (firsts < 1_000).double().mean().item()
    # 20 000 rows: one standard deviation is 0.0032.
    assert abs(share - 0.7) < 0.015, share


def test_mixture_from_path_specs(tmp_path) -> None:
    np.save(tmp_path / "web.npy", np.arange(0, 5_000, dtype=np.uint16))
    np.save(tmp_path / "code.npy", np.arange(10_000, 60_000, dtype=np.uint16))
    loader = BatchLoader([f"{tmp_path / 'web.npy'}:1", f"{tmp_path / 'code.npy'}:3"], 2000, 4, seed=1, prefetch=0)
    firsts = torch.cat([loader.batch_at(s)[0][:, 0] for s in range(10)])
    share = (firsts < 5_000).double().mean().item()
    assert abs(share - 0.25) < 0.015, share
    weights = [s["weight"] for s in loader.describe()["sources"]]
    assert weights == pytest.approx([0.25, 0.75])


def test_shards_never_straddle_and_are_uniform_over_windows(tmp_path) -> None:
    lengths = [40, 300, 17]
    bases = [0, 10_000, 20_000]
    for i, (n, base) in enumerate(zip(lengths, bases)):
        np.save(tmp_path / f"shard_{i:02d}.npy", np.arange(base, base + n, dtype=np.uint32))
    t = 16
    loader = BatchLoader(tmp_path, 1000, t, seed=2, prefetch=0)
    assert loader.num_tokens == sum(lengths)
    counts = np.zeros(3)
    for step in range(20):
        x, y = loader.batch_at(step)
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
        which = rows[:, 0] // 10_000
        # Each row is T + 1 consecutive ids of one shard: never runs past a shard's end.
        assert (np.diff(rows, axis=1) == 1).all()
        for shard in range(3):
            in_shard = rows[which == shard]
            assert (in_shard[:, -1] < bases[shard] + lengths[shard]).all()
            counts[shard] += len(in_shard)
    windows = np.array([n - t for n in lengths], dtype=float)
    expected = windows / windows.sum() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, (counts, expected)  # 2 degrees of freedom, 0.999 quantile


@settings(max_examples=15, deadline=None)
@given(
    accum=st.integers(1, 4),
    stop_at=st.integers(0, 12),
    prefetch=st.integers(0, 3),
    seed=st.integers(0, 2**63),
)
def test_resume_draws_the_batches_of_the_uninterrupted_run(accum: int, stop_at: int, prefetch: int, seed: int) -> None:
    data = np.arange(50_000, dtype=np.uint16)
    total = 13
    with BatchLoader(data, 4, 8, seed=seed, grad_accum_steps=accum, prefetch=prefetch) as straight:
        expected = [straight.next() for _ in range(total)]

    with BatchLoader(data, 4, 8, seed=seed, grad_accum_steps=accum, prefetch=prefetch) as first:
        for _ in range(stop_at):
            first.next()
        state = first.state_dict()
        first.next()  # drawn after the checkpoint: the resumed run must not skip it
    assert all(isinstance(v, (int, float, str)) for v in state.values())

    # A fresh loader (another seed on purpose: the state carries the seed) that has already
    # prefetched batches of its own position must drop them on load.
    with BatchLoader(data, 4, 8, seed=seed + 1, grad_accum_steps=accum, prefetch=prefetch) as resumed:
        resumed.next()
        resumed.load_state_dict(state)
        got = [resumed.next() for _ in range(total - stop_at)]
    for (ex, ey), (gx, gy) in zip(expected[stop_at:], got):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
