"""The typer application and the one place where user errors become exit code 2."""

from __future__ import annotations

import sys

import typer

from lmtools.errors import LMToolsError

app = typer.Typer(
    name="lmtools",
    help="From raw text to a trained Transformer language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit code for user mistakes: click's usage-error code.
USER_ERROR = 2


def fail(message: str) -> "typer.Exit":
    """Print one red line on stderr and return the Exit to raise."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}")
    return typer.Exit(USER_ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage mistakes too end in one line and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except LMToolsError as exc:  # raised outside a command body (rare)
        raise SystemExit(_report(exc)) from None
    except Exception as exc:
        # click's (or typer's bundled click's) own errors: bad flag values, unknown options.
        if not hasattr(exc, "format_message") or not hasattr(exc, "exit_code"):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError" or not exc.format_message():
            exc.show()  # `lmtools` alone prints the help
            raise SystemExit(exc.exit_code) from None
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        fail(exc.format_message().replace("\n", " ") + hint)
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _report(exc: BaseException) -> int:
    fail(str(exc))
    return USER_ERROR


def user_errors(fn):
    """Decorator for command bodies: LMToolsError -> one line + exit 2, no traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LMToolsError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None

    return wrapper
