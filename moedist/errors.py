"""The exception types the command line turns into one-line errors and exit statuses.

They live here, in a module that imports nothing, so that `moedist ctl` and `moedist
--help` can handle them without importing torch, Ray or numba (seconds of start-up).
Each is re-exported where it belongs (moedist.data, moedist.training.checkpoint,
moedist.training.loop, moedist.runtime.coordinator), so code imports it from there.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing or malformed path, file, column or field.

    Every message names the offending path, column or field so the user can fix it
    without reading a traceback.
    """


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


class TooManyFailuresError(RuntimeError):
    """More workers were lost than --max-failures allows; the last checkpoint is intact."""


class JobError(RuntimeError):
    """Base of the runtime's typed errors."""
