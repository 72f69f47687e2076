"""`lmtools eval`: loss, perplexity and bits per byte of a model on whole files.

A file is one token sequence (text is encoded with the checkpoint's tokenizer, after an
end-of-text id, as a document follows one in training, so its first token is scored too; a
`.npy` token file is read as is). Sequences longer than the context are scored in sliding
windows: the first window scores all its targets; each next window moves `stride` tokens and
scores only the `stride` targets not yet scored, so every token is scored exactly once, with at
least `context_length - stride` tokens of left context (stride = context: disjoint windows).

A file is streamed: read (and encoded) a block at a time, its windows scored as their tokens
arrive, so that memory does not grow with the file (a block of tokens and a batch of windows
are held, never the file's ids).
"""

from __future__ import annotations

import contextlib
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
from lmtools.data.corpus import safe_cut
from lmtools.data.loader import load_dataset
from lmtools.data.prepare import read_meta
from lmtools.errors import ConfigError, DataError
from lmtools.layout import EOT
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


# A text file is read and tokenized in bounded pieces: the tokenizer's time and memory grow
# faster than the length of one pre-token (a 20 MB line without a space took over a minute and
# about 4 GB in one call), and a file need not fit in memory twice over.
TEXT_BLOCK = 1 << 18  # bytes read from a text file at a time (one tokenizer call holds many times its bytes)
TEXT_PIECE = 1 << 16  # characters per tokenizer input, cut where the tokens do not change
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


class FileTokens:
    """A file's token ids as a stream of checked chunks: a text file encoded a block at a time
    after a leading end-of-text id (as a document follows one in training), a .npy token file
    read a chunk at a time (read, not memory-mapped: its pages would count as the process's
    memory). Counts what has been read as it goes."""

    def __init__(self, path: Path, tokenizer_for_text: Callable[[], Any], vocab_size: int):
        check_input(path)
        self.path, self.vocab_size = path, vocab_size
        self.kind = "tokens" if path.suffix.lower() == ".npy" else "text"
        self.file_bytes = path.stat().st_size
        self.bytes_read = 0  # of the file, so far
        self.tokens = 0  # ids handed out so far
        self.text_bytes = 0  # UTF-8 bytes of the text encoded so far
        self.note: str | None = None
        if self.kind == "tokens":
            self._array = load_dataset(path)  # the header checked; no page read
            meta = read_meta(path)
            self._bpt = float(meta["bytes_per_token"]) if meta and meta.get("bytes_per_token") else None
            self.note = None if self._bpt else "no meta.json with bytes_per_token beside it: no bits per byte"
        else:
            self._tokenizer = tokenizer_for_text()

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes of text per scored token: from meta.json for token files; for text, once read."""
        if self.kind == "tokens":
            return self._bpt
        return self.text_bytes / (self.tokens - 1) if self.tokens > 1 else None

    def chunks(self) -> Iterator[np.ndarray]:
        """The ids, a chunk at a time, each checked against the vocabulary; a file of fewer than
        two ids is a DataError once it is read (nothing to score)."""
        if self.kind == "tokens" and len(self._array) < 2:
            raise DataError(f"{self.path}: holds {len(self._array)} tokens; nothing to score")
        for chunk in self._npy_chunks() if self.kind == "tokens" else self._text_chunks():
            if self.kind == "text" and self.tokens == 0 and len(chunk) == 1:
                break  # the leading end-of-text id alone: the file holds no text
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
        (for text, the bytes read so far: a block ahead at most)."""
        if self.kind == "tokens":
            return min(self.file_bytes, self._array.offset + (end + 1) * self._array.itemsize)
        return self.bytes_read

    def _text_chunks(self) -> Iterator[np.ndarray]:
        yield from text_id_chunks(self.path, self._tokenizer, self._read, self._encoded)

    def _read(self, n: int) -> None:
        self.bytes_read += n

    def _encoded(self, n: int) -> None:
        self.text_bytes += n


def read_file(
    path: Path, tokenizer_for_text: Callable[[], object], vocab_size: int
) -> tuple[np.ndarray, str, float | None, str | None]:
    """A whole file's token ids, its kind, its bytes per token and a note when bytes are unknown
    (for what needs them all at once; scoring streams them instead)."""
    source = FileTokens(path, tokenizer_for_text, vocab_size)
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


