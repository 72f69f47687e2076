"""`lmtools eval`: loss, perplexity and bits per byte of a model on whole files.

A file is one token sequence (text is encoded with the checkpoint's tokenizer, after an
end-of-text id, as a document follows one in training, so its first token is scored too; a
`.npy` token file is read as is). Sequences longer than the context are scored in sliding
windows: the first window scores all its targets; each next window moves `stride` tokens and
scores only the `stride` targets not yet scored, so every token is scored exactly once, with at
least `context_length - stride` tokens of left context (stride = context: disjoint windows).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

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
        return asdict(self) | {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


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


@torch.no_grad()
def score_sequence(
    model: torch.nn.Module,
    ids: np.ndarray,
    stride: int,
    batch_size: int,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[float, int]:
    """(summed nll in nats, tokens scored) of `ids` under `model`, in sliding windows."""
    device = next(model.parameters()).device
    plan = window_plan(len(ids), model.config.context_length, stride)
    total, scored = 0.0, 0
    for group in _batches(plan, batch_size):
        rows = np.stack([np.asarray(ids[s : e + 1], dtype=np.int64) for s, e, _ in group])
        x = torch.from_numpy(rows[:, :-1]).to(device)
        y = torch.from_numpy(rows[:, 1:]).to(device)
        nll = F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none")
        keep = torch.zeros_like(nll, dtype=torch.bool)
        for row, (_, _, k) in enumerate(group):
            keep[row, -k:] = True
        total += float(nll[keep].double().sum())
        scored += int(keep.sum())
        advance(len(group))
    return total, scored


def _batches(plan: list, batch_size: int) -> Iterator[list]:
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
TEXT_BLOCK = 1 << 20  # bytes read from a text file at a time
TEXT_PIECE = 1 << 16  # characters per tokenizer input, cut where the tokens do not change


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


def read_file(
    path: Path, tokenizer_for_text: Callable[[], object], vocab_size: int
) -> tuple[np.ndarray, str, float | None, str | None]:
    """A file's token ids, its kind, its bytes per token and a note when bytes are unknown."""
    check_input(path)
    if path.suffix.lower() == ".npy":
        ids, bpt, note = _read_tokens(path)
        kind = "tokens"
    else:
        ids, n_bytes = read_text_ids(path, tokenizer_for_text())
        bpt, note, kind = (n_bytes / (len(ids) - 1) if len(ids) > 1 else None), None, "text"
    if len(ids) < 2:
        raise DataError(f"{path}: holds {'no text' if kind == 'text' else f'{len(ids)} tokens'}; nothing to score")
    check_ids(path, ids, vocab_size)
    return ids, kind, bpt, note


def _read_tokens(path: Path) -> tuple[np.ndarray, float | None, str | None]:
    """A .npy token file (memory-mapped) and its bytes per token from the meta.json beside it."""
    ids = load_dataset(path)
    meta = read_meta(path)
    bpt = float(meta["bytes_per_token"]) if meta and meta.get("bytes_per_token") else None
    return ids, bpt, None if bpt else "no meta.json with bytes_per_token beside it: no bits per byte"


def check_ids(path: Path, ids: np.ndarray, vocab_size: int) -> None:
    """A DataError naming the first id outside 0..vocab_size-1: negative ones first, as the
    largest id says nothing about them."""
    if int(ids.min()) < 0:
        at = int(np.flatnonzero(ids < 0)[0])
        raise DataError(
            f"{path}: token {at} is {int(ids[at])}, a negative id (ids run from 0 to {vocab_size - 1}); "
            f"the file is damaged or not a token file: write it again with lmtools prepare"
        )
    hi = int(ids.max())
    if hi >= vocab_size:
        raise DataError(
            f"{path}: holds token id {hi}, beyond the model's vocabulary of {vocab_size}; "
            f"it was tokenized for another model"
        )


def read_text_ids(path: Path, tok) -> tuple[np.ndarray, int]:
    """A text file's ids after a leading end-of-text id, and its byte count (newlines counted
    as Python's text mode reads them). Pieces are encoded a block at a time; the ids are those
    of the whole text encoded at once wherever a text is not a run of TEXT_PIECE / 2 characters
    without whitespace or end-of-text markers (there, only the tokens at the cut may differ)."""
    parts = [np.array([tok.token_to_id(EOT)], dtype=np.int64)]
    n_bytes = 0
    for pieces in _piece_groups(_text_blocks(path), TEXT_PIECE):
        for encoding in tok.encode_batch_fast(pieces, add_special_tokens=False):
            parts.append(np.asarray(encoding.ids, dtype=np.int64))
        n_bytes += sum(len(piece.encode("utf-8")) for piece in pieces)
    return np.concatenate(parts), n_bytes


def _text_blocks(path: Path) -> Iterator[str]:
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
    advance=lambda n: None,
    on_plan=lambda n: None,
) -> FileScore:
    """Score one whole file; `on_plan(windows)` is called once its window count is known."""
    ids, kind, bpt, note = read_file(path, tokenizer_for_text, model.config.vocab_size)
    on_plan(len(window_plan(len(ids), model.config.context_length, stride)))
    nll, scored = score_sequence(model, ids, stride, batch_size, advance)
    # Text: every token after the leading end-of-text id is scored.
    return FileScore(str(path), kind, len(ids) - (kind == "text"), scored, nll, bpt, note)


def score_validation_windows(model, path: Path, train_cfg: dict, device: torch.device) -> FileScore:
    """The loss on the windows a training run validates on (`validation_loader`'s batches
    0..eval_iters-1), scored by training's own `validation_loss`."""
    cfg = TrainConfig.from_dict(train_cfg)
    if path.suffix.lower() != ".npy":
        raise ConfigError(f"--val_windows scores token files (.npy) as training validates them; {path} is text")
    ids, _, bpt, note = read_file(path, lambda: None, model.config.vocab_size)
    loader = validation_loader(cfg, str(path), device)
    try:
        loss = validation_loss(model, loader, cfg.eval_iters, contextlib.nullcontext(), DistInfo())
    finally:
        loader.close()
    model.eval()
    scored = cfg.eval_iters * cfg.batch_size * cfg.context_length
    windows = f"training's {cfg.eval_iters} validation batches of {cfg.batch_size} (seed {cfg.seed + 1})"
    note = "; ".join(x for x in (windows, note) if x)
    return FileScore(str(path), "tokens", len(ids), scored, loss * scored, bpt, note)
