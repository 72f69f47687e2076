"""Tokenizers for `prepare`: train a byte-level BPE, load one, and encode fast.

Every tokenizer is a Hugging Face `tokenizers.Tokenizer`, which is what gets saved as
`tokenizer.json` and what decodes a prepared folder. Encoding a corpus goes through
`tiktoken` when the tokenizer is a plain GPT-2-style byte-level BPE: tiktoken's encoder is
about 3x faster than `tokenizers`' `encode_batch`, and a byte-level BPE converts to it exactly
(ranks in merge order). Anything else (a normalizer, another pre-tokenizer, BPE dropout...)
is encoded by `tokenizers` itself.

The end-of-text id only ever comes from a document boundary: text that still spells
`<|endoftext|>` once the corpus reader has split it into documents (a jsonl or parquet text, or
a text file split at another separator) is encoded as ordinary text.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtools.errors import ConfigError, DataError
from lmtools.layout import EOT, TOKENIZER_FILE

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import numpy as np
    from tokenizers import Tokenizer

# GPT-2's pre-tokenizer pattern, as tiktoken spells it; the same one `tokenizers`' ByteLevel
# pre-tokenizer uses with use_regex=True.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

MIN_VOCAB = 257  # 256 bytes + <|endoftext|>


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used in vocab files)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """str.translate table: byte-level symbols -> chr(byte); anything else -> unencodable."""
    table = {c: "\U0010ffff" for c in range(256)}
    table.update({ord(c): chr(b) for c, b in unicode_to_bytes().items()})
    return table


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Building, training and loading
# ---------------------------------------------------------------------------------------------


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], eot_id: int) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(vocab)
    vocab[EOT] = eot_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


def bytes_tokenizer() -> Tokenizer:
    """256 byte symbols (id = byte value) and <|endoftext|> = 256."""
    b2u = bytes_to_unicode()
    return _byte_level({b2u[b]: b for b in range(256)}, [], 256)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"--vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB} ids (256 bytes + {EOT})"
        )
    if vocab_size > 1 << 31:
        raise ConfigError(f"--vocab_size {vocab_size} is too large")


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on an iterator of text batches.

    The result is laid out like GPT-2's: ids 0-255 are the bytes (in byte order), then one id
    per merge in merge order, then <|endoftext|> last. That makes tiktoken ranks equal ids.
    The vocabulary is smaller than `vocab_size` when the corpus runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batches, trainer)
    merges = _merges(json.loads(tok.to_str())["model"])

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return _byte_level(vocab, merges, len(vocab))


def _merges(model: dict) -> list[tuple[str, str]]:
    """A BPE model's merges as pairs (tokenizers writes "a b" strings or [a, b] lists)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def load_tokenizer(spec: str | os.PathLike) -> tuple[Tokenizer, str]:
    """Load `bytes`, a tokenizer.json, a vocab.json (+ merges.txt beside it), or a folder.

    Returns the tokenizer (with <|endoftext|> added as a special token when it lacks one) and
    its kind: "bytes", "tokenizer.json" or "gpt2" (vocab.json + merges.txt).
    """
    from tokenizers import AddedToken, Tokenizer

    if os.fspath(spec) == "bytes":
        return bytes_tokenizer(), "bytes"
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        elif (path / "vocab.json").is_file():
            path = path / "vocab.json"
        else:
            raise DataError(f"{spec}: the folder holds neither tokenizer.json nor vocab.json")
    if not path.is_file():
        raise DataError(
            f"--tokenizer {spec}: no such file; give a tokenizer.json, a vocab.json beside "
            "merges.txt, a folder holding them, or `bytes`"
        )
    if path.name.endswith("vocab.json"):
        merges_txt = path.with_name("merges.txt")
        if not merges_txt.is_file():
            raise DataError(f"{path}: merges.txt must sit beside vocab.json")
        tok, kind = _from_vocab_merges(path, merges_txt), "gpt2"
    else:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for bad files
            raise DataError(f"{path}: not a tokenizers JSON file ({exc})") from None
        kind = "tokenizer.json"
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    elif EOT not in {t.content for t in tok.get_added_tokens_decoder().values() if t.special}:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok, kind


