"""Fixtures shared by the test modules (plain helpers live in helpers.py)."""

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli("train", "--max_iters", 3, ...)`: the lmtools CLI in process (arguments may be
    paths or numbers); returns click's Result (exit_code, output, stderr)."""
    from lmtools.cli import app

    def invoke(*args, **kwargs):
        return CliRunner().invoke(app, [str(a) for a in args], **kwargs)

    return invoke
