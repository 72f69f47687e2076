"""`lmtools` command line: one module per command, each registers itself on `app`."""

# Importing a command module registers its command; `--help` lists them in this order,
# the order of a user's work. A command imports what it runs inside its function, so that
# `lmtools --help` and a mistyped flag are answered without importing torch.
from lmtools.cli import demo, eval, export, inspect, plot, prepare, sample, train  # noqa: F401,E402,I001
from lmtools.cli.app import app, main  # noqa: F401
