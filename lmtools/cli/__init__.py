"""`lmtools` command line: one module per command, each registers itself on `app`."""

from lmtools.cli.app import app, main  # noqa: F401

# Importing a command module registers its command; `--help` lists them in this order,
# the order of a user's work.
from lmtools.cli import prepare, train, inspect, sample, eval, export, plot, demo  # noqa: F401,E402,I001
