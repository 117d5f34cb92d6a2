"""The root of destfnd's own errors; each subclass's docstring is its default message."""

from __future__ import annotations


class DestfndError(Exception):
    """destfnd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class UsageError(Exception):
    """Arguments that argparse accepts but that do not go together (exit 2, as argparse)."""
