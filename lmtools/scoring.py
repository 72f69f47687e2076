"""`lmtools eval`: loss, perplexity and bits per byte of a model on whole files.

A file is one token sequence: a `.npy` token file as is; text (.txt, .jsonl, .parquet,
gzipped too) as the token file `prepare` would write from it, read into documents as the
checkpoint's training data was (its `data_reading`, or the flags) and encoded with the
checkpoint's tokenizer, each document followed by the end-of-text id. A text file thus scores
exactly as that token file does (its first token is context, not scored), and its bits per byte
count bytes as prepare's `bytes_per_token` does. Sequences longer than the context are scored
in sliding windows: the first window scores all its targets; each next window moves `stride`
tokens and scores only the `stride` targets not yet scored, so every token is scored exactly
once, with at least `context_length - stride` tokens of left context (stride = context:
disjoint windows).

A file is streamed: read (and encoded) a batch at a time, its windows scored as their tokens
arrive, so that memory does not grow with the file (a block of tokens and a batch of windows
are held, never the file's ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmtools.config.train_config import TrainConfig
from lmtools.data.corpus import (
    Piece,
    ReadOptions,
    SourceReader,
    piece_batches,
    resolve_sources,
    safe_cut,
    utf8_len,
)
from lmtools.data.loader import load_dataset
from lmtools.data.prepare import read_meta
from lmtools.data.tokenizer import Encoder
from lmtools.errors import ConfigError, DataError
from lmtools.runtime.distributed import DistInfo
from lmtools.training.validation import validation_loader, validation_loss


@dataclass
class FileScore:
    """What one file scored: summed negative log-likelihood (nats) over `scored` tokens."""

    path: str
    kind: str  # "text" or "tokens"
    tokens: int
    scored: int
    nll: float
    bytes_per_token: float | None = None  # bytes of text per scored token, when known
    note: str | None = None  # why bits per byte is missing, or how the windows were chosen
    seconds: float | None = None  # wall-clock time spent reading and scoring the file
    documents: int | None = None  # of a text file, as prepare counts them

    @property
    def tokens_per_second(self) -> float | None:
        return self.scored / self.seconds if self.seconds else None

    @property
    def loss(self) -> float:
        return self.nll / self.scored

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float | None:
        return self.loss / math.log(2) / self.bytes_per_token if self.bytes_per_token else None

    def to_dict(self) -> dict:
        derived = {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}
        return asdict(self) | derived | {"tokens_per_second": self.tokens_per_second}


def check_stride(stride: int, context_length: int) -> None:
    if not 1 <= stride <= context_length:
        raise ConfigError(f"--stride must be between 1 and the context length {context_length}, got {stride}")


def window_plan(n: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of `n` tokens: (start, end, scored). The window's inputs are
    ids[start:end], its targets ids[start+1:end+1], and its last `scored` targets count."""
    check_stride(stride, context_length)
    plan, done = [], 0  # targets 1..done are scored
    while done < n - 1:
        end = min(done + (context_length if done == 0 else stride), n - 1)
        start = max(0, end - context_length)
        plan.append((start, end, end - done))
        done = end
    return plan


