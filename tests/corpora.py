"""Folders made by the real `lmtools prepare` from the generated text of `text_corpora`."""

from pathlib import Path

from typer.testing import CliRunner

from lmtools.cli import app
from text_corpora import documents as sized_documents
from text_corpora import eot_joined, write_jsonl  # noqa: F401 (re-exported for the tests)


def documents(n: int, seed: int, size: int = 400) -> list[str]:
    """`n` documents of about `size` characters; another seed draws another vocabulary of words,
    so a BPE trained on it is another tokenizer."""
    return sized_documents([size] * n, seed)


def write_eot_text(path: Path, docs: list[str]) -> Path:
    """One text file of documents joined by `<|endoftext|>` (the TinyStories / OpenWebText layout)."""
    path.write_text(eot_joined(docs), encoding="utf-8")
    return path


def prepare(corpus: Path, out: Path, *args) -> dict:
    """`lmtools prepare CORPUS --out OUT ARGS`; returns the meta.json written."""
    import json

    result = CliRunner().invoke(app, ["prepare", str(corpus), "--out", str(out), "--quiet", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "meta.json").read_text(encoding="utf-8"))
