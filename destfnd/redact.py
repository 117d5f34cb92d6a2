"""Secret values out of everything destfnd shows or stores: logs, recorded requests, errors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from destfnd.texts import sendable_tree

MIN_SECRET_CHARS = 4  # shorter values are too common to replace without mangling the text


class Redactor:
    """Replaces every known secret value with "[redacted]"; more can be added at start-up
    (settings a function declares secret)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._patterns: dict[str, tuple[int, str]] = {}  # per form: its length, its regex
        self._encodings: dict[str, tuple[int, str]] = {}  # per secret: percent-encoded
        self._pattern: re.Pattern[str] | None = None
        self._encoded: re.Pattern[str] | None = None
        self._plus = False  # a secret has a space, which a form body carries as "+"
        self._escaped = False  # a secret has a character JSON escapes
        self.longest = 0  # characters a secret can take in text, in any of its forms, about
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        # Also without the whitespace around it: a key file's extra newline, which the
        # function's `.strip()` takes off.
        for value in {secret, secret.strip()}:
            if len(value) >= MIN_SECRET_CHARS and value not in self._secrets:
                self._add(value)
        # Longest first, in one pass: a secret that contains another is hidden whole. The
        # percent-encoded forms go with the others, in a pattern of their own for the text
        # that may hold one (`_pattern_for`).
        plain = list(self._patterns.values())
        for attr, patterns in (
            ("_pattern", plain),
            ("_encoded", [*plain, *self._encodings.values()]),
        ):
            ordered = sorted(patterns, key=lambda p: p[0], reverse=True)
            if ordered:
                setattr(self, attr, re.compile("|".join(regex for _, regex in ordered)))

    def _add(self, secret: str) -> None:
        # Also as JSON writes it (a secret with a quote or a backslash, from a JSON key file,
        # appears escaped in a JSON request body; Python's json.dumps escapes what is not
        # ASCII too) and as Python shows it (`print(settings)`, `f"{settings}"`, `repr(key)`).
        forms = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], ascii(secret)[1:-1]}
        try:
            forms.add(orjson.dumps(secret).decode()[1:-1])
            # A form JSON would escape is found in JSON text only once that text is parsed.
            escaped = any(orjson.dumps(f).decode()[1:-1] != f for f in forms)
        except TypeError:  # a lone surrogate (an environment variable's byte that is no UTF-8)
            escaped = True
        self._escaped = self._escaped or escaped
        self._secrets.update(forms)
        # (percent-encoded: up to 3 characters each, 9 for a character of 3 UTF-8 bytes)
        self.longest = max(
            self.longest, *map(len, forms), 3 * len(secret.encode("utf-8", "surrogatepass"))
        )
        for form in forms:
            self._patterns[form] = (len(form), re.escape(form))
        # And as a URL or a form body carries it, each character but a letter or a digit
        # percent-encoded or not: `quote(key)` keeps a "/", `quote_plus` makes a space "+",
        # yarl decodes a "%2F" in a query. Only in the pattern for text that may hold such a
        # form (`_pattern_for`): a regex that
        # starts with a choice of characters is searched several times slower than literal
        # text.
        if not secret.isascii() or not secret.isalnum():
            self._encodings[secret] = (len(secret), _url_encoded(secret))
            self._plus = self._plus or " " in secret  # `quote_plus` makes it "+"

    def add_settings(self, keys: Iterable[str], settings: dict) -> None:
        """The values (nested ones too) of the settings `keys` a function declares secret."""
        for key in keys:
            for value in _leaves(settings.get(key)):
                self.add(value)

    @property
    def empty(self) -> bool:
        return self._pattern is None

    def maybe_in_json(self, text: str) -> bool:
        """Whether a secret may be in the strings of the JSON `text`. Certain when none has
        a character JSON escapes: then a secret in a string is in the text as it is. A secret
        with one may be in a string that is itself JSON (a request body), escaped twice."""
        if self._pattern is None:
            return False
        return self._escaped or self._pattern_for(text).search(text) is not None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern_for(text).sub("[redacted]", text)

    def _pattern_for(self, text: str) -> re.Pattern[str]:
        """The pattern with the percent-encoded forms if `text` may hold one: one that is not
        the secret as it is (which the plain pattern finds) has a "%", or a "+"."""
        assert self._pattern is not None
        if self._encodings and ("%" in text or (self._plus and "+" in text)):
            return self._encoded  # type: ignore[return-value]
        return self._pattern


def _url_encoded(secret: str) -> str:
    """A regex of `secret` with each character but a letter or a digit as it is or
    percent-encoded (either case of hex), and a space as "+" too."""
    parts = []
    for char in secret:
        if char.isascii() and char.isalnum():
            parts.append(char)
            continue
        encoded = "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        ways = [re.escape(char), "(?i:" + re.escape(encoded) + ")"]
        if char == " ":
            ways.append(r"\+")
        parts.append("(?:" + "|".join(ways) + ")")
    return "".join(parts)


def redacted_json(redact: Callable[[str], str], value: Any) -> bytes:
    """`value` as JSON, secrets redacted in its strings; the text is searched first, so the
    usual case (no secret in it) costs one search, not a walk."""
    try:
        data = orjson.dumps(value)
    except TypeError:  # lone surrogates (a URL that was not UTF-8, say): as `sendable` has it
        value = sendable_tree(value)
        data = orjson.dumps(value)
    if isinstance(redact, Redactor) and not redact.maybe_in_json(data.decode()):
        return data
    return orjson.dumps(redact_tree(redact, value))


def redact_tree(redact: Callable[[str], str], value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with `redact` applied to every string, keys
    too. Not to its JSON text: a secret in a string holding JSON (a recorded request body) is
    escaped twice there."""
    if isinstance(redact, Redactor) and redact.empty:  # nothing to hide: no walk
        return value
    return _walk_strings(redact, value)


def _walk_strings(redact: Callable[[str], str], value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_walk_strings(redact, k): _walk_strings(redact, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk_strings(redact, v) for v in value]
    return value


def _leaves(value: object) -> list[str]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [] if value is None else [str(value)]
