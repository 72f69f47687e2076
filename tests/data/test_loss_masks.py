"""Loss masks (chat data): `X_mask.npy` beside `X.npy`, gathered by the Rust sampler.

A mask is a 1-D uint8 `.npy` as long as its token file, 1 where the token is a training target.
Every row's inputs are the window's tokens; its targets are the shifted tokens where the mask is
1 and IGNORE_INDEX (-100) where it is 0; aligned to documents, windows start at conversation
starts (an end-of-text id whose mask is 0). Real .npy files, the real extension, values checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtools import _sampler
from lmtools.data.loader import BatchLoader, mask_path
from lmtools.errors import DataError

EOT = 0
IGNORE = -100
DTYPES = [np.uint16, np.uint32, np.int32, np.int64]
FAST = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def chat_data(rng: np.random.Generator, conversations: int, dtype: type = np.uint16) -> tuple[np.ndarray, np.ndarray]:
    """Conversations as prepare --chat lays them out: an end-of-text id opening each (mask 0),
    user tokens (mask 0), assistant tokens ended by the end-of-text id (mask 1)."""
    tokens: list[int] = []
    mask: list[int] = []
    for _ in range(conversations):
        user = int(rng.integers(1, 8))
        assistant = int(rng.integers(1, 10))
        tokens += [EOT, *rng.integers(1, 1000, size=user + assistant).tolist(), EOT]
        mask += [0] * (1 + user) + [1] * (assistant + 1)
    return np.array(tokens, dtype=dtype), np.array(mask, dtype=np.uint8)


def save(folder: Path, name: str, tokens: np.ndarray, mask: np.ndarray | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npy"
    np.save(path, tokens)
    if mask is not None:
        np.save(mask_path(path), mask)
    return path


def expected_row(tokens: np.ndarray, mask: np.ndarray, s: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    wide = tokens.astype(np.int64)
    return wide[s : s + t], np.where(mask[s + 1 : s + t + 1] == 1, wide[s + 1 : s + t + 1], IGNORE)


def conversation_starts(tokens: np.ndarray, mask: np.ndarray, t: int) -> set[int]:
    return {p for p in range(len(tokens) - t) if tokens[p] == EOT and mask[p] == 0}


@FAST
@given(
    conversations=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    b=st.integers(1, 12),
    t=st.integers(1, 48),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
    step=st.integers(0, 2**40),
)
def test_rows_are_masked_windows_at_conversation_starts(
    tmp_path: Path, conversations: int, dtype: type, b: int, t: int, seed: int, data_seed: int, step: int
) -> None:
    tokens, mask = chat_data(np.random.default_rng(data_seed), conversations, dtype)
    t = min(t, len(tokens) - 1)
    starts = conversation_starts(tokens, mask, t)
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = save(Path(d), "train", tokens, mask)
        if not starts:
            with pytest.raises(DataError, match="no conversation start"):
                BatchLoader(path, b, t, seed=seed, doc_eot=EOT, loss_masks=True, prefetch=0)
            return
        loader = BatchLoader(path, b, t, seed=seed, doc_eot=EOT, loss_masks=True, prefetch=0)
        assert loader.masked and loader.describe()["loss_mask"] is True
        assert loader._sampler.num_windows == len(starts)
        x, y = loader.batch_at(step)
        assert x.shape == y.shape == (b, t) and x.dtype == y.dtype == torch.int64
        for row, (_, s) in enumerate(loader.windows_at(step)):
            assert s in starts
            want_x, want_y = expected_row(tokens, mask, s, t)
            np.testing.assert_array_equal(x[row].numpy(), want_x)
            np.testing.assert_array_equal(y[row].numpy(), want_y)


@FAST
@given(
    n=st.integers(2, 300),
    dtype=st.sampled_from(DTYPES),
    b=st.integers(1, 12),
    t_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_any_mask_unaligned_and_the_mask_buffer(
    tmp_path: Path, n: int, dtype: type, b: int, t_frac: float, seed: int, data_seed: int
) -> None:
    """Without doc_eot windows start anywhere; any 0/1 mask masks exactly its zeros, and the
    `mask=` buffer receives mask[s + 1 : s + T + 1]."""
    rng = np.random.default_rng(data_seed)
    info = np.iinfo(dtype)
    tokens = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), size=n, dtype=dtype, endpoint=True)
    mask = rng.integers(0, 2, size=n, dtype=np.uint8)
    t = max(1, int(t_frac * (n - 1)))
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = save(Path(d), "train", tokens, mask)
        files = [_sampler.TokenFile.open(str(path))]
        masks = [_sampler.TokenFile.open_mask(str(mask_path(path)))]
        sampler = _sampler.Sampler([(1.0, files)], t, masks=masks)
        assert sampler.masked and sampler.num_windows == n - t
        x, y = np.zeros((b, t), np.int64), np.zeros((b, t), np.int64)
        got_mask = np.full((b, t), 7, np.uint8)
        sampler.fill(x, y, seed & (2**64 - 1), 0, 5, 0, mask=got_mask)
        x2, y2 = np.zeros_like(x), np.zeros_like(y)
        sampler.fill(x2, y2, seed & (2**64 - 1), 0, 5, 0)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        for row, (f, s) in enumerate(sampler.windows(b, seed & (2**64 - 1), 0, 5, 0)):
            assert f == 0 and 0 <= s <= n - t - 1
            want_x, want_y = expected_row(tokens, mask, s, t)
            np.testing.assert_array_equal(x[row], want_x)
            np.testing.assert_array_equal(y[row], want_y)
            np.testing.assert_array_equal(got_mask[row], mask[s + 1 : s + t + 1])


def test_mixture_of_masked_and_plain_files(tmp_path: Path) -> None:
    """masks= is parallel to Sampler.files; None trains every target of its file (mask buffer all
    ones), so plain and chat data mix in one sampler, weighted or not."""
    chat_tokens, chat_mask = chat_data(np.random.default_rng(1), 200)
    plain = np.random.default_rng(2).integers(1, 1000, size=3000, dtype=np.uint16)
    plain[6::7] = EOT  # documents of 7 tokens
    chat = save(tmp_path, "chat", chat_tokens, chat_mask)
    plain_path = save(tmp_path, "plain", plain, None)
    t, b = 16, 200
    for groups in (
        [(1.0, [_sampler.TokenFile.open(str(plain_path)), _sampler.TokenFile.open(str(chat))])],
        [(0.5, [_sampler.TokenFile.open(str(plain_path))]), (0.5, [_sampler.TokenFile.open(str(chat))])],
    ):
        sampler = _sampler.Sampler(
            groups, t, doc_eot=EOT, masks=[None, _sampler.TokenFile.open_mask(str(mask_path(chat)))]
        )
        x, y, m = np.zeros((b, t), np.int64), np.zeros((b, t), np.int64), np.zeros((b, t), np.uint8)
        sampler.fill(x, y, 3, 1, 2, 0, mask=m)
        used = set()
        for row, (f, s) in enumerate(sampler.windows(b, 3, 1, 2, 0)):
            used.add(f)
            if f == 0:  # plain: document starts, every target trained
                assert s == 0 or plain[s - 1] == EOT
                want_x, want_y = expected_row(plain, np.ones(len(plain), np.uint8), s, t)
                np.testing.assert_array_equal(m[row], np.ones(t, np.uint8))
            else:
                assert chat_tokens[s] == EOT and chat_mask[s] == 0
                want_x, want_y = expected_row(chat_tokens, chat_mask, s, t)
                np.testing.assert_array_equal(m[row], chat_mask[s + 1 : s + t + 1])
            np.testing.assert_array_equal(x[row], want_x)
            np.testing.assert_array_equal(y[row], want_y)
        assert used == {0, 1}
    assert not _sampler.Sampler(groups, t, masks=[None, None]).masked


def test_large_batches_equal_small_ones_row_by_row(tmp_path: Path) -> None:
    """Past the sampler's parallel threshold (256K tokens a batch) the pool gathers the rows; a
    row's window does not depend on the batch size, so the first rows equal a small batch's."""
    tokens, mask = chat_data(np.random.default_rng(3), 8000)
    path = save(tmp_path, "train", tokens, mask)
    t, big, small = 1024, 300, 8
    for threads in (None, 2):
        loader = BatchLoader(
            path, big, t, seed=11, doc_eot=EOT, loss_masks=True, num_threads=threads, prefetch=0, vocab_size=1000
        )
        x, y = loader.batch_at(4, 0)
        few = BatchLoader(path, small, t, seed=11, doc_eot=EOT, loss_masks=True, prefetch=0)
        xs, ys = few.batch_at(4, 0)
        assert torch.equal(x[:small], xs) and torch.equal(y[:small], ys)
        for row, (_, s) in list(enumerate(loader.windows_at(4)))[::29]:
            want_x, want_y = expected_row(tokens, mask, s, t)
            np.testing.assert_array_equal(x[row].numpy(), want_x)
            np.testing.assert_array_equal(y[row].numpy(), want_y)
        assert (y == IGNORE).any() and (y != IGNORE).any()


def test_deterministic_and_resumed_on_the_same_batches(tmp_path: Path) -> None:
    tokens, mask = chat_data(np.random.default_rng(4), 500)
    path = save(tmp_path, "train", tokens, mask)

    def make(prefetch: int) -> BatchLoader:
        return BatchLoader(path, 6, 24, seed=7, grad_accum_steps=2, doc_eot=EOT, loss_masks=True, prefetch=prefetch)

    with make(0) as straight, make(2) as ring:
        want = [straight.next() for _ in range(10)]
        got = [ring.next() for _ in range(10)]
    for (x0, y0), (x1, y1) in zip(want, got):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    with make(2) as first:
        for _ in range(5):
            first.next()
        state = first.state_dict()
    with make(2) as resumed:
        resumed.load_state_dict(state)
        for x0, y0 in want[5:]:
            x1, y1 = resumed.next()
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # Other seeds draw other windows; the same seed again the same.
    again = BatchLoader(path, 6, 24, seed=7, grad_accum_steps=2, doc_eot=EOT, loss_masks=True, prefetch=0)
    other = BatchLoader(path, 6, 24, seed=8, grad_accum_steps=2, doc_eot=EOT, loss_masks=True, prefetch=0)
    assert again.windows_at(3, 1) == make(0).windows_at(3, 1) != other.windows_at(3, 1)


def test_cross_entropy_averages_over_trained_targets(tmp_path: Path) -> None:
    tokens, mask = chat_data(np.random.default_rng(5), 300)
    path = save(tmp_path, "train", tokens, mask)
    loader = BatchLoader(path, 8, 32, seed=1, doc_eot=EOT, loss_masks=True, prefetch=0)
    x, y = loader.batch_at(0)
    vocab = 1000
    logits = torch.randn(8, 32, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
    logp = torch.log_softmax(logits, dim=-1)
    terms = [
        -logp[r, j, int(y[r, j])].item() for r in range(8) for j in range(32) if int(y[r, j]) != _sampler.IGNORE_INDEX
    ]
    trained = sum(int(mask[s + 1 : s + 33].sum()) for _, s in loader.windows_at(0))
    assert len(terms) == trained > 0
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert _sampler.IGNORE_INDEX == IGNORE


def test_a_mask_of_another_length_names_both_files(tmp_path: Path) -> None:
    tokens = np.arange(100, dtype=np.uint16)
    path = save(tmp_path, "train", tokens, np.ones(99, np.uint8))
    with pytest.raises(DataError) as e:
        BatchLoader(path, 2, 8, loss_masks=True, prefetch=0)
    assert str(e.value) == (
        f"{mask_path(path)} holds 99 mask values but {path} holds 100 tokens; prepare the folder again"
    )
    # The list must have one entry per file.
    f = _sampler.TokenFile.open(str(path))
    with pytest.raises(DataError, match="masks holds 2 entries but the sampler reads 1 token files"):
        _sampler.Sampler([(1.0, [f])], 8, masks=[None, None])


def test_a_missing_mask_names_both_files_and_arrays_have_none(tmp_path: Path) -> None:
    path = save(tmp_path, "train", np.arange(100, dtype=np.uint16), None)
    with pytest.raises(DataError) as e:
        BatchLoader(path, 2, 8, loss_masks=True, prefetch=0)
    assert str(path) in str(e.value) and str(tmp_path / "train_mask.npy") in str(e.value)
    assert "missing" in str(e.value)
    with pytest.raises(DataError, match=r"array\[0\]: loss_masks=True"):
        BatchLoader(np.arange(100, dtype=np.uint16), 2, 8, loss_masks=True, prefetch=0)
    # Without loss masks, nothing is said about masks at all.
    assert not BatchLoader(path, 2, 8, prefetch=0).masked


def test_folders_and_globs_skip_masks_and_plain_loading_ignores_them(tmp_path: Path) -> None:
    a_tokens, a_mask = chat_data(np.random.default_rng(6), 50)
    b_tokens, b_mask = chat_data(np.random.default_rng(7), 60)
    a = save(tmp_path / "d", "a", a_tokens, a_mask)
    b = save(tmp_path / "d", "b", b_tokens, b_mask)
    assert mask_path(a) == tmp_path / "d" / "a_mask.npy" and mask_path("x/train.bin") == Path("x/train_mask.npy")
    for source in (tmp_path / "d", str(tmp_path / "d" / "*.npy")):
        plain = BatchLoader(source, 2, 8, prefetch=0)  # the masks beside are no concern of it
        assert plain.paths == [str(a), str(b)] and not plain.masked
        assert plain.describe()["loss_mask"] is False
        masked = BatchLoader(source, 2, 8, loss_masks=True, prefetch=0)
        assert masked.paths == [str(a), str(b)] and masked.masked
    only_masks = tmp_path / "m"
    only_masks.mkdir()
    np.save(only_masks / "train_mask.npy", a_mask)
    with pytest.raises(DataError, match="holds no .npy token files"):
        BatchLoader(only_masks, 2, 8, prefetch=0)


def test_mask_files_are_checked_when_opened_and_gathered(tmp_path: Path) -> None:
    tokens = np.arange(100, dtype=np.uint16)
    token_path = save(tmp_path, "train", tokens, None)
    # A token file is no mask, and a mask no token file.
    with pytest.raises(DataError, match=r"train\.npy: has dtype '<u2'; it must be a uint8 \.npy loss mask"):
        _sampler.TokenFile.open_mask(str(token_path))
    raw = tmp_path / "raw_mask.bin"
    raw.write_bytes(bytes(100))
    with pytest.raises(DataError, match=r"raw_mask\.bin: is not a \.npy file; it must be a uint8 \.npy loss mask"):
        _sampler.TokenFile.open_mask(str(raw))
    np.save(tmp_path / "train_mask.npy", np.ones(100, np.uint8))
    with pytest.raises(DataError, match="dtype '|u1'"):
        _sampler.TokenFile.open(str(tmp_path / "train_mask.npy"))
    m = _sampler.TokenFile.open_mask(str(tmp_path / "train_mask.npy"))
    assert (m.dtype, len(m), m.mmapped) == ("uint8", 100, True)
    # A value other than 0 or 1 refuses the batch that reads it.
    values = np.ones(100, np.uint8)
    values[50] = 2
    np.save(tmp_path / "train_mask.npy", values)
    sampler = _sampler.Sampler(
        [(1.0, [_sampler.TokenFile.open(str(token_path))])],
        8,
        masks=[_sampler.TokenFile.open_mask(str(tmp_path / "train_mask.npy"))],
    )
    x, y = np.zeros((91, 8), np.int64), np.zeros((91, 8), np.int64)
    with pytest.raises(DataError, match=r"train_mask\.npy: holds mask value 2 at position 50"):
        for step in range(100):
            sampler.fill(x, y, 0, 0, step, 0)
    # A mask buffer of another shape or dtype.
    sampler = _sampler.Sampler([(1.0, [_sampler.TokenFile.open(str(token_path))])], 8)
    for bad in (np.zeros((91, 7), np.uint8), np.zeros((91, 8), np.int64), np.zeros((91, 8), np.uint8)[:, ::-1]):
        with pytest.raises(DataError, match="mask must be a writable, C-contiguous uint8 array"):
            sampler.fill(x, y, 0, mask=bad)
    ones = np.zeros((91, 8), np.uint8)
    sampler.fill(x, y, 0, mask=ones)
    assert (ones == 1).all() and not sampler.masked
