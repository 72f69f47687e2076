"""Generated corpora and folders made from them by the real `lmtools prepare`."""

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from lmtools.cli import app

PLAY_WORDS = ("the king said to his lord that night and day the queen would come with her men "
              "o good sir what news from the field where blood and fire fell upon the crown").split()
CODE_WORDS = ("def return if else for in range self value x y print import class none true false "
              "while break list dict len append key item yield lambda").split()


def documents(n: int, seed: int, words=PLAY_WORDS, length: int = 60) -> list[str]:
    """`n` documents of `length` words drawn from `words`, in short lines."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        picked = rng.choice(words, length)
        docs.append("\n".join(" ".join(picked[i:i + 10]) for i in range(0, length, 10)))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def write_eot_text(path: Path, docs: list[str]) -> Path:
    """One text file of documents joined by `<|endoftext|>` (the TinyStories / OpenWebText layout)."""
    path.write_text("<|endoftext|>".join(docs), encoding="utf-8")
    return path


def prepare(corpus: Path, out: Path, *args) -> dict:
    """`lmtools prepare CORPUS --out OUT ARGS`; returns the meta.json written."""
    result = CliRunner().invoke(app, ["prepare", str(corpus), "--out", str(out), "--quiet", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "meta.json").read_text(encoding="utf-8"))
