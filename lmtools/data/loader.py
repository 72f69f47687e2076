"""Token data: open token files and sample training windows from them.

The heavy lifting is in the Rust extension (`lmtools._sampler`): it memory-maps token files,
draws window starts from a counter-based generator (the windows of `(seed, rank, step, micro)`
are a pure function of those numbers and the data) and gathers them, widened to int64, straight
into the buffers handed to it, in parallel and without the GIL. This module is the typed
facade: argument checks with messages that name the fix, source specs and folders, devices,
and a prefetch ring that keeps the next batches ready while the model computes.
"""

from __future__ import annotations

import atexit
import glob
import math
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from lmtools import _sampler
from lmtools.data.dataset import KnownRange, parse_source_spec
from lmtools.data.fingerprint import SizeGuardedSampler
from lmtools.errors import ConfigError, DataError
from lmtools.layout import TOKEN_DTYPES_TEXT, token_dtype_name
from lmtools.runtime.device import resolve_device
from lmtools.runtime.fsutil import regular_file_problem

__all__ = ["BatchLoader", "get_batch", "load_dataset", "mask_path"]

# Corpus formats that `lmtools prepare` reads: passed where tokens belong, they get its command.
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".gz", ".py", ".html")
_U64 = (1 << 64) - 1
_STATE_VERSION = 1
# A token-id scan of a file larger than this says so on stderr first.
SCAN_NOTICE_BYTES = 256 << 20
# A loss mask lies beside its token file: X.npy -> X_mask.npy (see mask_path).
MASK_SUFFIX = "_mask.npy"

