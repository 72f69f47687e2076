"""Procedural text shaped like the corpora users bring: prose in lines and paragraphs, documents
joined by <|endoftext|>, source-like files; seeded, so every run sees the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmtools.layout import EOT

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "an", "el", "or", "is", "th", "qu", "é", "ü", "ß", "ñ"]


def _vocabulary(rng: np.random.Generator, n: int = 600) -> list[str]:
    return ["".join(rng.choice(_SYLLABLES, rng.integers(1, 4))) for _ in range(n)]


def prose(n_chars: int, seed: int = 0) -> str:
    """About `n_chars` characters of sentences in lines, with blank lines between paragraphs."""
    rng = np.random.default_rng(seed)
    words = _vocabulary(rng)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    picks = rng.choice(len(words), size=n_chars // 4 + 16, p=zipf)
    out, size, i = [], 0, 0
    while size < n_chars:
        n = int(rng.integers(4, 16))
        line = " ".join(words[j] for j in picks[i : i + n]).capitalize() + "."
        i = (i + n) % (len(picks) - 16)
        line += "\n\n" if rng.random() < 0.15 else "\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def documents(sizes: list[int], seed: int = 0) -> list[str]:
    """Documents of about these sizes (characters), each ending in a newline."""
    text = prose(sum(sizes) + 100 * len(sizes), seed)
    docs, pos = [], 0
    for n in sizes:
        end = text.find("\n", pos + n)
        docs.append(text[pos:end].strip() + "\n")
        pos = end + 1
    return docs


def eot_joined(docs: list[str]) -> str:
    """The layout of the TinyStories and OpenWebText dumps: text, <|endoftext|>, newline."""
    return "".join(d + EOT + "\n" for d in docs)


def write_jsonl(path: Path, texts: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


# Prose, code and non-ASCII text, as the documents of a jsonl corpus.
_WORDS = (
    "the cat sat on a mat and the dog ran to the café über naïve Straße 東京 日本語 "
    "once upon a time there was a small model"
).split()
_CODE = ("def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n", "if a == b:\n    c = {'k': [1, 2]}\n")


def mixed_documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        prose = " ".join(rng.choice(_WORDS, int(rng.integers(20, 60))))
        docs.append(prose + "\n" + _CODE[int(rng.integers(len(_CODE)))] if rng.random() < 0.4 else prose)
    return docs
