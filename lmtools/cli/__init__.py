"""`lmtools` command line: one module per command, each registers itself on `app`."""

from lmtools.cli.app import app, main  # noqa: F401

# Importing a command module registers its command.
from lmtools.cli import demo, inspect, plot, sample, train  # noqa: F401,E402
from lmtools.cli import prepare  # noqa: F401,E402
