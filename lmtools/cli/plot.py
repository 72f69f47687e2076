"""`lmtools plot`: train and validation loss curves of one or more runs, into a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmtools.cli.app import app, user_errors


@app.command()
@user_errors
def plot(
    runs: list[Path] = typer.Argument(
        ..., help="Run folders (holding metrics.jsonl), metrics.jsonl files or checkpoints."
    ),
    out: Path = typer.Option(Path("loss.png"), "--out", "-o", help="PNG file to write."),
    title: Optional[str] = typer.Option(None, "--title", help="Plot title (default: the run names)."),
    log_y: bool = typer.Option(False, "--log_y", "--log-y", help="Logarithmic loss axis."),
) -> None:
    """Plot train and val loss of runs into a PNG (needs the optional matplotlib)."""
    from lmtools.plot import plot_runs

    path = plot_runs(list(runs), out, title=title, log_y=log_y, warn=lambda line: typer.echo(line, err=True))
    typer.echo(f"Wrote {path}")