def _from_vocab_merges(vocab_json: Path, merges_txt: Path) -> Tokenizer:
    try:
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        lines = merges_txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{vocab_json}: cannot read vocab.json/merges.txt ({exc})") from None
    ids = list(vocab.values()) if isinstance(vocab, dict) else None
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids) or len(set(ids)) < len(ids):
        raise DataError(f"{vocab_json}: not a vocabulary (a JSON object of token -> unique id)")
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or parts[0] + parts[1] not in vocab:
            raise DataError(f"{merges_txt}:{n}: not a merge of two tokens in vocab.json")
        merges.append((parts[0], parts[1]))
    u2b = unicode_to_bytes()
    if sum(1 for t in vocab if t in u2b) < 256:
        raise DataError(f"{vocab_json}: not a byte-level vocabulary (needs all 256 byte symbols)")
    eot_id = vocab.get(EOT, max(vocab.values()) + 1)
    return _byte_level({t: i for t, i in vocab.items() if t != EOT}, merges, eot_id)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """Encodes text to token ids (uint32 numpy arrays), in parallel with the GIL released.

    `engine` says what does the work: "tiktoken", "tokenizers" or "bytes".
    """

    tokenizer: Tokenizer
    kind: str
    threads: int = field(default_factory=default_threads)
    engine: str = "tokenizers"
    _tiktoken: Any = None
    _rank_to_id: Any = None  # numpy lookup, or None when ranks are ids
    _eot_rank: int = -1
    _pool: ThreadPoolExecutor | None = None
    fast: bool = True  # False: no tiktoken (for a process that only needs the ids' facts)

    def __post_init__(self) -> None:
        if self.kind == "bytes":
            self.engine = "bytes"
            return
        if not self.fast:
            return
        converted = to_tiktoken(self.tokenizer)
        if converted is not None:
            self._tiktoken, self._rank_to_id = converted
            self._eot_rank = self._tiktoken.eot_token
            self.engine = "tiktoken"

    @property
    def eot_id(self) -> int:
        return self.tokenizer.token_to_id(EOT)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids need not be contiguous in a loaded tokenizer)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1

    def line_ends(self) -> np.ndarray:
        """A boolean per id: does the token's text end with a newline (a clean place to cut)."""
        import numpy as np

        n = self.vocab_size
        if self.engine == "bytes":
            table = np.zeros(n, dtype=bool)
            table[ord("\n")] = True
            return table
        texts = self.tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        return np.fromiter((t.endswith("\n") for t in texts), dtype=bool, count=n)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def use_tokenizers(self) -> None:
        """Give up the fast path (it disagreed with `tokenizers` on a sample)."""
        self.engine = "tokenizers"
        self._tiktoken = self._rank_to_id = None

    def check_fast_path(self, sample: list[str]) -> str:
        """Compare tiktoken with `tokenizers` on `sample`; give up tiktoken on a mismatch.
        Returns the engine that encodes from now on."""
        import numpy as np

        if self.engine == "tiktoken" and sample:
            fast, reference = self.encode_batch(sample), self.encode_reference(sample)
            if not all(np.array_equal(a, b) for a, b in zip(fast, reference)):
                self.use_tokenizers()
        return self.engine

    # -- documents: what prepare writes -------------------------------------------------------

    def submit_documents(self, pieces: list) -> Callable[[], np.ndarray]:
        """Start encoding a batch of `Piece`s; returns a callable that waits for the result.

        The result is one flat array: each piece's ids, and the end-of-text id after each
        piece that ends a document. The caller reads the next batch meanwhile: tiktoken and
        `tokenizers` release the GIL, so the encoding threads use the other cores.
        """
        import numpy as np

        if self.engine == "bytes":
            out = self._documents_bytes(pieces)
            return lambda: out
        pool = self._executor()
        if self.engine == "tiktoken":
            # Several chunks per thread: they balance better, and a chunk that needs the slow
            # path (below) stays small.
            chunks = _balanced_chunks(pieces, 4 * self.threads, lambda p: len(p.text))
            futures = [pool.submit(self._documents_tiktoken, c) for c in chunks]
        else:
            futures = [pool.submit(self._documents_tokenizers, pieces)]

        def wait() -> np.ndarray:
            parts = [f.result() for f in futures]
            return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

        return wait

    def _documents_tiktoken(self, pieces: list) -> np.ndarray:
        """One tiktoken call for many documents: joined with <|endoftext|> spelled out and
        that spelling allowed as the special token. tiktoken encodes the text between special
        tokens exactly as `encode_ordinary` would, so this equals encoding each document on its
        own, without a call (and an array) per document. Pieces of one document are joined
        back as they were; they were cut where the cut does not change the tokens. When the
        text itself spells <|endoftext|>, the chunk is encoded piece by piece instead.
        """
        import numpy as np

        parts, ends = [], 0
        for p in pieces:
            parts.append(p.text)
            if p.doc_end:
                parts.append(EOT)
                ends += 1
        joined = "".join(parts)
        enc = self._tiktoken
        if joined.count(EOT) == ends:
            ranks = enc.encode_to_numpy(joined, allowed_special=_EOT_SET, disallowed_special=())
        else:
            eot = np.array([self._eot_rank], dtype=np.uint32)
            arrays = []
            for p in pieces:
                arrays.append(enc.encode_to_numpy(p.text, disallowed_special=()))
                if p.doc_end:
                    arrays.append(eot)
            ranks = np.concatenate(arrays)
        return ranks if self._rank_to_id is None else self._rank_to_id[ranks]

    def _documents_tokenizers(self, pieces: list) -> np.ndarray:
        return _with_eot(self._encode_tokenizers([p.text for p in pieces]), pieces, self.eot_id)

    def _documents_bytes(self, pieces: list) -> np.ndarray:
        return _with_eot(self._encode_bytes([p.text for p in pieces]), pieces, self.eot_id)

    # -- plain texts: ordinary encoding, one array per text ----------------------------------

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.engine == "bytes":
            return self._encode_bytes(texts)
        if self.engine == "tokenizers":
            return self._encode_tokenizers(texts)
        chunks = _balanced_chunks(texts, self.threads, len)
        return [a for f in [self._executor().submit(self._encode_tiktoken, c) for c in chunks] for a in f.result()]

    def encode_reference(self, texts: list[str]) -> list[np.ndarray]:
        """The same texts through `tokenizers` itself, to check the fast path against."""
        return self._encode_tokenizers(texts)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lmtools-encode")
        return self._pool

    @staticmethod
    def _encode_bytes(texts: list[str]) -> list[np.ndarray]:
        import numpy as np

        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]

    def _encode_tiktoken(self, texts: list[str]) -> list[np.ndarray]:
        # encode_to_numpy with nothing allowed or disallowed is encode_ordinary, returning a
        # buffer instead of a Python list.
        encode = self._tiktoken.encode_to_numpy
        out = [encode(t, disallowed_special=()) for t in texts]
        if self._rank_to_id is not None:
            out = [self._rank_to_id[a] for a in out]
        return out

    def _encode_tokenizers(self, texts: list[str]) -> list[np.ndarray]:
        import numpy as np

        tok = self.tokenizer
        previous = tok.encode_special_tokens
        tok.encode_special_tokens = True  # "<|endoftext|>" in the text is ordinary text
        try:
            encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            tok.encode_special_tokens = previous
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


