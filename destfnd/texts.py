"""Text that UTF-8, and so JSON, SQLite's JSON functions and the journal, can hold."""

from __future__ import annotations

from typing import Any


def is_text(text: str) -> bool:
    """Whether UTF-8 can hold `text` (it has no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def sendable(text: str) -> str:
    """`text` without lone surrogates, which no UTF-8 can hold: one standing for a byte that
    was not UTF-8 (Python's "surrogateescape", as aiohttp decodes a server's reason phrase
    and headers) as that byte's `\\xe9`, any other as its `\\ud83d`. Nearly every text has
    none, and is returned as it is."""
    if is_text(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode()


def sendable_tree(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, tuples, strings) with `sendable` applied to every
    string, keys too."""
    if isinstance(value, str):
        return sendable(value)
    if isinstance(value, dict):
        return {sendable_tree(k): sendable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sendable_tree(v) for v in value]
    return value
