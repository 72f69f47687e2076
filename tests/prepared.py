"""Folders made by the real `lmtools prepare` from the generated text of `text_corpora`."""

import json
from pathlib import Path

from helpers import MIXED_CORPUS_RUN, cli_output, flags, run_cli
from texts import documents as sized_documents
from texts import eot_joined, mixed_documents, write_jsonl  # noqa: F401 (re-exported for the tests)


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
    result = run_cli("prepare", corpus, "--out", out, "--quiet", *args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "meta.json").read_text(encoding="utf-8"))


def prepare_mixed(root: Path, n_docs: int = 300) -> Path:
    """`lmtools prepare` on a jsonl corpus of mixed documents (non-ASCII text written as is);
    returns the prepared folder."""
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in mixed_documents(n_docs):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    prepare(corpus, root / "data", "--vocab_size", 400, "--val_fraction", 0.1)
    return root / "data"


def train_on_mixed(root: Path, n_docs: int = 300, **options) -> tuple[Path, Path]:
    """`prepare_mixed(root, n_docs)`, then `lmtools train` of MIXED_CORPUS_RUN with these options
    on it, saved to root/run/ckpt.pt; returns the prepared folder and the checkpoint."""
    data = prepare_mixed(root, n_docs)
    ckpt = root / "run" / "ckpt.pt"
    cli_output("train", "--train_data", data, *MIXED_CORPUS_RUN, *flags(checkpoint_path=ckpt, **options))
    return data, ckpt