_EOT_SET = frozenset([EOT])


def _with_eot(arrays: list[np.ndarray], pieces: list, eot_id: int) -> np.ndarray:
    import numpy as np

    eot = np.array([eot_id], dtype=np.uint32)
    out = []
    for a, p in zip(arrays, pieces):
        out.append(a)
        if p.doc_end:
            out.append(eot)
    return np.concatenate(out) if out else np.zeros(0, np.uint32)


def _balanced_chunks(items: list, n: int, size: Callable[[Any], int]) -> list[list]:
    """Split into at most n contiguous runs of about equal total size."""
    target = sum(size(x) for x in items) / max(1, n)
    chunks, current, total = [], [], 0
    for x in items:
        current.append(x)
        total += size(x)
        if total >= target and len(chunks) < n - 1:
            chunks.append(current)
            current, total = [], 0
    if current:
        chunks.append(current)
    return chunks


def to_tiktoken(tok: Tokenizer):
    """(tiktoken.Encoding, rank -> id lookup or None) for a plain byte-level BPE, else None.

    Ranks: the 256 single bytes first, then one rank per merge in merge order. tiktoken merges
    the adjacent pair whose concatenation has the lowest rank, `tokenizers` the pair whose
    merge comes first; these agree when each token is made by exactly one merge and when every
    token encodes to itself (tiktoken looks whole pieces up before merging). Both are checked
    here; `prepare` also compares the two encoders on a sample of the corpus.
    """
    tiktoken = _tiktoken_module()
    if tiktoken is None:
        return None
    import numpy as np

    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if not _plain_byte_level(spec, model):
        return None
    ranked = _byte_level_ranks(model)
    if ranked is None:
        return None
    ranks, ids, merged = ranked
    if not model.get("ignore_merges") and not _encode_to_themselves(tok, merged):
        return None
    ids.append(tok.token_to_id(EOT))
    encoding = tiktoken.Encoding(
        "lmtools-bpe",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: len(ranks)},
    )
    lookup = np.asarray(ids, dtype=np.uint32)
    if np.array_equal(lookup, np.arange(len(ids), dtype=np.uint32)):
        lookup = None
    return encoding, lookup


