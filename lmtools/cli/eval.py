"""`lmtools eval`: loss, perplexity and bits per byte of a checkpoint on text or token files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmtools.cli.app import app, user_errors


@app.command("eval")
@user_errors
def eval_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by lmtools train."),
    files: list[Path] = typer.Argument(
        ..., help="Text files (tokenized with the checkpoint's tokenizer) or .npy token files."
    ),
    stride: Optional[int] = typer.Option(
        None, "--stride", help="Tokens between windows (default: the context length; smaller gives more left context)."
    ),
    val_windows: bool = typer.Option(
        False,
        "--val_windows",
        "--val-windows",
        help="Score a .npy on the same windows the training run validated on (its seed, batch size, eval_iters).",
    ),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("cpu", "--device"),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="tokenizer.json; by default the checkpoint's own."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Loss, perplexity and bits per byte of a model on whole files, in sliding windows."""
    from lmtools.errors import ConfigError
    from lmtools.generate import load_model
    from lmtools.runtime.device import resolve_device
    from lmtools.scoring import check_input, check_stride

    if batch_size <= 0:
        raise ConfigError(f"--batch_size must be a positive integer, got {batch_size}")
    for path in files:  # a mistyped last file is named now, not after scoring the others
        check_input(path)
    dev = resolve_device(device)
    model, payload = load_model(checkpoint, dev)
    stride = model.config.context_length if stride is None else stride
    check_stride(stride, model.config.context_length)
    text_tokenizer = _lazy_tokenizer(payload, tokenizer, checkpoint)
    with _progress(disable=as_json) as progress:
        if val_windows:
            results = [_score_validation(model, path, payload, dev) for path in files]
        else:
            results = [_score_file(model, path, text_tokenizer, stride, batch_size, progress) for path in files]
    if as_json:
        _print_json(results, checkpoint, stride)
    else:
        _table(results, checkpoint, stride, val_windows)


def _lazy_tokenizer(payload: dict, tokenizer: str | None, checkpoint: Path):
    """The tokenizer for text files, loaded on first use (.npy files need none)."""
    import functools

    from lmtools.checkpoint import tokenizer_from_checkpoint

    return functools.cache(lambda: tokenizer_from_checkpoint(payload, tokenizer, checkpoint))


def _score_validation(model, path: Path, payload: dict, dev):
    """`path` scored on the windows the training run validated on."""
    from lmtools.checkpoint import stored_config
    from lmtools.scoring import score_validation_windows

    return score_validation_windows(model, path, stored_config(payload), dev)


def _score_file(model, path: Path, text_tokenizer, stride: int, batch_size: int, progress):
    """`path` scored in sliding windows, with a progress bar of its own."""
    from lmtools.scoring import score_file

    task = progress.add_task(path.name, total=None)
    return score_file(
        model,
        path,
        text_tokenizer,
        stride=stride,
        batch_size=batch_size,
        advance=lambda n: progress.advance(task, n),
        on_plan=lambda n: progress.update(task, total=n),
    )


def _print_json(results, checkpoint: Path, stride: int) -> None:
    import json

    document = {"checkpoint": str(checkpoint), "stride": stride, "files": [r.to_dict() for r in results]}
    typer.echo(json.dumps(document, indent=2))


def _progress(disable: bool):
    """A transient progress bar on stderr, shown only on a terminal: rich ends a bar on a
    console that is not interactive (a pipe, a file, a test's capture) with an empty line,
    which would stand before the one line of an error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable or not console.is_interactive,
    )


def _table(results, checkpoint: Path, stride: int, val_windows: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{checkpoint.name}: " + ("training's validation windows" if val_windows else f"stride {stride}")
    table = Table(title=title)
    for col in ("file", "tokens", "scored", "loss", "perplexity", "bits/byte"):
        table.add_column(
            col, justify="left" if col == "file" else "right", overflow="fold" if col == "file" else "ellipsis"
        )
    for r in results:
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        table.add_row(r.path, f"{r.tokens:,}", f"{r.scored:,}", f"{r.loss:.4f}", f"{r.perplexity:.2f}", bpb)
    console = Console(soft_wrap=True)
    console.print(table)
    for r in results:
        if r.note:
            console.print(f"{r.path}: {r.note}", highlight=False)
