"""Text generation with a KV cache: temperature, top-k and top-p sampling, streamed token by token."""

from __future__ import annotations

import codecs
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lmtools.checkpoint import model_from_payload, read_checkpoint
from lmtools.errors import ConfigError
from lmtools.model import KVCache, TransformerLM


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[TransformerLM, dict]:
    """The model of a checkpoint, in eval mode on `device`, and the checkpoint's contents."""
    payload = read_checkpoint(checkpoint)
    return model_from_payload(payload, checkpoint).to(device).eval(), payload


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask all but the top-k logits and the smallest set whose probability reaches top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int = 0) -> None:
    """A ConfigError naming the first sampling option out of range (NaN included)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be zero (greedy) or a positive number, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ConfigError(f"--top_k must be a positive integer (the most likely tokens kept), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {top_p}")
    if not 0 <= seed < 2**64:  # what torch's generators take
        raise ConfigError(f"--seed must be an integer from 0 to 2**64 - 1, got {seed}")


@torch.no_grad()
def generate_ids(
    model: TransformerLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops after `max_new_tokens` or at `eot_id`.

    temperature 0 is greedy decoding. When the context fills up, the cache is rebuilt from the
    most recent half context, so generation can run past the context length.
    """
    check_sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    ctx = model.config.context_length
    tokens = list(prompt_ids) or ([eot_id] if eot_id is not None else [0])
    tokens = tokens[-ctx:]
    cache = KVCache(model.config.num_layers)
    logits = model(torch.tensor([tokens], device=device), cache)[0, -1]
    for _ in range(max_new_tokens):
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            probs = filter_logits(scaled_logits(logits, temperature), top_k, top_p).softmax(-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if eot_id is not None and next_id == eot_id:
            return
        yield next_id
        tokens.append(next_id)
        if cache.length >= ctx:
            tokens = tokens[-(ctx // 2) :]
            cache = KVCache(model.config.num_layers)
            logits = model(torch.tensor([tokens], device=device), cache)[0, -1]
        else:
            logits = model(torch.tensor([[next_id]], device=device), cache)[0, -1]


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature` as float32, or, where a tiny temperature overflows that (1e-40: the
    top logits become inf, their probabilities NaN), the logits less their maximum over it in
    float64: the top token at 0, the others far below (sampling is then greedy, as it should be)."""
    scaled = logits.float() / temperature
    if bool(torch.isfinite(scaled.max())):
        return scaled
    shifted = logits.double()
    return (shifted - shifted.max()) / temperature


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """The text of `ids` piece by piece as they come, joining to the decode of all of them.

    A byte-level BPE token can end inside a multi-byte UTF-8 character: each token's bytes go
    through an incremental UTF-8 decoder, which holds an incomplete character back until its
    last byte comes. A replacement character (U+FFFD) stands only for bytes that are invalid,
    or for an incomplete character at the very end. Other tokenizers decode by text."""
    token_bytes = byte_level_bytes(tokenizer)
    if token_bytes is None:
        yield from _stream_decoded(tokenizer, ids)
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        if text := decoder.decode(token_bytes(token)):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def byte_level_bytes(tokenizer) -> Callable[[int], bytes] | None:
    """id -> the bytes that id stands for, for a tokenizer whose decoder is byte-level (None for
    others). As `tokenizers`' ByteLevel decoder reads a token: each symbol is one byte, and a
    token with a character outside that alphabet (an added token) stands for its UTF-8; an id
    the tokenizer does not have stands for nothing, as in its decode."""
    from tokenizers import decoders

    if not isinstance(getattr(tokenizer, "decoder", None), decoders.ByteLevel):
        return None
    from lmtools.data.tokenizer import unicode_to_bytes

    table = unicode_to_bytes()

    @functools.lru_cache(maxsize=1 << 16)
    def token_bytes(token_id: int) -> bytes:
        token = tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        try:
            return bytes(table[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    return token_bytes


def _stream_decoded(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Decode incrementally by text, holding back text while it ends in a replacement character.

    Each decode sees only the ids of the last piece yielded (context for decoders that are not
    plain concatenation) and those held back since: the time and memory per token stay the same
    however long the text grows (a huge --max_new_tokens), and the pieces join to the decode of
    all the ids."""
    window: list[int] = []  # the ids of the last piece yielded, then the ids held back
    shown = 0  # how many ids of `window` that piece holds
    for token in ids:
        window.append(token)
        before = tokenizer.decode(window[:shown], skip_special_tokens=False) if shown else ""
        text = tokenizer.decode(window, skip_special_tokens=False)
        if text.endswith("\ufffd") or len(text) <= len(before):
            continue
        yield text[len(before) :]
        window = window[shown:]
        shown = len(window)
    before = tokenizer.decode(window[:shown], skip_special_tokens=False) if shown else ""
    text = tokenizer.decode(window, skip_special_tokens=False)
    if len(text) > len(before):
        yield text[len(before) :]


# Control characters a terminal acts on (C0 but newline and tab, DEL, C1: ESC starts the
# sequences that move the cursor, recolour or retitle the window, and a carriage return
# overwrites the line) -> the escape Python writes for them: \r, \x1b, \x7f, \x9b.
_VISIBLE = {c: repr(chr(c))[1:-1] for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}


def visible(text: str) -> str:
    """`text` with the control characters other than newline and tab written as escapes."""
    return text.translate(_VISIBLE)
