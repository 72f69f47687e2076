"""`lmtools sample`: generate text from a checkpoint, streamed as it comes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmtools.cli.app import app, user_errors


@app.command()
@user_errors
def sample(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by lmtools train."),
    prompt: str = typer.Option("", "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(
        200,
        "--max_new_tokens",
        "--max-new-tokens",
        help="At most this many new tokens (fewer at <|endoftext|>). Any size is taken, none is set"
        " aside: the text streams token by token, past the context length, in constant memory.",
    ),
    temperature: float = typer.Option(
        0.8, "--temperature", help="0 for greedy decoding, else a positive number (the smaller, the closer to greedy)."
    ),
    top_p: Optional[float] = typer.Option(
        0.95, "--top_p", "--top-p", help="Keep the most likely tokens whose probability reaches P, in (0, 1]; 1: all."
    ),
    top_k: Optional[int] = typer.Option(
        None, "--top_k", "--top-k", help="Keep the K most likely tokens (K at or above the vocabulary: all)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling, 0 to 2**64 - 1."),
    device: str = typer.Option("cpu", "--device"),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="tokenizer.json; by default the one the checkpoint records."
    ),
    raw: Optional[bool] = typer.Option(
        None,
        "--raw/--escape",
        help="Write control characters the model produced (ESC sequences, carriage returns, other C0 and C1"
        " codes; newline and tab are text) as they are, or as escapes (\\x1b, \\r). Default: escapes on a"
        " terminal, which would act on them; as they are into a file or pipe, which then holds the text.",
    ),
) -> None:
    """Generate text from a checkpoint; stops at <|endoftext|> or after --max_new_tokens."""
    import sys

    import torch

    from lmtools.checkpoint import check_checkpoint_file, tokenizer_from_checkpoint
    from lmtools.errors import ConfigError
    from lmtools.generate import check_sampling, generate_ids, load_model, stream_text, visible
    from lmtools.layout import EOT
    from lmtools.runtime.device import resolve_device

    if max_new_tokens <= 0:
        raise ConfigError(f"--max_new_tokens must be a positive integer, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, seed)  # before the model loads and the prompt is printed
    check_checkpoint_file(checkpoint, "sample")
    dev = resolve_device(device)
    model, payload = load_model(checkpoint, dev)
    tok = tokenizer_from_checkpoint(payload, tokenizer, checkpoint)
    torch.manual_seed(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    if prompt_ids and max(prompt_ids) >= model.config.vocab_size:
        raise ConfigError("the tokenizer does not match this checkpoint (prompt ids beyond its vocabulary)")
    ids = generate_ids(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eot_id=tok.token_to_id(EOT),
        generator=gen,
    )
    escape = not raw if raw is not None else sys.stdout.isatty()
    shown = visible if escape else str
    if hasattr(sys.stdout, "reconfigure"):  # a console that cannot encode a character shows its escape
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write(shown(prompt))
    for piece in stream_text(tok, ids):
        sys.stdout.write(shown(piece))
        sys.stdout.flush()
    sys.stdout.write("\n")
