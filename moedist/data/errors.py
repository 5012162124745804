"""The one exception type of the data package."""

from __future__ import annotations

from moedist.errors import DataError  # defined there: the CLI handles it without importing this package

__all__ = ["DataError"]
