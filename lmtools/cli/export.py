"""`lmtools export`: a checkpoint as a Hugging Face folder, or as plain safetensors weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmtools.cli.app import app, user_errors


@app.command()
@user_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by lmtools train (a sharded one too)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    format: str = typer.Option(
        "hf",
        "--format",
        help="hf: a folder transformers loads (Llama); safetensors: lmtools' weights + config; gguf: one file for llama.cpp.",
    ),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="tokenizer.json; by default the checkpoint's own."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an --out folder that an earlier export wrote (never any other folder or file).",
    ),
) -> None:
    """Export a checkpoint for transformers (AutoModelForCausalLM / AutoTokenizer) or as safetensors."""
    from lmtools.interop.export import export_checkpoint

    files = export_checkpoint(checkpoint, out, fmt=format, tokenizer=tokenizer, overwrite=overwrite)
    typer.echo(f"Wrote {out}/: " + ", ".join(f.name for f in files))
