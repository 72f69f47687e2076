"""`lmtools inspect`: what a checkpoint, a token file or a prepared folder holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from lmtools.cli.app import app, user_errors

_TITLES = {"checkpoint": "checkpoint", "token_file": "token file", "dataset": "prepared dataset"}
_SIZES = ("file_size", "bytes")
_IDS = ("eot_id", "min_token", "max_token", "seed", "rank", "format_version")  # identifiers, not amounts


@app.command()
@user_errors
def inspect(
    path: Path = typer.Argument(
        ..., help="A checkpoint (.pt), a token file (.npy, or .bin with --dtype) or a prepared folder."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="dtype of a raw .bin token file (uint16, uint32, int32, int64)."
    ),
    excerpt_chars: int = typer.Option(
        200, "--excerpt_chars", "--excerpt-chars", help="Characters of decoded text to show (0: none)."
    ),
    as_config: bool = typer.Option(
        False,
        "--config",
        help="Print the TOML run config that trains a checkpoint's run again (for train --config), into a new"
        " place: the old run's checkpoint path and folder are written as comments.",
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="Read every token of a token file or prepared folder for exact id ranges and document counts "
        "(without it: meta.json, or a sample of a large file).",
    ),
) -> None:
    """Describe a checkpoint, a token file or a prepared folder, and whether it is sound."""
    from lmtools.inspection import inspect_path

    if as_config:
        typer.echo(run_config_toml(path), nl=False)
        return

    report = inspect_path(path, dtype=dtype, excerpt_chars=max(excerpt_chars, 0), full=full)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    render(report)


def run_config_toml(path: Path) -> str:
    """The run config a checkpoint records as the user passed it (older checkpoints: the resolved
    one), as a TOML that trains the run again into a new place (config.toml.reproducing_toml)."""
    from lmtools.checkpoint import check_checkpoint_file, read_checkpoint, stored_config, stored_user_config
    from lmtools.config.toml import reproducing_toml
    from lmtools.errors import ConfigError

    check_checkpoint_file(path, "inspect --config")
    payload = read_checkpoint(path)
    config = stored_user_config(payload)
    if not config:
        raise ConfigError(f"{path} holds no run config; it was not written by lmtools train")
    return reproducing_toml(config, stored_config(payload), str(path))


def render(report: dict) -> None:
    """The report as one rich table: scalars as rows, nested dicts as titled sections."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(
        title=f"{_TITLES.get(report['kind'], report['kind'])}: {report['path']}",
        show_header=False,
        title_justify="left",
        box=None,
        padding=(0, 2),
    )
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    skip = {"kind", "path", "excerpt", "problems", "sound"}
    sections = []
    for key, value in report.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            table.add_row(key, _fmt(key, value))
    for name, section in sections:
        table.add_row("")
        table.add_row(Text(name, style="bold magenta"), "" if section else Text("(none)", style="dim"))
        for key, value in _flatten(section):
            table.add_row(f"  {key}", _fmt(key, value))
    table.add_row("")
    if report.get("sound", True):
        table.add_row("sound", Text("yes", style="green"))
    else:
        table.add_row("sound", Text("no", style="bold red"))
        for problem in report.get("problems", []):
            table.add_row("", Text(problem, style="red"))
    console.print(table)
    if report.get("excerpt"):
        console.print(Panel(Text(report["excerpt"]), title="excerpt (decoded)", title_align="left", expand=False))


def _flatten(section: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _fmt(key: str, value: Any) -> str:
    from rich.filesize import decimal

    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        if key.rsplit(".", 1)[-1] in _IDS:
            return str(value)
        if key.rsplit(".", 1)[-1] in _SIZES:
            return f"{decimal(value)} ({value:,} bytes)" if value >= 1000 else f"{value:,} bytes"
        return f"{value:,}"
    if isinstance(value, float):
        if key in ("progress", "data_wait"):
            return f"{100 * value:.1f}%"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, list):
        return ", ".join(_fmt(key, v) for v in value) if value else "-"
    return str(value)
