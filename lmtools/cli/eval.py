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
        ...,
        help="Text (.txt, .jsonl, .parquet, .gz), read and tokenized as prepare does with the "
        "checkpoint's tokenizer, or .npy token files.",
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
    separator: Optional[str] = typer.Option(
        None,
        "--separator",
        help="Split text files into documents at this string (\\n, \\t, \\r, \\\\ are understood); "
        "`none`: one document per file. Default: as the checkpoint's training data was read.",
        show_default=False,
    ),
    separator_line: Optional[str] = typer.Option(
        None,
        "--separator_line",
        "--separator-line",
        help="Split text files at every line that holds exactly this text, at a file's start and end "
        "too; replaces --separator. Default: as the checkpoint's training data was read.",
        show_default=False,
    ),
    text_field: Optional[str] = typer.Option(
        None,
        "--text_field",
        "--text-field",
        help="Field holding the text in .jsonl files (default: the training data's, else text).",
        show_default=False,
    ),
    text_column: Optional[str] = typer.Option(
        None,
        "--text_column",
        "--text-column",
        help="Column holding the text in .parquet files (default: the training data's, else text).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Loss, perplexity and bits per byte of a model on whole files, in sliding windows.

    Text is read into documents as the checkpoint's training data was read by prepare (its
    separator, separator line, jsonl field, parquet column), each document followed by the
    end-of-text id: a text file scores as the token file prepare makes from it."""
    from lmtools.errors import ConfigError
    from lmtools.generate import load_model
    from lmtools.runtime.device import resolve_device
    from lmtools.scoring import check_input, check_stride, is_token_file, text_kind, text_reading

    if batch_size <= 0:
        raise ConfigError(f"--batch_size must be a positive integer, got {batch_size}")
    overrides = _reading_flags(separator, separator_line, text_field, text_column)
    for path in files:  # a mistyped last file is named now, not after scoring the others
        check_input(path)
    kinds = [text_kind(path) for path in files if not is_token_file(path)]
    dev = resolve_device(device)
    model, payload = load_model(checkpoint, dev)
    stride = model.config.context_length if stride is None else stride
    check_stride(stride, model.config.context_length)
    reading = text_reading(payload.get("data_reading"), overrides)
    text_tokenizer = _lazy_tokenizer(payload, tokenizer, checkpoint)
    with _progress(disable=as_json) as progress:
        if val_windows:
            results = [_score_validation(model, path, payload, dev) for path in files]
        else:
            results = [
                _score_file(model, path, text_tokenizer, stride, batch_size, progress, reading.options)
                for path in files
            ]
    read_as = reading.to_dict(kinds) if kinds else None
    if as_json:
        _print_json(results, checkpoint, stride, read_as)
    else:
        _table(results, checkpoint, stride, val_windows, read_as)


def _reading_flags(
    separator: str | None, separator_line: str | None, text_field: str | None, text_column: str | None
) -> dict:
    """The ReadOptions fields the flags set, spelled and checked as prepare's flags are."""
    from lmtools.cli.prepare import separator_options

    overrides = separator_options(separator, separator_line)
    if text_field is not None:
        overrides["text_field"] = text_field
    if text_column is not None:
        overrides["text_column"] = text_column
    return overrides


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


def _score_file(model, path: Path, text_tokenizer, stride: int, batch_size: int, progress, reading):
    """`path` scored in sliding windows, with a progress bar of its own."""
    from lmtools.scoring import score_file

    progress.start(path)
    result = score_file(
        model,
        path,
        text_tokenizer,
        stride=stride,
        batch_size=batch_size,
        on_progress=progress.update,
        reading=reading,
    )
    progress.done(result)
    return result


def _print_json(results, checkpoint: Path, stride: int, read_as: dict | None) -> None:
    import json

    document = {
        "checkpoint": str(checkpoint),
        "stride": stride,
        "text_reading": read_as,  # how text files were read into documents (None: no text file)
        "files": [r.to_dict() for r in results],
    }
    typer.echo(json.dumps(document, indent=2))


def _progress(disable: bool):
    """On a terminal, a transient progress bar on stderr; elsewhere (a pipe, a file, a job's
    log) a plain line every PlainProgress.INTERVAL seconds once a file takes that long, so that
    a quick eval prints nothing but its results. Rich would end a bar on a console that is not
    interactive with an empty line, which would stand before the one line of an error."""
    from rich.console import Console

    console = Console(stderr=True)
    if disable:
        return Progress()
    return BarProgress(console) if console.is_interactive else PlainProgress()


class Progress:
    """What eval reports while it scores a file; the default is silent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self, path: Path) -> None:
        pass

    def update(self, done: int, total: int, scored: int) -> None:
        pass

    def done(self, result) -> None:
        pass


class PlainProgress(Progress):
    """A line on stderr every INTERVAL seconds of a file, and its throughput at the end."""

    INTERVAL = 10.0

    def start(self, path: Path) -> None:
        import time

        self.path, self.start_time = path, time.monotonic()
        self.last = self.start_time
        self.spoke = False

    def update(self, done: int, total: int, scored: int) -> None:
        import sys
        import time

        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last, self.spoke = now, True
        rate = scored / max(now - self.start_time, 1e-9)
        eta = (total - done) / done * (now - self.start_time) if done else 0.0
        sys.stderr.write(
            f"eval: {self.path}: {100 * done / max(total, 1):5.1f}% of {_size(total)}, "
            f"{scored:,} tokens scored, {rate:,.0f} tokens/s, eta {eta:.0f} s\n"
        )

    def done(self, result) -> None:
        import sys

        if self.spoke:
            sys.stderr.write(f"eval: {self.path}: {_throughput(result)}\n")


class BarProgress(Progress):
    """Rich's bar: the bytes of the file scored, tokens per second, the time left."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def start(self, path: Path) -> None:
        import time

        self.task, self.start_time = self.bar.add_task(path.name, total=None, rate=""), time.monotonic()

    def update(self, done: int, total: int, scored: int) -> None:
        import time

        rate = scored / max(time.monotonic() - self.start_time, 1e-9)
        self.bar.update(self.task, completed=done, total=total, rate=f"{rate:,.0f} tokens/s")

    def done(self, result) -> None:
        self.bar.console.print(f"{result.path}: {_throughput(result)}", highlight=False)


def _size(n: int) -> str:
    from rich.filesize import decimal

    return decimal(n)


def _throughput(result) -> str:
    rate = f" ({result.tokens_per_second:,.0f} tokens/s)" if result.tokens_per_second else ""
    return f"{result.scored:,} tokens scored in {result.seconds:.1f} s{rate}"


def _table(results, checkpoint: Path, stride: int, val_windows: bool, read_as: dict | None) -> None:
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
    if read_as is not None:
        console.print(f"text {read_as['description']}", highlight=False)
