"""Secret values out of everything destfnd shows or stores: logs, recorded requests, errors."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import orjson

MIN_SECRET_CHARS = 4  # shorter values are too common to replace without mangling the text


class Redactor:
    """Replaces every known secret value with "[redacted]"; more can be added at start-up
    (settings a function declares secret)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if len(secret) < MIN_SECRET_CHARS or secret in self._secrets:
            return
        self._secrets.add(secret)
        # As JSON writes it too (recorded request bodies and headers are JSON): a secret with
        # a quote or a backslash (a JSON key file) appears there escaped.
        escaped = orjson.dumps(secret).decode()[1:-1]
        if escaped != secret:
            self._secrets.add(escaped)
        # Longest first, in one pass: a secret that contains another is hidden whole.
        ordered = sorted(self._secrets, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered)))

    def add_settings(self, keys: Iterable[str], settings: dict) -> None:
        """The values (nested ones too) of the settings `keys` a function declares secret."""
        for key in keys:
            for value in _leaves(settings.get(key)):
                self.add(value)

    @property
    def empty(self) -> bool:
        return self._pattern is None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub("[redacted]", text)


def redact_tree(redact: Callable[[str], str], value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with `redact` applied to every string, keys
    too. Not to its JSON text: a secret in a string holding JSON (a recorded request body) is
    escaped twice there."""
    if isinstance(redact, Redactor) and redact.empty:  # nothing to hide: no walk
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(redact, k): redact_tree(redact, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(redact, v) for v in value]
    return value


def _leaves(value: object) -> list[str]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [] if value is None else [str(value)]
