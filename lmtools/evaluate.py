"""`lmtools eval`: loss, perplexity and bits per byte of a model on whole files.

A file is one token sequence (text is encoded with the checkpoint's tokenizer, after an
end-of-text id, as a document follows one in training, so its first token is scored too; a
`.npy` token file is read as is). Sequences longer than the context are scored in sliding
windows: the first window scores all its targets; each next window moves `stride` tokens and
scores only the `stride` targets not yet scored, so every token is scored exactly once, with at
least `context_length - stride` tokens of left context (stride = context: disjoint windows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmtools.errors import ConfigError, DataError


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


def window_plan(n: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of `n` tokens: (start, end, scored). The window's inputs are
    ids[start:end], its targets ids[start+1:end+1], and its last `scored` targets count."""
    if not 1 <= stride <= context_length:
        raise ConfigError(f"--stride must be between 1 and the context length {context_length}, got {stride}")
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


def read_file(
    path: Path, tokenizer_for_text: Callable[[], object], vocab_size: int
) -> tuple[np.ndarray, str, float | None, str | None]:
    """A file's token ids, its kind, its bytes per token and a note when bytes are unknown."""
    from lmtools.data import load_dataset
    from lmtools.layout import EOT
    from lmtools.prepare import read_meta

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        ids = load_dataset(path)
        meta = read_meta(path)
        bpt = float(meta["bytes_per_token"]) if meta and meta.get("bytes_per_token") else None
        note = None if bpt else "no meta.json with bytes_per_token beside it: no bits per byte"
        kind = "tokens"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); token files must end in .npy") from None
        tok = tokenizer_for_text()
        ids = np.array([tok.token_to_id(EOT), *tok.encode(text, add_special_tokens=False).ids], dtype=np.int64)
        n_bytes = len(text.encode("utf-8"))
        bpt, note, kind = (n_bytes / (len(ids) - 1) if len(ids) > 1 else None), None, "text"
    if len(ids) < 2:
        raise DataError(f"{path}: holds {'no text' if kind == 'text' else f'{len(ids)} tokens'}; nothing to score")
    hi = int(ids.max())
    if hi >= vocab_size or int(ids.min()) < 0:
        raise DataError(
            f"{path}: holds token id {hi}, beyond the model's vocabulary of {vocab_size}; "
            f"it was tokenized for another model"
        )
    return ids, kind, bpt, note


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
    0..eval_iters-1), scored by training's own `evaluate`."""
    import contextlib

    from lmtools.config import TrainConfig
    from lmtools.distributed import DistInfo
    from lmtools.train import evaluate, validation_loader

    cfg = TrainConfig.from_dict(train_cfg)
    if path.suffix.lower() != ".npy":
        raise ConfigError(f"--val_windows scores token files (.npy) as training validates them; {path} is text")
    ids, _, bpt, note = read_file(path, lambda: None, model.config.vocab_size)
    loader = validation_loader(cfg, str(path), device)
    try:
        loss = evaluate(model, loader, cfg.eval_iters, contextlib.nullcontext(), DistInfo())
    finally:
        loader.close()
    model.eval()
    scored = cfg.eval_iters * cfg.batch_size * cfg.context_length
    windows = f"training's {cfg.eval_iters} validation batches of {cfg.batch_size} (seed {cfg.seed + 1})"
    note = "; ".join(x for x in (windows, note) if x)
    return FileScore(str(path), "tokens", len(ids), scored, loss * scored, bpt, note)
