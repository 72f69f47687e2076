"""Every option of every command, fed values of the wrong type, out of range, NaN, infinite,
huge and empty: the command ends in exit 0, or in exit 2 with one `error:` line (the last on
stderr), never a traceback or a hang.

Each command starts from a valid, quick invocation on real files (a trained checkpoint with its
tokenizer, a prepared folder, a corpus); the option under test is then given one drawn value.
"""

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer.main
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import flags
from lmtools.cli import app
from lmtools.cli.app import main
from lmtools.demo import MAX_MINUTES
from prepared import train_on_mixed

pytestmark = pytest.mark.slow

# Values a user might type by mistake, then any short text, any integer, any float.
MISTAKES = ["", " ", "abc", "-1", "0", "-0", "1.5", "nan", "NaN", "inf", "-inf", "1e309", "9" * 40, "-" + "9" * 40]
MISTAKES += ["0x10", "1_000", "[]", "{}", "true", "None", "\x00", "é", "1e-320", "2" + "0" * 19, "--help"]
VALUES = (
    st.sampled_from(MISTAKES)
    | st.text(max_size=12)
    | st.integers(-(2**80), 2**80).map(str)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
)
SECONDS = 120  # a command that has not ended by then hangs


def commands() -> dict:
    return typer.main.get_command(app).commands


def value_options(command: str) -> list[str]:
    """The options of `command` that take a value (flags are on or off: nothing to get wrong)."""
    out = []
    for param in commands()[command].params:
        if param.param_type_name == "option" and not getattr(param, "is_flag", False) and param.name != "help":
            if param.opts and param.opts[0].startswith("--"):
                out.append(param.opts[0])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared folder, a checkpoint trained on it (with its tokenizer) and its run folder."""
    root = tmp_path_factory.mktemp("options")
    data, ckpt = train_on_mixed(root, max_iters=4, checkpoint_interval=4)
    (root / "corpus.txt").write_text("a small corpus of plain text, line after line.\n" * 400)
    return root, data, ckpt


def base_invocation(command: str, world, scratch: Path) -> list:
    """A valid, quick `lmtools COMMAND ...` that writes only into `scratch`."""
    root, data, ckpt = world
    quick_run = dict(max_iters=2, max_minutes=0.05, eval_interval=1, eval_iters=1, log_interval=1, batch_size=2)
    own = scratch / "run" / "ckpt.pt"
    if command in ("resume",):
        own.parent.mkdir(parents=True)
        shutil.copy(ckpt, own)
    tiny = dict(d_model=16, num_layers=1, num_heads=2, d_ff=32, context_length=16)
    return {
        "train": ["train", "--train_data", data, *flags(tiny, quick_run), "--checkpoint_path", own],
        "resume": ["resume", own, "--max_iters", 6, "--max_minutes", 0.05],
        "sample": ["sample", ckpt, "--prompt", "the", "--max_new_tokens", 4],
        "eval": ["eval", ckpt, data / "val.npy"],
        "export": ["export", ckpt, "--out", scratch / "hf"],
        "inspect": ["inspect", ckpt],
        "plot": ["plot", ckpt.parent, "--out", scratch / "plot.png"],
        "prepare": ["prepare", root / "corpus.txt", "--out", scratch / "data", "--tokenizer", data / "tokenizer.json"],
        "demo": ["demo", "--out", scratch / "demo", "--minutes", 0.02, "--max_corpus_mb", 0.2, "--vocab_size", 300],
    }[command]


def with_option(argv: list, option: str, value: str) -> list:
    """`argv` with `option` set to `value` (its base value, if any, replaced)."""
    argv = [str(a) for a in argv]
    if option in argv:
        i = argv.index(option)
        del argv[i : i + 2]
    return [*argv, f"{option}={value}"]  # `=`: a value that starts with "-" is still the value


@contextmanager
def deadline(seconds: int):
    def hung(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_console_script(argv: list, capsys) -> tuple[int, str, str]:
    """`lmtools ARGV` through the console script's entry point, in this process: its exit code,
    stdout and stderr. Any exception but SystemExit escapes (a traceback: the test fails)."""
    capsys.readouterr()
    try:
        with deadline(SECONDS):
            main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    out, err = capsys.readouterr()
    return code, out, err


def check_outcome(argv: list, code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, (argv, err[-2000:])
    if code == 0:
        return
    assert code == 2, (argv, code, out[-1000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], (argv, err[-2000:])


CASES = [(command, option) for command in commands() for option in value_options(command)]
# The demo builds a tokenizer and a dataset before it trains: fewer draws.
EXAMPLES = {"demo": 2, "train": 4}


def long_but_valid(command: str, option: str, value: str) -> bool:
    """A demo asked for minutes of training trains for those minutes: asked, not hung."""
    if (command, option) != ("demo", "--minutes"):
        return False
    try:
        return 0.05 < float(value) <= MAX_MINUTES
    except ValueError:
        return False


@pytest.mark.parametrize("command, option", CASES, ids=[f"{c} {o}" for c, o in CASES])
def test_any_value_of_any_option_is_exit_0_or_one_line(world, command, option, capsys):
    @settings(
        max_examples=EXAMPLES.get(command, 8),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
    )
    @given(value=VALUES)
    def one(value):
        assume(not long_but_valid(command, option, value))
        scratch = Path(tempfile.mkdtemp(dir=world[0]))
        here = os.getcwd()
        os.chdir(scratch)  # a relative path drawn as a value lands in the scratch folder
        try:
            argv = with_option(base_invocation(command, world, scratch), option, value)
            check_outcome(argv, *run_console_script(argv, capsys))
        finally:
            os.chdir(here)
            shutil.rmtree(scratch, ignore_errors=True)

    one()


def test_every_command_is_covered():
    assert {command for command, _ in CASES} == set(commands()) and len(CASES) > 70
