"""`lmtools demo`: prepare -> train -> sample on the Python standard library, in a few minutes."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from lmtools.cli.app import app, user_errors
from lmtools.demo import VOCAB_SIZE


@app.command()
@user_errors
def demo(
    minutes: float = typer.Option(3.0, "--minutes", help="Training time budget in minutes (CPU)."),
    out: Path = typer.Option(
        Path("lmtools-demo"), "--out", help="Folder for the corpus, dataset, checkpoint and plot."
    ),
    max_corpus_mb: float = typer.Option(
        8.0, "--max_corpus_mb", "--max-corpus-mb", help="Cap on the stdlib source taken as corpus."
    ),
    vocab_size: int = typer.Option(VOCAB_SIZE, "--vocab_size", "--vocab-size", help="BPE vocabulary size."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a small model on this Python's own standard library sources, on the CPU, and sample from it."""
    from lmtools.demo import run_demo
    from lmtools.generate import visible

    r = run_demo(out, minutes=minutes, max_corpus_mb=max_corpus_mb, vocab_size=vocab_size, seed=seed, log=typer.echo)
    show = visible if sys.stdout.isatty() else str  # as `sample` shows text: a terminal acts on control codes
    for prompt, text in r.samples:
        typer.echo("      " + "-" * 60)
        typer.echo(_indent(show(prompt + text)))
    typer.echo("      " + "-" * 60)
    val = ""
    if r.first_val_loss is not None and r.last_val_loss is not None:
        val = f", val loss {r.first_val_loss:.3f} -> {r.last_val_loss:.3f}"
    typer.echo(
        f"\nDone in {r.total_seconds / 60:.1f} min ({r.train_seconds:.0f}s training, {r.iterations} steps): "
        f"loss {r.first_loss:.3f} -> {r.last_loss:.3f}{val}"
    )
    typer.echo(
        f"  corpus     {r.out / 'corpus.jsonl'} ({r.corpus_files} stdlib modules, {r.corpus_bytes / 1e6:.1f} MB)"
    )
    typer.echo(f"  dataset    {r.data_dir}/ (train.npy, val.npy, tokenizer.json, meta.json)")
    typer.echo(f"  checkpoint {r.checkpoint}")
    typer.echo(f"  metrics    {r.metrics}")
    if r.plot is not None:
        typer.echo(f"  loss plot  {r.plot}")
    typer.echo("\nTry next:")
    for command in r.next_commands():
        typer.echo(f"  {command}")


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())