def _tiktoken_module():
    """tiktoken, when it is installed and new enough (0.8: encode_to_numpy), else None."""
    try:
        import tiktoken
    except ImportError:
        return None
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):  # tiktoken < 0.8
        return None
    return tiktoken


def _byte_level_ranks(model: dict) -> tuple[dict[bytes, int], list[int], list[str]] | None:
    """(tiktoken rank of each token's bytes, token id of each rank, merged tokens in merge
    order) of a byte-level BPE; None when its merges cannot be ranks (see `to_tiktoken`)."""
    u2b = unicode_to_bytes()
    vocab: dict[str, int] = model["vocab"]
    singles = sorted((i, t) for t, i in vocab.items() if len(t) == 1 and t in u2b)
    if len(singles) != 256:
        return None
    ranks: dict[bytes, int] = {}
    ids: list[int] = []
    for i, t in singles:
        ranks[bytes([u2b[t]])] = len(ids)
        ids.append(i)
    table = _byte_table()
    merged: list[str] = []
    for a, b in _merges(model):
        ba, bb = _token_bytes(a, table), _token_bytes(b, table)
        if ba is None or bb is None or a + b not in vocab or ba + bb in ranks:
            return None
        ranks[ba + bb] = len(ids)
        ids.append(vocab[a + b])
        merged.append(a + b)
    return ranks, ids, merged


def _token_bytes(token: str, table: dict[int, str]) -> bytes | None:
    """The bytes a byte-level token stands for; None for a character outside that alphabet."""
    try:
        return token.translate(table).encode("latin-1")
    except UnicodeEncodeError:
        return None


def _encode_to_themselves(tok: Tokenizer, merged: list[str]) -> bool:
    """Whether every merged token encodes to itself under `tokenizers` (tiktoken's whole-piece
    lookup would otherwise give a token that `tokenizers` never produces for that piece)."""
    bpe = tok.model
    return all(len(bpe.tokenize(token)) == 1 for token in merged)


def _plain_byte_level(spec: dict, model: dict) -> bool:
    if model.get("type") != "BPE" or model.get("dropout"):
        return False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False
    if model.get("byte_fallback") or spec.get("normalizer") is not None:
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return False
    # Added tokens other than special ones would be split out of the text by `tokenizers`.
    return all(t.get("special") for t in spec.get("added_tokens") or [])


# ---------------------------------------------------------------------------------------------
# The tokenizer a checkpoint carries
# ---------------------------------------------------------------------------------------------


def read_tokenizer_json(path: str | os.PathLike | None) -> str | None:
    """The text of a tokenizer.json to store in a checkpoint; None when there is none to read."""
    if not path or not Path(path).is_file():
        return None
    return Path(path).read_text(encoding="utf-8")
