"""Exceptions a user can act on. The CLI prints their message as one line."""
from __future__ import annotations


class MsaSearchError(Exception):
    """Base class for every error msa-search reports to a user without a traceback."""


class DataValidationError(MsaSearchError):
    """A dataset file breaks the format: names the file, split, key and what was expected."""

    def __init__(self, file: str, split: str | None, key: str | None, expected: str, found: str | None = None):
        self.file, self.split, self.key, self.expected, self.found = file, split, key, expected, found
        where = [str(file)]
        if split is not None:
            where.append(f"split '{split}'")
        if key is not None:
            where.append(f"key '{key}'")
        message = ", ".join(where) + f": expected {expected}"
        if found is not None:
            message += f", found {found}"
        super().__init__(message)