TokenSource = Union[str, "os.PathLike[str]", np.ndarray, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Files


def load_dataset(file_path: str | os.PathLike[str], mmap_mode: bool | str = True, dtype: Any = None) -> np.ndarray:
    """Opens a token file as a 1-D integer array.

    `.npy` files take their dtype from the header (which is checked: 1-D, C order,
    little-endian uint16/uint32/int32/int64); any other file is raw tokens as nanoGPT writes
    `.bin` files, and needs `dtype`. With `mmap_mode` (True, or a numpy mode such as "r" or
    "c") the result is a read-only `np.memmap`; with False the tokens are read into memory.
    """
    path = Path(file_path)
    problem = regular_file_problem(path)
    if problem == "is a folder":
        raise DataError(f"{path}: is a folder; pass one token file (BatchLoader takes folders)")
    if problem is not None:
        raise DataError(f"{path}: {problem}; pass a token file")
    if mmap_mode is True:
        mode: str | None = "r"
    elif mmap_mode in (False, None):
        mode = None
    elif mmap_mode in ("r", "c", "r+"):
        mode = str(mmap_mode)
    else:
        raise DataError(f"mmap_mode={mmap_mode!r} is not valid; use True, False, 'r', 'r+' or 'c'")
    want = token_dtype_name(dtype, path) if dtype is not None else None

    if path.suffix.lower() == ".npy":
        name, count, offset = _sampler.read_npy_header(str(path))
        if want is not None and want != name:
            raise DataError(f"{path}: holds {name} tokens but dtype={want} was given; drop the dtype argument")
    else:
        if want is None:
            refuse_text(path)
            raise DataError(
                f"{path}: is a raw token file; pass its dtype ({TOKEN_DTYPES_TEXT}), or save it with numpy.save as .npy"
            )
        # The Rust opener checks the size is whole tokens and that it is no .npy in disguise.
        count = len(_sampler.TokenFile.open(str(path), want))
        name, offset = want, 0

    np_dtype = np.dtype(name).newbyteorder("<")
    if count == 0:
        return np.zeros(0, dtype=np_dtype)
    if mode is not None:
        return np.memmap(path, dtype=np_dtype, mode=mode, offset=offset, shape=(count,))
    return np.fromfile(path, dtype=np_dtype, count=count, offset=offset)


def mask_path(token_path: str | os.PathLike[str]) -> Path:
    """Where the loss mask of a token file lies: beside it, `X.npy` -> `X_mask.npy`
    (`train.npy` -> `train_mask.npy`; a raw `X.bin` -> `X_mask.npy`)."""
    p = Path(token_path)
    return p.with_name(p.stem + MASK_SUFFIX)


def _is_mask_file(path: Path) -> bool:
    return path.name.endswith(MASK_SUFFIX)


# --------------------------------------------------------------------------------------------
# One batch at a time (the original specification's interface)


def get_batch(data: np.ndarray, batch_size: int, context_length: int, device: str | torch.device) -> Batch:
    """Samples `batch_size` windows from a 1-D integer array or memmap.

    Returns `(inputs, targets)`, int64 tensors of shape `(batch_size, context_length)` on
    `device`, with `targets` the inputs shifted by one token. Starts are uniform over
    `[0, len(data) - context_length - 1]`. The seed is drawn from torch's global generator, so
    `torch.manual_seed` makes the draws reproducible.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    context_length = _positive_int(context_length, "context_length")
    dev = resolve_device(device)
    token_file = _array_source(data, "data")
    sampler = _sampler.Sampler([(1.0, [token_file])], context_length)
    seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
    return _gather(sampler, batch_size, context_length, seed, 0, 0, 0, dev)


# --------------------------------------------------------------------------------------------
# The training loader


class BatchLoader:
    """Deterministic, resumable batches from one or many token sources.

    `sources` is a path, a folder (its `.npy` files, sorted, as shards), a glob, an array, or a
    list of these; a string may carry a mixture weight (`"web.npy:0.7"`), or `weights` gives
    one per entry. Without weights every window of every file is equally likely; with weights a
    row first picks an entry by weight, then a window inside it. Windows never straddle files.

    The batch of `(step, micro)` depends only on `(seed, rank, step, micro)` and the data:
    `batch_at` recomputes any of them, and `state_dict()` / `load_state_dict()` resume a run on
    exactly the batches it would have drawn. `next()` walks micro-batches, then steps.

    With `loss_masks` (chat data), every token file `X.npy` is read with its loss mask
    `X_mask.npy` beside it (see `mask_path`): targets whose mask is 0 come back as
    `IGNORE_INDEX` (-100, torch's default `ignore_index`, so `F.cross_entropy` averages over the
    trained targets only), and with `doc_eot` windows start at conversation starts (an
    end-of-text id whose mask is 0). Without it, mask files beside the token files are ignored.

    A background thread keeps `prefetch` batches ready (0: fill on demand). On CPU every batch
    is fresh memory that the loader never touches again; on CUDA batches are gathered into a
    ring of pinned host buffers and copied with `non_blocking=True`, and a slot is refilled only
    after its copy has finished.
    """

    def __init__(
        self,
        sources: TokenSource | Sequence[TokenSource],
        batch_size: int,
        context_length: int,
        device: str | torch.device = "cpu",
        *,
        seed: int = 0,
        rank: int = 0,
        grad_accum_steps: int = 1,
        weights: Sequence[float] | None = None,
        dtype: Any = None,
        prefetch: int = 2,
        num_threads: int | None = None,
        doc_eot: int | None = None,
        vocab_size: int | None = None,
        known_ranges: dict[str, KnownRange] | None = None,
        loss_masks: bool = False,
    ) -> None:
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.context_length = _positive_int(context_length, "context_length")
        self.grad_accum_steps = _positive_int(grad_accum_steps, "grad_accum_steps")
        self.rank = _non_negative_int(rank, "rank")
        self.seed = _int(seed, "seed")
        self.prefetch = _non_negative_int(prefetch, "prefetch")
        if num_threads is not None:
            num_threads = _positive_int(num_threads, "num_threads")
        if vocab_size is not None:
            vocab_size = _positive_int(vocab_size, "vocab_size")
        self.vocab_size = vocab_size
        self.device = resolve_device(device)

        if not isinstance(loss_masks, bool):
            raise ConfigError(f"loss_masks must be True or False; got {loss_masks!r}")
        groups, self._weights = _resolve_sources(sources, weights, dtype)
        masks = _open_masks([f for _, files in groups for f in files]) if loss_masks else None
        # doc_eot: windows start only at document starts (0 and after each end-of-text id), in
        # a masked file at conversation starts (an end-of-text id whose mask is 0).
        # The guard checks that no file it reads was truncated under its memory map (a bus error).
        # vocab_size: every gathered batch is checked to hold ids in 0..vocab_size only.
        # masks: the targets a mask does not train are gathered as IGNORE_INDEX.
        self._sampler = SizeGuardedSampler(
            _sampler.Sampler(groups, self.context_length, num_threads, doc_eot, vocab_size, masks)
        )
        # (Masked files without a conversation start are refused by the sampler itself; a file
        # of one conversation legitimately has one window.)
        if (
            doc_eot is not None
            and not loss_masks
            and self._sampler.num_windows == sum(len(files) for _, files in groups)
        ):
            raise DataError(
                f"no end-of-text id {doc_eot} in the training data: document-aligned windows would all "
                f"start at 0; prepare the data with document separators, or drop --doc_aligned"
            )
        self._files: list[_sampler.TokenFile] = list(self._sampler.files)
        self._file_weights = [w for w, (_, files) in zip(self._weights, groups) for _ in files]
        # Per file, its id range from meta.json when that describes it as it is (else None: scanned).
        self._known: list[tuple[int, int] | None] = [_known_range(f, known_ranges) for f in self._files]
        self._scanned: dict[int, tuple[int, int] | None] = {}

        self.step = 0
        self.micro = 0
        self._ring: _Prefetcher | None = None
        self._wait = 0.0
        self._closed = False

    # -- batches -------------------------------------------------------------------------

    def next(self) -> Batch:
        """The batch at the current (step, micro); then moves to the next micro-batch."""
        if self._closed:
            raise RuntimeError("BatchLoader is closed")
        key = (self.step, self.micro)
        t0 = time.perf_counter()
        if self.prefetch == 0:
            batch = self._make(*key)
        else:
            if self._ring is None:
                self._ring = self._start_ring(*key)
            got, batch = self._ring.get()
            # Only next() and load_state_dict() (which restarts the ring) move the position.
            assert got == key, f"prefetched batch {got} for position {key}"
        self._wait += time.perf_counter() - t0
        self.micro += 1
        if self.micro == self.grad_accum_steps:
            self.micro = 0
            self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def batch_at(self, step: int, micro: int = 0) -> Batch:
        """The batch of `(step, micro)`, computed afresh; the loader's position is unchanged."""
        step = _non_negative_int(step, "step")
        micro = _non_negative_int(micro, "micro")
        return self._make(step, micro)

    def windows_at(self, step: int, micro: int = 0) -> list[tuple[str, int]]:
        """Where the rows of `(step, micro)` come from: `(source name, start)` per row."""
        pairs = self._sampler.windows(self.batch_size, self._seed_u64, self.rank, step, micro)
        return [(self._files[f].name, start) for f, start in pairs]

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position and what it depends on, as plain ints and strings."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "micro": self.micro,
            "seed": self.seed,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "context_length": self.context_length,
            "grad_accum_steps": self.grad_accum_steps,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Moves to a saved position (and seed). The rank stays this process's own. An empty
        dict (a checkpoint saved without sampler state) leaves the loader where it is."""
        if not state:
            return
        try:
            step, micro, seed = int(state["step"]), int(state["micro"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"sampler state is missing or has a bad {e}; pass a BatchLoader.state_dict()") from None
        for key in ("batch_size", "context_length", "grad_accum_steps", "num_tokens"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(
                    f"sampler state has {key}={state[key]} but this loader has {getattr(self, key)}; "
                    "resume with the same data and batch settings"
                )
        if not 0 <= step < 2**63 or not 0 <= micro < self.grad_accum_steps:
            raise DataError(
                f"sampler state has step={step}, micro={micro}; they must be >= 0 and micro < grad_accum_steps"
            )
        self._stop_ring()  # its batches belong to the old position
        self.step, self.micro, self.seed = step, micro, seed

    # -- what is loaded ------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return int(self._sampler.num_tokens)

    @property
    def paths(self) -> list[str]:
        """The token files read (arrays have none)."""
        return [str(f.path) for f in self._files if f.path is not None]

    @property
    def masked(self) -> bool:
        """Whether the batches' targets carry loss masks (IGNORE_INDEX where not trained)."""
        return bool(self._sampler.masked)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length * self.grad_accum_steps

    def token_range(self) -> tuple[int, int]:
        """(min, max) token id over all sources: from meta.json where it records a file's range
        (train and val together, so a bound), else by a parallel scan of the file (remembered)."""
        ranges = [r for r in (self.file_token_range(i) for i in range(len(self._files))) if r is not None]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def file_token_range(self, index: int) -> tuple[int, int] | None:
        """(min, max) token id of one source (None when empty), from meta.json or a scan."""
        known = self._known[index]
        if known is not None:
            return known
        if index not in self._scanned:
            f = self._files[index]
            size = len(f) * np.dtype(f.dtype).itemsize
            if f.mmapped and size > SCAN_NOTICE_BYTES:
                print(f"scanning token ids of {f.name} ({size / 1e9:.1f} GB)", file=sys.stderr, flush=True)
            self._scanned[index] = f.token_range()
        return self._scanned[index]

    @property
    def ranges_from_meta(self) -> bool:
        """Whether every source's id range came from meta.json (no file was scanned)."""
        return all(k is not None for k in self._known)

    def describe(self) -> dict[str, Any]:
        """Plain data for a run's header: sources, sizes, dtypes, token range."""
        sources = []
        total_weight = sum(self._weights)
        for i, (f, w) in enumerate(zip(self._files, self._file_weights)):
            lo, hi = self.file_token_range(i) or (None, None)
            sources.append(
                {
                    "path": f.name,
                    "tokens": len(f),
                    "dtype": f.dtype,
                    "mmap": f.mmapped,
                    "weight": None if len(self._weights) == 1 else w / total_weight,
                    "min_token": lo,
                    "max_token": hi,
                    "range_from_meta": self._known[i] is not None,
                }
            )
        dtypes = sorted({f.dtype for f in self._files})
        lo, hi = self.token_range()
        return {
            "sources": sources,
            "num_files": len(self._files),
            "num_tokens": self.num_tokens,
            "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
            "mmap": all(f.mmapped for f in self._files),
            "min_token": lo,
            "max_token": hi,
            "range_from_meta": self.ranges_from_meta,
            "loss_mask": self.masked,
            "vocab_size": self.vocab_size,
            "batch_size": self.batch_size,
            "context_length": self.context_length,
            "grad_accum_steps": self.grad_accum_steps,
            "tokens_per_step": self.tokens_per_step,
            "seed": self.seed,
            "rank": self.rank,
            "device": str(self.device),
            "prefetch": self.prefetch,
        }

    @property
    def data_wait_seconds(self) -> float:
        """Seconds `next()` has spent waiting for data since creation or `reset_wait()`."""
        return self._wait

    def reset_wait(self) -> float:
        """Returns `data_wait_seconds` and starts counting again from zero."""
        waited, self._wait = self._wait, 0.0
        return waited

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the prefetch thread. Batches already returned stay valid."""
        self._stop_ring()
        self._closed = True

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()

    def __repr__(self) -> str:
        return (
            f"BatchLoader({len(self._files)} file(s), {self.num_tokens:,} tokens, batch_size={self.batch_size}, "
            f"context_length={self.context_length}, step={self.step}, micro={self.micro})"
        )

    # -- internals -----------------------------------------------------------------------

    @property
    def _seed_u64(self) -> int:
        return self.seed & _U64

    def _make(self, step: int, micro: int) -> Batch:
        return _gather(
            self._sampler, self.batch_size, self.context_length, self._seed_u64, self.rank, step, micro, self.device
        )

    def _start_ring(self, step: int, micro: int) -> _Prefetcher:
        sampler, b, t, seed, rank = self._sampler, self.batch_size, self.context_length, self._seed_u64, self.rank
        accum, device = self.grad_accum_steps, self.device
        # The thread gets what it needs and no reference to the loader, so dropping the
        # loader still runs __del__ and stops it.
        if device.type == "cuda":
            return _PinnedPrefetcher(sampler, b, t, seed, rank, accum, step, micro, self.prefetch, device)

        def produce(s: int, m: int) -> Batch:
            return _gather(sampler, b, t, seed, rank, s, m, device)

        return _Prefetcher(produce, accum, step, micro, self.prefetch)

    def _stop_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None


def _known_range(f: _sampler.TokenFile, known: dict[str, KnownRange] | None) -> tuple[int, int] | None:
    if not known or f.path is None or not len(f):
        return None
    record = known.get(os.path.abspath(str(f.path)))
    if record is None or not record.holds(f.path, len(f)):
        return None
    return record.lo, record.hi


# --------------------------------------------------------------------------------------------
# Prefetching


# Rings still running at exit are stopped before the interpreter finalizes, so no prefetch
# thread is inside the extension when the runtime goes away.
_LIVE_RINGS: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()


@atexit.register
def _close_live_rings() -> None:
    for ring in list(_LIVE_RINGS):
        ring.close()


class _Prefetcher:
    """A thread producing the batches of (step, micro), (step, micro + 1), ... in order."""

    def __init__(self, produce: Callable[[int, int], Any], accum: int, step: int, micro: int, depth: int) -> None:
        self._produce = produce
        self._accum = accum
        self._ready: queue.Queue[tuple[Any, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(step, micro), name="lmtools-prefetch", daemon=True)
        self._thread.start()
        _LIVE_RINGS.add(self)

    def _run(self, step: int, micro: int) -> None:
        while not self._stop.is_set():
            try:
                item: tuple[Any, Any] = ((step, micro), self._produce(step, micro))
            except BaseException as e:  # handed to the consumer, raised there
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._ready.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] is None:
                return
            micro += 1
            if micro == self._accum:
                micro, step = 0, step + 1

    def get(self) -> tuple[tuple[int, int], Batch]:
        while True:
            try:
                key, value = self._ready.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread stopped unexpectedly") from None
        if key is None:
            raise value
        return key, self._deliver(value)

    def _deliver(self, value: Any) -> Batch:
        return value

    def close(self) -> None:
        self._stop.set()
        while True:  # free a producer blocked on a full queue
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class _Stopped(Exception):
    """The prefetcher was closed while its thread waited."""


class _Slot:
    """A pinned host batch and the event marking the end of its last copy to the device."""

    def __init__(self, b: int, t: int) -> None:
        self.x = torch.empty((b, t), dtype=torch.int64, pin_memory=True)
        self.y = torch.empty((b, t), dtype=torch.int64, pin_memory=True)
        self.copied: torch.cuda.Event | None = None


# Steps the host may run ahead of the GPU before the pinned ring makes it wait.
IN_FLIGHT_SLOTS = 4


class _PinnedPrefetcher(_Prefetcher):
    """Fills a ring of pinned slots; the consumer copies a slot to the GPU asynchronously and
    the producer waits for that copy's event before filling the slot again."""

    def __init__(
        self,
        sampler: _sampler.Sampler,
        b: int,
        t: int,
        seed: int,
        rank: int,
        accum: int,
        step: int,
        micro: int,
        depth: int,
        device: torch.device,
    ) -> None:
        self._device = device
        self._free: queue.Queue[_Slot] = queue.Queue()
        # `depth` ready, one being filled, and IN_FLIGHT_SLOTS whose copies the GPU has not
        # reached yet: the host runs ahead of the GPU, and that must not read as data wait.
        for _ in range(depth + 1 + IN_FLIGHT_SLOTS):
            self._free.put(_Slot(b, t))

        def produce(s: int, m: int) -> _Slot:
            while True:  # every slot may be queued or in flight; wait, but hear close()
                try:
                    slot = self._free.get(timeout=0.05)
                    break
                except queue.Empty:
                    if self._stop.is_set():
                        raise _Stopped from None
            if slot.copied is not None:
                slot.copied.synchronize()
            sampler.fill(slot.x.numpy(), slot.y.numpy(), seed, rank, s, m)
            return slot

        super().__init__(produce, accum, step, micro, depth)

    def _deliver(self, slot: _Slot) -> Batch:
        x = slot.x.to(self._device, non_blocking=True)
        y = slot.y.to(self._device, non_blocking=True)
        slot.copied = torch.cuda.Event()
        slot.copied.record(torch.cuda.current_stream(self._device))
        self._free.put(slot)
        return x, y


# --------------------------------------------------------------------------------------------
# Helpers


def _gather(
    sampler: _sampler.Sampler, b: int, t: int, seed: int, rank: int, step: int, micro: int, device: torch.device
) -> Batch:
    pin = device.type == "cuda"
    x = torch.empty((b, t), dtype=torch.int64, pin_memory=pin)
    y = torch.empty((b, t), dtype=torch.int64, pin_memory=pin)
    sampler.fill(x.numpy(), y.numpy(), seed, rank, step, micro)
    if device.type == "cpu":
        return x, y
    # Fresh pinned memory per batch: the caching host allocator keeps it alive until the copy
    # is done, so non_blocking is safe here.
    return x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _positive_int(value: Any, name: str) -> int:
    n = _int(value, name)
    if n <= 0:
        raise ConfigError(f"{name} must be a positive integer; got {n}")
    return n


def _non_negative_int(value: Any, name: str) -> int:
    n = _int(value, name)
    if n < 0:
        raise ConfigError(f"{name} must be >= 0; got {n}")
    return n


def _array_source(data: Any, name: str) -> _sampler.TokenFile:
    """A TokenFile over an in-memory array or memmap, without copying when possible."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise DataError(f"{name}: token data must live on the CPU; pass data.cpu()")
        data = data.numpy()
    if not isinstance(data, np.ndarray):
        raise DataError(f"{name}: token data must be a 1-D integer numpy array or memmap; got {type(data).__name__}")
    if data.ndim != 1:
        raise DataError(f"{name}: token data must be 1-D; got shape {data.shape}; pass data.reshape(-1)")
    if data.dtype.kind not in "iu":
        raise DataError(
            f"{name}: token data must hold integers; got dtype {data.dtype}; convert with data.astype(np.int64)"
        )
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    return _sampler.TokenFile.from_buffer(data, name)


def refuse_text(path: Path) -> None:
    """Text given where tokens belong (a corpus file by its suffix, or any file but .npy/.bin
    whose start is UTF-8 without NUL bytes): an error that gives the command to tokenize it."""
    suffix = path.suffix.lower()
    if suffix in (".npy", ".bin") or not path.is_file():
        return
    is_text = suffix in _TEXT_SUFFIXES
    if not is_text:
        with open(path, "rb") as f:
            head = f.read(4096)
        try:
            head.decode("utf-8")
            is_text = bool(head) and b"\0" not in head
        except UnicodeDecodeError as exc:
            is_text = b"\0" not in head and exc.start >= len(head) - 4  # a character cut at the end
    if is_text:
        import shlex

        raise DataError(
            f"{path} is text, not token data; tokenize it first: lmtools prepare {shlex.quote(str(path))} --out data, "
            f"then train with --train_data data"
        )


def _expand_path(path: str, dtype: Any) -> list[Path]:
    """A file, a folder (its .npy files, else its .bin files) or a glob, as sorted files; loss
    masks (`*_mask.npy`) are no token files, and folders and globs leave them out."""
    if any(c in path for c in "*?["):
        matched = sorted(Path(p) for p in glob.glob(path) if Path(p).is_file())
        files = [f for f in matched if not _is_mask_file(f)]
        if not files:
            only_masks = " but loss masks (*_mask.npy)" if matched else ""
            raise DataError(f"{path}: the pattern matches no files{only_masks}; check it")
        return files
    p = Path(path)
    if p.is_dir():
        # Loss masks (X_mask.npy, uint8) lie beside chat data's token files; they are no shards.
        files = sorted(f for f in p.glob("*.npy") if not _is_mask_file(f))
        if not files and dtype is not None:
            files = sorted(p.glob("*.bin"))
        if not files:
            raise DataError(f"{p}: the folder holds no .npy token files; run `lmtools prepare` or pass the files")
        return files
    problem = regular_file_problem(p)
    if problem is not None:
        raise DataError(f"{p}: {problem}; {'check the path' if problem == 'file not found' else 'pass a token file'}")
    return [p]


def _open_masks(files: Sequence[_sampler.TokenFile]) -> list[_sampler.TokenFile | None]:
    """The loss mask of each token file (`mask_path`), in the order given."""
    masks: list[_sampler.TokenFile | None] = []
    for f in files:
        if f.path is None:
            raise DataError(
                f"{f.name}: loss_masks=True reads each token file's mask beside it (X.npy -> X_mask.npy), "
                "and an array has none; pass token files, or load without loss masks"
            )
        token = Path(f.path)
        mask = mask_path(token)
        problem = regular_file_problem(mask)
        if problem == "file not found":
            raise DataError(
                f"{token} has no loss mask: {mask} is missing; prepare the chat data again "
                "(lmtools prepare --chat writes it beside the token file), or train without loss masks"
            )
        if problem is not None:
            raise DataError(f"{mask} (the loss mask of {token}) {problem}; prepare the chat data again")
        masks.append(_sampler.TokenFile.open_mask(str(mask)))
    return masks


def _resolve_sources(
    sources: Any, weights: Sequence[float] | None, dtype: Any
) -> tuple[list[tuple[float, list[_sampler.TokenFile]]], list[float]]:
    """Turns the user's sources into sampler groups: one group of all files when unweighted,
    one group per entry when weighted."""
    entries = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if not entries:
        raise DataError("no token sources given; pass a token file, a folder or an array")
    want = token_dtype_name(dtype, "dtype") if dtype is not None else None

    entry_files: list[list[_sampler.TokenFile]] = []
    spec_weights: list[float | None] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (np.ndarray, torch.Tensor)):
            entry_files.append([_array_source(entry, f"array[{i}]")])
            spec_weights.append(None)
            continue
        if not isinstance(entry, (str, os.PathLike)):
            raise DataError(f"source {entry!r} is neither a path nor an array")
        path, w = parse_source_spec(os.fspath(entry)) if isinstance(entry, str) else (os.fspath(entry), None)
        files = []
        for f in _expand_path(path, want):
            if want is None:
                refuse_text(f)
            files.append(_sampler.TokenFile.open(str(f), want))
        entry_files.append(files)
        spec_weights.append(w)

    if weights is not None:
        if any(w is not None for w in spec_weights):
            raise DataError("weights are given both in 'path:weight' specs and in weights=; use one")
        try:
            ws = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise DataError(f"weights={weights!r} must be numbers, one per source") from None
        if len(ws) != len(entries):
            raise DataError(f"{len(ws)} weights for {len(entries)} sources; give one weight per source")
    elif all(w is None for w in spec_weights):
        ws = []
    elif any(w is None for w in spec_weights):
        raise DataError("some sources have a ':weight' and some do not; give every source a weight or none")
    else:
        ws = [float(w) for w in spec_weights if w is not None]
    for w in ws:
        if not (math.isfinite(w) and w > 0):
            raise DataError(f"mixture weight {w} is not a positive number; give each source a weight > 0")
    if ws and not math.isfinite(sum(ws)):
        top = max(ws)  # only the ratios matter; huge weights would sum to infinity
        ws = [w / top for w in ws]

    if not ws:
        return [(1.0, [f for files in entry_files for f in files])], [1.0]
    return list(zip(ws, entry_files)), ws
