"""The typer application and the one place where user errors become exit code 2."""

from __future__ import annotations

import os
import signal
import sys

import typer
from typer.core import TyperCommand

from lmtools.errors import LMToolsError


class Command(TyperCommand):
    """A command whose help lists each option's names one under another.

    The help is a rich table whose columns shrink, when the page is narrower than their content,
    if they may wrap; the names column may, and an option's names joined by commas
    (`--snake_case,--kebab-case`) are one word that rich can only cut. One name a line, the
    column is as wide as the longest name and is never cut at 80 columns.
    `shown_required`: options marked required in the help that the command checks itself
    (because another source, such as a --config file, may give them)."""

    shown_required: frozenset[str] = frozenset()
    _rendering_help = False

    def format_help(self, ctx, formatter) -> None:
        self._rendering_help = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._rendering_help = False

    def get_params(self, ctx):
        params = super().get_params(ctx)
        if not self._rendering_help:
            return params
        return [self._as_shown(param) for param in params]

    def _as_shown(self, param):
        """A copy of `param` for the help page only (the command parses with the original)."""
        import copy

        long_names = [name for name in param.opts if name.startswith("--")]
        if len(long_names) < 2 and param.name not in self.shown_required:
            return param
        shown = copy.copy(param)
        if len(long_names) > 1:
            shown.opts = ["\n".join(long_names), *(name for name in param.opts if not name.startswith("--"))]
        if param.name in self.shown_required:
            shown.required = True
        return shown


class _Typer(typer.Typer):
    """Its commands are `Command`s unless they name another class."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


app = _Typer(
    name="lmtools",
    help="From raw text to a trained Transformer language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from lmtools import __version__

        typer.echo(f"lmtools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """From raw text to a trained Transformer language model."""


# Exit code for user mistakes: click's usage-error code.
USER_ERROR = 2


def fail(message: str) -> typer.Exit:
    """Print one red line on stderr and return the Exit to raise."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}")
    return typer.Exit(USER_ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage mistakes too end in one line and exit code 2."""
    try:
        _main(argv)
    except SystemExit as exc:
        _end_distributed_worker(exc.code)
        raise


def _end_distributed_worker(code) -> None:
    """A torchrun worker ends here, without the interpreter's teardown.

    torch's gloo worker threads can outlive `destroy_process_group` (a DDP model keeps its
    group alive). One that releases its last collective's tensors after the interpreter began
    to shut down needs a GIL that is gone, and the process aborts (SIGABRT) after a run that
    finished well: torchrun then reports the job failed. By now the run has closed everything
    it wrote; only stdout and stderr are flushed."""
    distributed = sys.modules.get("lmtools.runtime.distributed")  # not imported: no run took place
    if distributed is None or not distributed.joined_process_group():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


def _main(argv: list[str] | None) -> None:
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
        message = exc.format_message().replace("\n", " ")
        if type(exc).__name__ == "NoSuchOption" and ctx is not None:
            names = [n for param in ctx.command.params for n in getattr(param, "opts", [])]
            best = closest_option(exc.option_name, names)
            message = f"no such option {exc.option_name}" + (f"; did you mean {best}?" if best else "")
        fail(message + hint)
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def closest_option(typed: str, names: list[str]) -> str | None:
    """The flag a mistyped one most likely meant: the one whose words' initials it spells
    (--lr: --learning_rate), else the one it begins, else difflib's closest name."""
    import difflib

    def key(name: str) -> str:
        return name.lstrip("-").replace("-", "_").lower()

    spelled: dict[str, str] = {}
    for name in names:
        if name.startswith("--") and name != "--help" and (key(name) not in spelled or "_" in name):
            spelled[key(name)] = name  # the documented --snake_case spelling wins
    want = key(typed)
    if not want or not spelled:
        return None
    initials = [k for k in spelled if "".join(word[0] for word in k.split("_") if word) == want]
    begins = [k for k in spelled if k.startswith(want)]
    for found in (initials, begins, difflib.get_close_matches(want, list(spelled), n=1, cutoff=0.6)):
        if found:
            return spelled[found[0]]
    return None


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
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP where a command asks so
            signum = getattr(exc, "signum", signal.SIGINT)
            sys.stderr.write("interrupted\n" if signum == signal.SIGINT else f"stopped by {exc}\n")
            raise typer.Exit(128 + signum) from None

    return wrapper
