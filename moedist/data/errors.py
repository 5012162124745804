"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing or malformed path, file, column or field.

    Every message names the offending path, column or field so the user can fix it
    without reading a traceback.
    """
