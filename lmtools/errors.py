"""User-facing errors.

Anything a user can cause (a missing file, a bad flag value, a checkpoint from another model)
raises a subclass of `LMToolsError`. The CLI turns it into one red line on stderr and exit code 2;
every other exception is a bug and keeps its traceback.
"""


class LMToolsError(Exception):
    """A mistake the user can fix; the message names the thing and the fix."""


class DataError(LMToolsError, ValueError):
    """A token file, corpus or dataset argument is missing, malformed or out of range."""


class ConfigError(LMToolsError, ValueError):
    """A flag or config value is out of range or contradicts another."""


class CheckpointError(LMToolsError):
    """A checkpoint is missing, torn, unsafe, or does not match the model."""


class DeviceError(LMToolsError, RuntimeError):
    """The requested device does not exist on this machine (a RuntimeError, as torch's own is)."""


class DataChanged(DataError):
    """A data file a run reads changed (rewritten, truncated, replaced) since it was fingerprinted."""
