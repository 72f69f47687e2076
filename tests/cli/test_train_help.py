"""`train --help` at 80 columns: options in panels by topic, every name whole, the required
flag marked. Rendered by the console script as a user runs it."""

import os
import re
import subprocess
import sys

import typer.main

from lmtools.cli import app
from lmtools.config.toml import flag_fields
from lmtools.config.train_config import HELP_PANELS

PANELS = ["Data", "Model", "Optimisation", "Schedule", "Evaluation and logging", "Checkpoints", "Scale", "Recipe"]


def _help(*command: str, columns: int = 80) -> str:
    env = dict(os.environ, COLUMNS=str(columns), TERMINAL_WIDTH=str(columns))
    result = subprocess.run(
        [sys.executable, "-m", "lmtools", *command, "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _shown_names(command: str) -> list[str]:
    params = typer.main.get_command(app).commands[command].params
    return [name for p in params if not getattr(p, "hidden", False) for name in p.opts if name.startswith("--")]


def test_train_help_at_80_columns_has_panels_whole_names_and_the_required_mark():
    text = _help("train")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    words = set(re.findall(r"--[A-Za-z0-9_-]+", text))
    names = _shown_names("train")
    assert len(names) > 60 and {"--model_size", "--out_dir", "--run_dir", "--train-data"} <= set(names)
    assert [name for name in names if name not in words] == []
    titles = [re.match(r"╭─ (.+?) ─", line).group(1) for line in lines if line.startswith("╭─ ")]
    assert titles == ["Options", *PANELS]
    train_data = next(line for line in lines if "--train_data" in line)
    assert train_data.startswith("│ *  --train_data ")
    assert sum(line.startswith("│ *") for line in lines) == 1  # the only required flag
    assert "[required]" in text


def test_every_flag_of_train_is_in_one_panel():
    placed = [name for names in HELP_PANELS.values() for name in names]
    assert sorted(placed) == sorted(f.name for f in flag_fields())
    assert list(HELP_PANELS) == PANELS


def test_no_command_cuts_an_option_name_at_80_columns():
    for command in ("prepare", "eval", "export", "sample", "resume"):
        text = _help(command)
        words = set(re.findall(r"--[A-Za-z0-9_-]+", text))
        assert "…" not in text, command
        assert [name for name in _shown_names(command) if name not in words] == [], command
