"""User-facing errors.

Every error a user can cause (bad config value, unknown env id, broken checkpoint, dataset problem) is
raised as a subclass of :class:`DiffrlError` with one sentence saying what was wrong and what to do.
The CLI prints that sentence and exits with status 2, never a traceback.
"""


class DiffrlError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(DiffrlError, ValueError):
    """A configuration value is invalid."""


class EnvError(DiffrlError, ValueError):
    """An environment id is unknown, removed, or needs a missing package."""


class DatasetError(DiffrlError, ValueError):
    """A dataset is missing, malformed, or disagrees with its environment."""


class CheckpointError(DiffrlError):
    """A checkpoint or run directory is missing, corrupt, or incompatible."""


class RunLocked(DiffrlError):
    """Another live process is writing the run directory (``runs/lock.py``); nothing was changed."""


class TrainingDiverged(DiffrlError):
    """A loss or evaluation became NaN/inf; the run stops before overwriting good checkpoints."""


class DiffrlWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""