def stream_windows(
    chunks: Iterable[np.ndarray], context_length: int, stride: int
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """`window_plan`'s windows of the sequence that `chunks` make up, as its tokens arrive:
    (start, end, scored, ids[start:end + 1]). Only the tokens a later window can still need
    are kept, at most one chunk and a context's worth."""
    check_stride(stride, context_length)
    buf, base = np.zeros(0, dtype=np.int64), 0  # buf holds ids[base:n]
    n = done = 0  # tokens seen; targets 1..done are scored
    for chunk in chunks:
        buf = np.concatenate((buf, np.asarray(chunk, dtype=np.int64)))
        n += len(chunk)
        while (end := done + (context_length if done == 0 else stride)) <= n - 1:
            start = max(0, end - context_length)
            yield start, end, end - done, buf[start - base : end + 1 - base]
            done = end
        keep = max(0, done - context_length)  # no later window starts before done + 1 - context
        buf, base = buf[keep - base :], keep
    if done < n - 1:  # the last window ends at the last token
        start = max(0, n - 1 - context_length)
        yield start, n - 1, n - 1 - done, buf[start - base :]


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    windows: Iterable[tuple[int, int, int, np.ndarray]],
    batch_size: int,
    on_batch: Callable[[int, int], None] = lambda end, scored: None,
) -> tuple[float, int]:
    """(summed nll in nats, tokens scored) of `stream_windows`' windows under `model`;
    `on_batch(end, scored)` after each batch: the last target scored, and the count so far."""
    device = next(model.parameters()).device
    total, scored = 0.0, 0
    for group in _batches(windows, batch_size):
        rows = torch.from_numpy(np.stack([row for *_, row in group]))
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        nll = F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none")
        keep = torch.zeros_like(nll, dtype=torch.bool)
        for i, (_, _, k, _) in enumerate(group):
            keep[i, -k:] = True
        total += float(nll[keep].double().sum())
        scored += int(keep.sum())
        on_batch(group[-1][1], scored)
    return total, scored


def score_sequence(
    model: torch.nn.Module,
    ids: np.ndarray,
    stride: int,
    batch_size: int,
) -> tuple[float, int]:
    """(summed nll in nats, tokens scored) of `ids` (an array or a memory map, read a chunk at
    a time) under `model`, in sliding windows."""
    chunks = (ids[i : i + TOKEN_CHUNK] for i in range(0, len(ids), TOKEN_CHUNK))
    windows = stream_windows(chunks, model.config.context_length, stride)
    return score_windows(model, windows, batch_size)


