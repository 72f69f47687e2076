"""lmtools.data.loader: opening token files, argument checks, errors, and the BatchLoader facade."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtools import _sampler
from lmtools.data.loader import BatchLoader, get_batch, load_dataset
from lmtools.errors import DataError, DeviceError

# --------------------------------------------------------------------------------------------
# Helpers


def write_npy_header(path: Path, descr: str, shape: tuple[int, ...], fortran: bool = False, data: bytes = b"") -> None:
    """A .npy file with a header written by hand, for layouts numpy.save will not produce."""
    dict_text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    header = dict_text.encode()
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header += b" " * pad + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)


@pytest.fixture
def tokens_npy(tmp_path: Path) -> Path:
    path = tmp_path / "train.npy"
    np.save(path, np.arange(1000, dtype=np.uint16))
    return path


# --------------------------------------------------------------------------------------------
# load_dataset


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64])
def test_load_npy_memmap_and_in_memory(tmp_path: Path, dtype: type) -> None:
    data = (np.arange(500) * 7).astype(dtype)
    path = tmp_path / "t.npy"
    np.save(path, data)
    mapped = load_dataset(path)
    assert isinstance(mapped, np.memmap)
    assert mapped.dtype == data.dtype and mapped.shape == (500,)
    np.testing.assert_array_equal(mapped, data)
    loaded = load_dataset(str(path), mmap_mode=False)
    assert not isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, data)


def test_load_raw_bin_needs_dtype(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    np.arange(301, dtype=np.uint16).tofile(path)  # as nanoGPT's prepare.py writes it
    with pytest.raises(DataError, match=r"train\.bin.*pass its dtype"):
        load_dataset(path)
    data = load_dataset(path, dtype=np.uint16)
    assert isinstance(data, np.memmap)
    np.testing.assert_array_equal(data, np.arange(301))
    np.testing.assert_array_equal(load_dataset(path, mmap_mode=False, dtype="uint16"), np.arange(301))
    with pytest.raises(DataError, match="not a token dtype"):
        load_dataset(path, dtype=np.float32)
    with pytest.raises(DataError, match="whole number"):
        load_dataset(path, dtype=np.uint32)  # 602 bytes are not whole uint32 tokens


def test_load_dtype_mismatch_and_missing(tokens_npy: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds uint16 tokens but dtype=int32"):
        load_dataset(tokens_npy, dtype=np.int32)
    np.testing.assert_array_equal(load_dataset(tokens_npy, dtype="uint16")[:3], [0, 1, 2])
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nope.npy")
    with pytest.raises(DataError, match="folder"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="mmap_mode"):
        load_dataset(tokens_npy, mmap_mode="w+")


def test_bad_npy_files_raise_clear_errors(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes | None, str]] = {}

    np.save(tmp_path / "float.npy", np.zeros(100, dtype=np.float32))
    cases["float.npy"] = (None, "floating-point")
    np.save(tmp_path / "2d.npy", np.zeros((10, 10), dtype=np.uint16))
    cases["2d.npy"] = (None, "2-D.*reshape")
    np.save(tmp_path / "big.npy", np.zeros(100, dtype=">u2"))
    cases["big.npy"] = (None, "big-endian")
    write_npy_header(tmp_path / "fortran.npy", "<u2", (10,), fortran=True, data=bytes(20))
    cases["fortran.npy"] = (None, "Fortran order")
    (tmp_path / "magic.npy").write_bytes(b"PK\x03\x04 this is a zip file" + bytes(100))
    cases["magic.npy"] = (None, "bad magic")
    np.save(tmp_path / "trunc.npy", np.arange(100, dtype=np.uint32))
    raw = (tmp_path / "trunc.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[:-10])
    cases["trunc.npy"] = (None, "truncated")
    (tmp_path / "header_cut.npy").write_bytes(raw[:30])
    cases["header_cut.npy"] = (None, "truncated")
    np.save(tmp_path / "int8.npy", np.zeros(100, dtype=np.int8))
    cases["int8.npy"] = (None, "uint16, uint32, int32 or int64")

    for name, (_, pattern) in cases.items():
        path = tmp_path / name
        for open_it in (
            lambda path=path: load_dataset(path),
            lambda path=path: BatchLoader(path, 2, 4),
            lambda path=path: _sampler.TokenFile.open(str(path)),
        ):
            with pytest.raises(DataError, match=pattern) as info:
                open_it()
            message = str(info.value)
            assert name in message and "\n" not in message


def test_files_too_short_for_the_context(tmp_path: Path) -> None:
    np.save(tmp_path / "short.npy", np.arange(8, dtype=np.uint16))
    with pytest.raises(DataError, match=r"short\.npy: holds 8 tokens .* 9 tokens"):
        BatchLoader(tmp_path / "short.npy", 2, 8)
    BatchLoader(tmp_path / "short.npy", 2, 7).close()  # exactly one window fits
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.uint16))
    assert len(load_dataset(tmp_path / "empty.npy")) == 0
    with pytest.raises(DataError, match="holds 0 tokens"):
        BatchLoader(tmp_path / "empty.npy", 2, 1)


# --------------------------------------------------------------------------------------------
# get_batch


def test_get_batch_shapes_dtypes_and_memmap(tokens_npy: Path) -> None:
    data = load_dataset(tokens_npy)
    x, y = get_batch(data, 4, 16, "cpu")
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint64, ">u2"])
def test_get_batch_accepts_any_integer_array(dtype: object) -> None:
    data = np.arange(100).astype(dtype)
    x, y = get_batch(data, 3, 5, "cpu")
    assert torch.equal(x + 1, y)


def test_get_batch_strided_and_tensor_data() -> None:
    data = np.arange(400, dtype=np.int64)[::2]  # a strided view: copied, still correct
    x, y = get_batch(data, 3, 5, "cpu")
    assert torch.equal(x + 2, y)
    x, y = get_batch(torch.arange(100), 3, 5, "cpu")
    assert torch.equal(x + 1, y)


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [
        ((np.arange(100), 0, 8, "cpu"), ValueError, "batch_size must be a positive integer"),
        ((np.arange(100), 4, -1, "cpu"), ValueError, "context_length must be a positive integer"),
        ((np.arange(100), 4.5, 8, "cpu"), ValueError, "batch_size must be an integer"),
        ((np.arange(100), 4, 100, "cpu"), DataError, "holds 100 tokens but a window needs"),
        ((np.arange(100.0), 4, 8, "cpu"), DataError, "must hold integers"),
        ((np.zeros((10, 10), dtype=np.int64), 4, 8, "cpu"), DataError, "must be 1-D"),
        (([1, 2, 3] * 10, 4, 8, "cpu"), DataError, "numpy array"),
        ((np.arange(100), 4, 8, "gpu7"), ValueError, "device"),
        ((np.arange(100), 4, 8, "tpu"), ValueError, "device"),
    ],
)
def test_get_batch_argument_errors(args: tuple, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        get_batch(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        get_batch(np.arange(100), 2, 4, "cuda")
    with pytest.raises(DeviceError):
        BatchLoader(np.arange(100), 2, 4, "cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches() -> None:
    data = np.arange(100_000, dtype=np.uint16)
    x, y = get_batch(data, 4, 8, "cuda")
    assert x.device.type == "cuda" and torch.equal(x + 1, y)
    with (
        BatchLoader(data, 16, 64, "cpu", seed=3, prefetch=0) as cpu,
        BatchLoader(data, 16, 64, "cuda", seed=3, prefetch=2) as gpu,
    ):
        for _ in range(20):  # more batches than pinned slots: slots are reused after their copy
            (cx, cy), (gx, gy) = cpu.next(), gpu.next()
            assert torch.equal(cx, gx.cpu()) and torch.equal(cy, gy.cpu())
        assert torch.equal(gpu.batch_at(2)[0].cpu(), cpu.batch_at(2)[0])


# --------------------------------------------------------------------------------------------
# BatchLoader


def test_loader_sources_folders_globs_and_bins(tmp_path: Path) -> None:
    (tmp_path / "npy").mkdir()
    for i in range(3):
        np.save(tmp_path / "npy" / f"part{i}.npy", np.arange(100, dtype=np.uint16) + 1000 * i)
    with BatchLoader(tmp_path / "npy", 2, 8) as a, BatchLoader(str(tmp_path / "npy" / "part*.npy"), 2, 8) as b:
        assert a.num_tokens == b.num_tokens == 300
        assert [s["path"] for s in a.describe()["sources"]] == [
            str(tmp_path / "npy" / f"part{i}.npy") for i in range(3)
        ]
    (tmp_path / "bin").mkdir()
    np.arange(100, dtype=np.uint32).tofile(tmp_path / "bin" / "a.bin")
    with pytest.raises(DataError, match="no .npy token files"):
        BatchLoader(tmp_path / "bin", 2, 8)
    with BatchLoader(tmp_path / "bin", 2, 8, dtype=np.uint32) as c:
        assert c.describe()["dtype"] == "uint32"
    with pytest.raises(DataError, match="matches no files"):
        BatchLoader(str(tmp_path / "*.parquet"), 2, 8)
    with pytest.raises(DataError, match="file not found"):
        BatchLoader(tmp_path / "missing.npy", 2, 8)


def test_loader_weight_errors(tokens_npy: Path) -> None:
    with pytest.raises(DataError, match="weight or none"):
        BatchLoader([f"{tokens_npy}:0.5", str(tokens_npy)], 2, 8)
    with pytest.raises(DataError, match="one weight per source"):
        BatchLoader([tokens_npy, tokens_npy], 2, 8, weights=[1.0])
    with pytest.raises(DataError, match="use one"):
        BatchLoader([f"{tokens_npy}:0.5", f"{tokens_npy}:0.5"], 2, 8, weights=[1, 1])
    with pytest.raises(DataError, match="positive"):
        BatchLoader([tokens_npy, tokens_npy], 2, 8, weights=[1.0, 0.0])
    with pytest.raises(DataError, match="no token sources"):
        BatchLoader([], 2, 8)
    with pytest.raises(DataError, match="must be numbers"):
        BatchLoader([tokens_npy, tokens_npy], 2, 8, weights=["a", 1])


def test_loader_argument_errors(tokens_npy: Path) -> None:
    for kwargs, pattern in [
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"rank": -1}, "rank"),
        ({"prefetch": -1}, "prefetch"),
        ({"num_threads": 0}, "num_threads"),
        ({"seed": "x"}, "seed"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            BatchLoader(tokens_npy, 2, 8, **kwargs)


def test_next_walks_micro_then_step_and_batch_at_is_pure(tokens_npy: Path) -> None:
    with BatchLoader(tokens_npy, 4, 8, seed=11, grad_accum_steps=3) as loader:
        positions = []
        for _ in range(7):
            positions.append((loader.step, loader.micro))
            x, _ = loader.next()
            assert torch.equal(x, loader.batch_at(*positions[-1])[0])
        assert positions == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
        state = loader.state_dict()
        loader.batch_at(100, 2)
        assert loader.state_dict() == state
        assert (state["step"], state["micro"]) == (2, 1)
        x, y = next(iter(loader))
        assert x.shape == (4, 8)


def test_cpu_batches_are_never_overwritten(tokens_npy: Path) -> None:
    with BatchLoader(tokens_npy, 8, 32, prefetch=3) as loader:
        first = loader.next()
        kept = (first[0].clone(), first[1].clone())
        for _ in range(10):
            loader.next()
        assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1])


def test_validation_loader_sees_the_same_windows_each_time(tokens_npy: Path) -> None:
    with BatchLoader(tokens_npy, 4, 8, seed=1234) as val:
        first = [val.batch_at(i) for i in range(3)]
        val.next()
        again = [val.batch_at(i) for i in range(3)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))


def test_load_state_dict_rejects_other_settings(tokens_npy: Path) -> None:
    with BatchLoader(tokens_npy, 4, 8, grad_accum_steps=2) as loader:
        state = loader.state_dict()
        with BatchLoader(tokens_npy, 4, 16, grad_accum_steps=2) as other:
            with pytest.raises(DataError, match="context_length=8 but this loader has 16"):
                other.load_state_dict(state)
        with pytest.raises(DataError, match="micro"):
            loader.load_state_dict({**state, "micro": 2})
        with pytest.raises(DataError, match="missing"):
            loader.load_state_dict({"step": 1})
        loader.next()
        loader.load_state_dict({})  # a checkpoint without sampler state: stay put
        assert (loader.step, loader.micro) == (0, 1)


def test_rank_is_kept_on_load(tokens_npy: Path) -> None:
    with BatchLoader(tokens_npy, 4, 8, rank=0) as r0, BatchLoader(tokens_npy, 4, 8, rank=1) as r1:
        r1.load_state_dict(r0.state_dict())
        assert r1.rank == 1
        assert not torch.equal(r0.next()[0], r1.next()[0])


def test_describe_token_range_and_wait(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.array([5, 9, 7, 3, 100, 8, 2, 6, 6, 6], dtype=np.uint16))
    arr = np.array([-4, 0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=np.int32)
    with BatchLoader([tmp_path / "a.npy", arr], 2, 4, seed=3, grad_accum_steps=2) as loader:
        assert loader.token_range() == (-4, 100)
        info = loader.describe()
        assert info["num_tokens"] == loader.num_tokens == 20
        assert info["dtype"] == "mixed" and info["mmap"] is False
        assert [(s["tokens"], s["dtype"], s["mmap"], s["min_token"], s["max_token"]) for s in info["sources"]] == [
            (10, "uint16", True, 2, 100),
            (10, "int32", False, -4, 8),
        ]
        assert info["tokens_per_step"] == 16
        assert loader.data_wait_seconds == 0.0
        loader.next()
        loader.next()
        waited = loader.data_wait_seconds
        assert waited > 0
        assert loader.reset_wait() == waited
        assert loader.data_wait_seconds == 0.0
        assert "2 file(s)" in repr(loader)


def test_close_and_errors_from_the_prefetch_thread(tokens_npy: Path) -> None:
    loader = BatchLoader(tokens_npy, 2, 8)
    loader.next()
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        loader.next()


def test_sampler_output_buffer_checks() -> None:
    token_file = _sampler.TokenFile.from_buffer(np.arange(100, dtype=np.uint16))
    sampler = _sampler.Sampler([(1.0, [token_file])], 8)
    good = np.empty((2, 8), dtype=np.int64)
    with pytest.raises(DataError, match="int64"):
        sampler.fill(np.empty((2, 8), dtype=np.int32), good, 0)
    with pytest.raises(DataError, match="shape"):
        sampler.fill(np.empty((2, 9), dtype=np.int64), good, 0)
    readonly = np.empty((2, 8), dtype=np.int64)
    readonly.flags.writeable = False
    with pytest.raises(DataError, match="writable"):
        sampler.fill(readonly, good, 0)
    with pytest.raises(DataError, match="same shape"):
        sampler.fill(np.empty((3, 8), dtype=np.int64), good, 0)
    with pytest.raises(DataError, match="share memory"):
        sampler.fill(good, good, 0)
    with pytest.raises(DataError, match="shape"):
        sampler.fill(np.empty((2, 16), dtype=np.int64)[:, ::2], good, 0)
    other = np.empty((2, 8), dtype=np.int64)
    sampler.fill(good, other, 0)
    assert (other == good + 1).all()


def test_from_buffer_byte_orders() -> None:
    # Explicit little-endian dtypes are native here; big-endian ones are refused, never misread.
    little = np.arange(10, dtype="<u2")
    assert _sampler.TokenFile.from_buffer(little).token_range() == (0, 9)
    assert _sampler.TokenFile.from_buffer(np.arange(10, dtype="<i8")).dtype == "int64"
    with pytest.raises(DataError, match="big-endian"):
        _sampler.TokenFile.from_buffer(np.arange(10, dtype=">u2"))
    with pytest.raises(DataError, match="1-D integer array"):
        _sampler.TokenFile.from_buffer(np.arange(10, dtype=np.float64))
    with pytest.raises(DataError, match="no buffer"):
        _sampler.TokenFile.from_buffer([1, 2, 3])
    with pytest.raises(DataError, match="not contiguous"):
        _sampler.TokenFile.from_buffer(np.arange(10, dtype=np.int32)[::2])


def test_in_memory_array_outlives_its_python_name() -> None:
    # Rust holds the buffer: the array stays valid after the caller drops it.
    loader = BatchLoader(np.arange(1000, dtype=np.int64) * 3, 4, 8, prefetch=0)
    x, y = loader.batch_at(0)
    assert torch.equal(y - x, torch.full_like(x, 3))


def test_large_batches_gathered_in_parallel_are_windows() -> None:
    # 64 x 4096 tokens is past the size from which the Rust gather uses its thread pool.
    data = np.arange(3_000_000, dtype=np.uint32)
    with BatchLoader([data, data[:10_000] + 5_000_000], 64, 4096, seed=9, weights=[3, 1], prefetch=0) as loader:
        x, y = loader.batch_at(5, 0)
        for row, (name, start) in enumerate(loader.windows_at(5, 0)):
            base = 0 if name == "array[0]" else 5_000_000
            assert x[row, 0].item() == base + start and y[row, -1].item() == base + start + 4096
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_pinned_ring_reuses_a_slot_only_after_its_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA ring's bookkeeping, run on the CPU: plain buffers stand in for pinned ones and
    # a fake event records when the producer waited for a copy before refilling its slot.
    import lmtools.data.loader as data_module

    class FakeEvent:
        log: list[str] = []

        def record(self, stream: object = None) -> None:
            FakeEvent.log.append("record")

        def synchronize(self) -> None:
            FakeEvent.log.append("sync")

    class HostBuffer:  # what the ring uses of a pinned tensor; .to() copies like a real H2D copy
        def __init__(self, b: int, t: int) -> None:
            self.tensor = torch.empty((b, t), dtype=torch.int64)

        def numpy(self) -> np.ndarray:
            return self.tensor.numpy()

        def to(self, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
            return self.tensor.clone()

    class PlainSlot(data_module._Slot):
        def __init__(self, b: int, t: int) -> None:
            self.x, self.y, self.copied = HostBuffer(b, t), HostBuffer(b, t), None

    monkeypatch.setattr(data_module, "_Slot", PlainSlot)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    data = np.arange(10_000, dtype=np.uint16)
    sampler = _sampler.Sampler([(1.0, [_sampler.TokenFile.from_buffer(data)])], 8)
    reference = BatchLoader(data, 4, 8, seed=5, grad_accum_steps=2, prefetch=0)
    ring = data_module._PinnedPrefetcher(sampler, 4, 8, 5, 0, 2, 3, 1, 2, torch.device("cpu"))
    try:
        for i in range(20):
            (step, micro), (x, y) = ring.get()
            assert (step, micro) == divmod(7 + i, 2)
            expected = reference.batch_at(step, micro)
            assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    finally:
        ring.close()
    # Every fill after the first `slots` ones waited for the copy of the slot it reused.
    slots = 2 + 1 + data_module.IN_FLIGHT_SLOTS
    assert FakeEvent.log.count("record") == 20
    assert FakeEvent.log.count("sync") >= 20 - slots


def test_own_thread_pool_draws_the_same_batches(tokens_npy: Path) -> None:
    big = np.arange(2_000_000, dtype=np.int32)
    with (
        BatchLoader(big, 64, 4096, seed=2, prefetch=0) as shared,
        BatchLoader(big, 64, 4096, seed=2, prefetch=0, num_threads=1) as own,
    ):
        assert torch.equal(shared.batch_at(3)[0], own.batch_at(3)[0])
    x, _ = get_batch(np.arange(100), 2, 4, torch.device("cpu"))
    assert x.shape == (2, 4)