def read_text_ids(path: Path, tok) -> tuple[np.ndarray, int]:
    """A whole text file's ids after a leading end-of-text id, and its byte count."""
    sizes: list[int] = []
    ids = np.concatenate(list(text_id_chunks(path, tok, encoded=sizes.append)))
    return ids, sum(sizes)


def text_id_chunks(
    path: Path, tok, read: Callable[[int], None] = lambda n: None, encoded: Callable[[int], None] = lambda n: None
) -> Iterator[np.ndarray]:
    """A text file's ids after a leading end-of-text id, a block at a time; `read(n)`: n more
    bytes of the file read, `encoded(n)`: n more UTF-8 bytes of text encoded (newlines counted
    as Python's text mode reads them). The ids are those of the whole text encoded at once
    wherever a text is not a run of TEXT_PIECE / 2 characters without whitespace or
    end-of-text markers (there, only the tokens at the cut may differ)."""
    lead = [np.array([tok.token_to_id(EOT)], dtype=np.int64)]  # with the first block: read before it is checked
    for pieces in _piece_groups(_text_blocks(path, read), TEXT_PIECE):
        encodings = tok.encode_batch_fast(pieces, add_special_tokens=False)
        encoded(sum(len(piece.encode("utf-8")) for piece in pieces))
        yield np.concatenate(lead + [np.asarray(e.ids, dtype=np.int64) for e in encodings])
        lead = []
    yield from lead


def _text_blocks(path: Path, on_read: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """The file's text, TEXT_BLOCK bytes at a time, decoded as UTF-8 with universal newlines
    (as `Path.read_text` reads it); a byte that is not UTF-8 is a DataError naming its offset."""
    import codecs
    import io

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    newlines = io.IncrementalNewlineDecoder(None, translate=True)
    offset = 0  # bytes handed to the decoder so far
    with open(path, "rb") as fh:
        while True:
            block = fh.read(TEXT_BLOCK)
            on_read(len(block))
            held = len(decoder.getstate()[0])  # an incomplete character from the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: not UTF-8 text (byte {offset - held + exc.start}); token files must end in .npy"
                ) from None
            offset += len(block)
            yield newlines.decode(text, final=not block)
            if not block:
                return


def _piece_groups(blocks: Iterator[str], limit: int) -> Iterator[list[str]]:
    """The text as pieces of at most about `limit` characters, a block's worth per list."""
    buf = ""
    for text in blocks:
        buf += text
        group = []
        while len(buf) > limit:
            cut = _cut(buf, limit)
            group.append(buf[:cut])
            buf = buf[cut:]
        if group:
            yield group
    if buf:
        yield [buf]


def _cut(text: str, limit: int) -> int:
    """Where to cut `text` before `limit`: prepare's safe cut at whitespace (it keeps the tokens
    of a byte-level BPE). Without whitespace to cut at, the edge of an end-of-text marker is as
    exact, as the tokenizer splits markers off first; and a cut never splits a marker, nor the
    start of one that the next block completes."""
    cut = safe_cut(text, limit)
    if cut < limit:
        return cut
    for start in range(max(1, limit - len(EOT) + 1), limit):
        if EOT.startswith(text[start : start + len(EOT)]):
            return start
    last = text.rfind(EOT, 0, limit)
    return last + len(EOT) if last >= 0 else limit


def score_file(
    model,
    path: Path,
    tokenizer_for_text,
    *,
    stride: int,
    batch_size: int,
    on_progress: Callable[[int, int, int], None] = lambda done, total, scored: None,
) -> FileScore:
    """Score one whole file, streamed; `on_progress(bytes done, file bytes, tokens scored)`
    after each batch of windows."""
    t0 = time.perf_counter()
    source = FileTokens(path, tokenizer_for_text, model.config.vocab_size)
    windows = stream_windows(source.chunks(), model.config.context_length, stride)
    nll, scored = score_windows(
        model, windows, batch_size, lambda end, n: on_progress(source.bytes_done(end), source.file_bytes, n)
    )
    # Text: every token after the leading end-of-text id is scored.
    tokens = source.tokens - (source.kind == "text")
    seconds = time.perf_counter() - t0
    return FileScore(str(path), source.kind, tokens, scored, nll, source.bytes_per_token, source.note, seconds)


def score_validation_windows(model, path: Path, train_cfg: dict, device: torch.device) -> FileScore:
    """The loss on the windows a training run validates on (`validation_loader`'s batches
    0..eval_iters-1), scored by training's own `validation_loss`."""
    cfg = TrainConfig.from_dict(train_cfg)
    if path.suffix.lower() != ".npy":
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