def _batches(plan: Iterable, batch_size: int) -> Iterator[list]:
    """Runs of at most `batch_size` consecutive windows of equal length (one tensor each)."""
    group: list = []
    for w in plan:
        if group and (len(group) == batch_size or w[1] - w[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


# A text file is read as prepare reads it (`SourceReader`: documents in pieces of at most
# `ReadOptions.piece_chars`, cut where the tokens do not change) and encoded by prepare's
# `Encoder`, a batch of pieces at a time: memory stays bounded whatever the file's size. One
# tokenizer call holds about 200 bytes per token it makes (2 MB of text, byte tokens: 430 MB),
# so prepare's pieces are cut finer still, where a cut leaves the ids as they are.
TEXT_BATCH = 1 << 16  # characters encoded per call, where the text has places to cut
TOKEN_CHUNK = 1 << 18  # ids of a .npy file read at a time (larger chunks leave the allocator holding more)


def check_input(path: Path) -> None:
    """A DataError unless `path` is a regular file (a folder or a missing path is named as such)."""
    if path.is_file():
        return
    if path.is_dir():
        inside = next((path / n for n in ("val.npy", "train.npy") if (path / n).is_file()), None)
        hint = f"to score its tokens, give {inside}" if inside else "give a text file or a .npy token file in it"
        raise DataError(f"{path}: is a folder, not a file; {hint}")
    if path.exists():
        raise DataError(f"{path}: not a regular file; give a text file or a .npy token file")
    raise DataError(f"{path}: no such file")


def is_token_file(path: Path) -> bool:
    return path.suffix.lower() == ".npy"


def text_kind(path: Path) -> str:
    """How prepare reads a file that is not a token file: "text", "jsonl" or "parquet"."""
    return resolve_sources([path])[0].kind


# ---------------------------------------------------------------------------------------------
# How text is read: as the checkpoint's training data was, unless the flags say otherwise
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextReading:
    """The options text files are read with, where they come from ("checkpoint": the training
    data's record; "defaults": prepare's, the checkpoint recording none; "flags"), and the
    training data's record itself (None when the checkpoint has none)."""

    options: ReadOptions
    origin: str
    training: dict | None

    def describe(self, kinds: Iterable[str] = ("text",)) -> str:
        how = describe_options(self.options, kinds)
        if self.origin == "checkpoint":
            return f"read as the training data was: {how}"
        if self.origin == "defaults":
            return f"read as prepare reads by default (the checkpoint does not record how its data was read): {how}"
        if self.training is None:
            return f"read as the flags say: {how}"
        trained = describe_options(ReadOptions.from_record(self.training), kinds)
        return f"read as the flags say: {how}; the training data was read with {trained}"

    def to_dict(self, kinds: Iterable[str] = ("text",)) -> dict:
        return self.options.to_record() | {
            "origin": self.origin,
            "training_data": self.training,
            "description": self.describe(kinds),
        }


def describe_options(options: ReadOptions, kinds: Iterable[str] = ("text",)) -> str:
    """What the options do to files of these kinds, in a few words."""
    words = []
    for kind in sorted(set(kinds), key=("text", "jsonl", "parquet").index):
        if kind == "jsonl":
            words.append(f"jsonl field {options.text_field!r}")
        elif kind == "parquet":
            words.append(f"parquet column {options.text_column!r}")
        elif options.separator_line:
            words.append(f"separator line {options.separator_line!r}")
        elif options.separator:
            words.append(f"separator {options.separator!r}")
        else:
            words.append("one document per text file")
    return ", ".join(words)


def text_reading(record: Any, overrides: dict[str, Any]) -> TextReading:
    """The reading of a checkpoint's `data_reading` record (`ReadOptions.to_record()`, or None)
    with `overrides` (ReadOptions fields; a separator given replaces a separator line and the
    other way round). An override equal to the record leaves the origin the checkpoint."""
    training = dict(record) if isinstance(record, dict) else None
    base = ReadOptions.from_record(training)
    changes = dict(overrides)
    if "separator" in changes:
        changes.setdefault("separator_line", None)
    if "separator_line" in changes:
        changes.setdefault("separator", None)
    options = dataclasses.replace(base, **changes)
    if options.to_record() != base.to_record():
        return TextReading(options, "flags", training)
    return TextReading(options, "checkpoint" if training is not None else "defaults", training)


# ---------------------------------------------------------------------------------------------
# A file's token ids
# ---------------------------------------------------------------------------------------------


class FileTokens:
    """A file's token ids as a stream of checked chunks. Text (.txt, .jsonl, .parquet, gzipped
    too) becomes the ids prepare would write from it with `reading`'s options: each document's
    ids followed by the end-of-text id, so that it scores as the token file prepare makes from
    it. A .npy token file is read a chunk at a time (read, not memory-mapped: its pages would
    count as the process's memory). Counts what has been read as it goes."""

    def __init__(
        self,
        path: Path,
        tokenizer_for_text: Callable[[], Any],
        vocab_size: int,
        reading: ReadOptions | None = None,
    ):
        check_input(path)
        self.path, self.vocab_size = path, vocab_size
        self.kind = "tokens" if is_token_file(path) else "text"
        self.file_bytes = path.stat().st_size
        self.bytes_read = 0  # of the file, so far
        self.tokens = 0  # ids handed out so far
        self.text_bytes = 0  # UTF-8 bytes of the documents' text encoded so far
        self.note: str | None = None
        self._reader: SourceReader | None = None
        if self.kind == "tokens":
            self._array = load_dataset(path)  # the header checked; no page read
            meta = read_meta(path)
            self._bpt = float(meta["bytes_per_token"]) if meta and meta.get("bytes_per_token") else None
            self.note = None if self._bpt else "no meta.json with bytes_per_token beside it: no bits per byte"
        else:
            self._source = resolve_sources([path])[0]
            self.reading = reading or ReadOptions()
            self._tokenizer = tokenizer_for_text()

    @property
    def documents(self) -> int | None:
        """Documents of a text file read so far (None for token files)."""
        return self._reader.documents if self._reader is not None else (0 if self.kind == "text" else None)

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes of text per token: from meta.json for token files; for text, once read, as
        prepare counts it (the documents' UTF-8 bytes over their ids, end-of-text ids aside)."""
        if self.kind == "tokens":
            return self._bpt
        ids = self.tokens - (self.documents or 0)
        return self.text_bytes / ids if ids > 0 and self.text_bytes else None

    def chunks(self) -> Iterator[np.ndarray]:
        """The ids, a chunk at a time, each checked against the vocabulary; a file of fewer than
        two ids is a DataError once it is read (nothing to score)."""
        if self.kind == "tokens" and len(self._array) < 2:
            raise DataError(f"{self.path}: holds {len(self._array)} tokens; nothing to score")
        for chunk in self._npy_chunks() if self.kind == "tokens" else self._text_chunks():
            check_ids(self.path, chunk, self.vocab_size, offset=self.tokens)
            self.tokens += len(chunk)
            yield chunk
        if self.tokens < 2:
            raise DataError(f"{self.path}: holds no text; nothing to score")

    def _npy_chunks(self) -> Iterator[np.ndarray]:
        array = self._array
        with open(self.path, "rb") as fh:
            fh.seek(array.offset)
            for _ in range(0, len(array), TOKEN_CHUNK):
                chunk = np.fromfile(fh, dtype=array.dtype, count=TOKEN_CHUNK)
                self.bytes_read = fh.tell()
                yield chunk

    def bytes_done(self, end: int) -> int:
        """How far into the file scoring has come when the target at position `end` is scored
        (for text, the bytes read so far: a batch ahead at most)."""
        if self.kind == "tokens":
            return min(self.file_bytes, self._array.offset + (end + 1) * self._array.itemsize)
        return self.bytes_read

    def _text_chunks(self) -> Iterator[np.ndarray]:
        yield from document_id_chunks(self._reader_for_text(), self._tokenizer, self._encoded)

    def _reader_for_text(self) -> SourceReader:
        self._reader = SourceReader(self._source, self.reading, self._read, hash_file=False)
        return self._reader

    def _read(self, n: int) -> None:
        self.bytes_read += n

    def _encoded(self, n: int) -> None:
        self.text_bytes += n


def document_id_chunks(
    reader: SourceReader, tok, encoded: Callable[[int], None] = lambda n: None
) -> Iterator[np.ndarray]:
    """The ids prepare writes for the documents `reader` yields (`encode_unit`'s layout: each
    document's ids, then the end-of-text id), a batch of pieces at a time, encoded by prepare's
    `Encoder` through `tokenizers` (the reference its fast path is checked against);
    `encoded(n)`: n more UTF-8 bytes of text handed to the encoder. The next batch is encoded
    while the caller scores the last one."""
    encoder = Encoder(tok, "tokenizer.json", threads=1, fast=False)
    try:
        pending = None
        for batch in piece_batches(finer_pieces(reader, TEXT_BATCH), TEXT_BATCH):
            encoded(sum(utf8_len(p.text) for p in batch))
            waiting, pending = pending, encoder.submit_documents(batch)
            if waiting is not None:
                yield waiting()
        if pending is not None:
            yield pending()
    finally:
        encoder.close()


def finer_pieces(pieces: Iterable[Piece], limit: int) -> Iterator[Piece]:
    """The pieces cut into pieces of about `limit` characters where `safe_cut` finds a place
    (the ids do not change there); a stretch without one stays whole, as prepare encodes it."""
    for piece in pieces:
        text, start = piece.text, 0
        while len(text) - start > limit and (cut := _next_cut(text, start, limit)) is not None:
            yield Piece(text[start:cut], False)
            start = cut
        yield Piece(text[start:] if start else text, piece.doc_end)


def _next_cut(text: str, start: int, limit: int) -> int | None:
    """The first safe cut `safe_cut` finds after `start` in windows of `limit`, 2 * `limit`, ...
    characters (each searched in its upper half), or None before the text's last window."""
    width = limit
    while len(text) - start > width:
        cut = safe_cut(text[start : start + width], width)
        if cut < width:
            return start + cut
        width *= 2
    return None


def read_file(
    path: Path, tokenizer_for_text: Callable[[], object], vocab_size: int, reading: ReadOptions | None = None
) -> tuple[np.ndarray, str, float | None, str | None]:
    """A whole file's token ids, its kind, its bytes per token and a note when bytes are unknown
    (for what needs them all at once; scoring streams them instead)."""
    source = FileTokens(path, tokenizer_for_text, vocab_size, reading)
    ids = np.concatenate([np.zeros(0, dtype=np.int64), *source.chunks()])
    return ids, source.kind, source.bytes_per_token, source.note


def check_ids(path: Path, ids: np.ndarray, vocab_size: int, offset: int = 0) -> None:
    """A DataError naming the first id outside 0..vocab_size-1 (`ids` are the file's from
    position `offset` on): negative ones first, as the largest id says nothing about them."""
    if len(ids) == 0:
        return
    if int(ids.min()) < 0:
        at = int(np.flatnonzero(ids < 0)[0])
        raise DataError(
            f"{path}: token {offset + at} is {int(ids[at])}, a negative id (ids run from 0 to {vocab_size - 1}); "
            f"the file is damaged or not a token file: write it again with lmtools prepare"
        )
    hi = int(ids.max())
    if hi >= vocab_size:
        raise DataError(
            f"{path}: holds token id {hi}, beyond the model's vocabulary of {vocab_size}; "
            f"it was tokenized for another model"
        )


def score_file(
    model,
    path: Path,
    tokenizer_for_text,
    *,
    stride: int,
    batch_size: int,
    on_progress: Callable[[int, int, int], None] = lambda done, total, scored: None,
    reading: ReadOptions | None = None,
) -> FileScore:
    """Score one whole file, streamed (text read with `reading`'s options, by default
    prepare's); `on_progress(bytes done, file bytes, tokens scored)` after each batch of windows."""
    t0 = time.perf_counter()
    source = FileTokens(path, tokenizer_for_text, model.config.vocab_size, reading)
    windows = stream_windows(source.chunks(), model.config.context_length, stride)
    nll, scored = score_windows(
        model, windows, batch_size, lambda end, n: on_progress(source.bytes_done(end), source.file_bytes, n)
    )
    seconds = time.perf_counter() - t0
    return FileScore(
        str(path),
        source.kind,
        source.tokens,
        scored,
        nll,
        source.bytes_per_token,
        source.note,
        seconds,
        source.documents,
    )


def score_validation_windows(model, path: Path, train_cfg: dict, device: torch.device) -> FileScore:
    """The loss on the windows a training run validates on (`validation_loader`'s batches
    0..eval_iters-1), scored by training's own `validation_loss`."""
    cfg = TrainConfig.from_dict(train_cfg)
    if not is_token_file(path):
        raise ConfigError(f"--val_windows scores token files (.npy) as training validates them; {path} is text")
    source = FileTokens(path, lambda: None, model.config.vocab_size)
    for _ in source.chunks():  # every id checked against the model's vocabulary, a chunk at a time
        pass
    bpt, note = source.bytes_per_token, source.note
    loader = validation_loader(cfg, str(path), device)
    try:
        loss = validation_loss(model, loader, cfg.eval_iters, contextlib.nullcontext(), DistInfo())
    finally:
        loader.close()
    model.eval()
    scored = cfg.eval_iters * cfg.batch_size * cfg.context_length
    windows = f"training's {cfg.eval_iters} validation batches of {cfg.batch_size} (seed {cfg.seed + 1})"
    note = "; ".join(x for x in (windows, note) if x)
    return FileScore(str(path), "tokens", source.tokens, scored, loss * scored, bpt, note)
