"""Fixtures shared by the test modules (plain functions live in helpers.py)."""

import pytest

import helpers


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli("train", "--max_iters", 3, ...)`: the lmtools CLI in process (helpers.run_cli;
    arguments may be paths or numbers); returns click's Result (exit_code, output, stderr)."""
    return helpers.run_cli


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A .npy file of 50,000 random token ids below helpers.VOCAB, made once per test module."""
    return helpers.write_tokens(tmp_path_factory.mktemp("tokens") / "train.npy")
