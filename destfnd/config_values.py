"""The config's value converters: each takes a TOML value and returns it converted, or raises
ValueError with what was expected and what was found (the reader adds the key path)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from destfnd.client_ip import parse_network
from destfnd.config import MIB, parse_duration, parse_size

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
SECRET_KEYS = ("env", "file", "credential")


class Invalid(ValueError):
    """A value's problem; `at` extends the key path (".env") when a nested key is at fault."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.at = at


class Problems(ValueError):
    """Several problems of one value (items of an array), each reported."""

    def __init__(self, problems: list[Invalid]) -> None:
        super().__init__("; ".join(f"{p.at}: {p}" for p in problems))
        self.problems = problems


def check(
    ok: Callable[[Any], Any], expected: str, then: Callable[[Any], Any] = lambda v: v
) -> Callable[[Any], Any]:
    """A converter: `then(value)` if `ok(value)`, else ValueError("<expected>, got <value>")."""

    def conv(value: Any) -> Any:
        if ok(value):
            return then(value)
        raise ValueError(f"{expected}, got {show(value)}")

    return conv


boolean = check(lambda v: isinstance(v, bool), "must be true or false")
text = check(lambda v: isinstance(v, str) and v, "must be a non-empty string")
table = check(lambda v: isinstance(v, dict), "must be a table")
charset = "must use only letters, digits, '_', '.' and '-'"
name = check(lambda v: isinstance(v, str) and NAME_RE.fullmatch(v), charset)
measure = check(lambda v: type(v) in (str, int, float), 'must be a string such as "5s"')


def integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
    in_range = lambda v: type(v) is int and lo <= v and (hi is None or v <= hi)  # noqa: E731
    return check(in_range, f"must be an integer {bounds}")


def number(lo: float, hi: float) -> Callable[[Any], float]:
    in_range = lambda v: type(v) in (int, float) and lo <= v <= hi  # noqa: E731 (NaN: refused)
    return check(in_range, f"must be a number from {lo:g} to {hi:g}", float)


def choice(*options: str) -> Callable[[Any], str]:
    by_lower = {option.lower(): option for option in options}
    known = lambda v: isinstance(v, str) and v.lower() in by_lower  # noqa: E731
    return check(known, f"must be one of {', '.join(options)}", lambda v: by_lower[v.lower()])


# No setting needs more; past it, times in milliseconds no longer fit SQLite's integers.
MAX_DURATION = "36500d"
_MAX_DURATION_S = 36500 * 86400


def duration(zero_ok: bool = False) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        seconds = parse_duration(measure(value))
        if seconds > _MAX_DURATION_S:
            raise ValueError(f"must be at most {MAX_DURATION} (100 years), got {show(value)}")
        if seconds > 0 or zero_ok:
            return seconds
        raise ValueError(f"must be greater than 0, got {value!r}")

    return conv


def duration_text(seconds: float) -> str:
    """A duration as the config writes it: `86400` -> "1d", `5400` -> "90m", `0.25` -> "250ms"."""
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def size(minimum: int = 1) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        size = parse_size(measure(value))
        if size >= minimum:
            return size
        at_least = f"{minimum // MIB}MB" if minimum >= MIB else f"{minimum}B"
        raise ValueError(f"must be at least {at_least}, got {value!r}")

    return conv


def networks(value: Any) -> tuple[str, ...]:
    """IP addresses or networks ("10.0.0.0/8"), as given."""
    if not isinstance(value, list):
        expected = 'must be an array of addresses or networks such as ["10.0.0.0/8"]'
        raise ValueError(f"{expected}, got {show(value)}")
    problems = []
    for i, text in enumerate(value):
        if not isinstance(text, str):
            example = 'such as "10.0.0.0/8"'
            problems.append(Invalid(f"must be a string {example}, got {show(text)}", f"[{i}]"))
            continue
        try:
            parse_network(text)
        except ValueError as exc:
            why = str(exc) if "/" in text else "host names are not resolved"
            problems.append(Invalid(f"not an IP address or network: {text!r} ({why})", f"[{i}]"))
    if problems:
        raise Problems(problems)
    return tuple(value)


def listen(value: Any) -> tuple[str, int]:
    host, sep, port = "", "", ""
    if isinstance(value, str) and value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    elif isinstance(value, str):
        host, sep, port = value.rpartition(":")
        sep = "" if ":" in host else sep  # a bare IPv6 address needs brackets
    if sep and host and not any(c.isspace() or not c.isprintable() or c in "[]/" for c in host):
        # Port 0 asks the kernel for a free port (the bound one is logged in daemon_ready).
        if port.isascii() and port.isdigit() and 0 <= int(port) <= 65535:
            return host, int(port)
    expected = 'must be "host:port" with a port from 0 to 65535 (IPv6 as "[::1]:8088")'
    raise ValueError(f"{expected}, got {show(value)}")


# A host name's characters (letters of any script: IDNA), or an IPv6 address in brackets.
_HOST_RE = re.compile(r"[\w.-]+|[0-9A-Fa-f:.]+(%[\w.-]+)?")


def url(value: Any) -> str:
    no_port = f"{show(value)} has no valid port (1-65535)"
    try:
        parts = urlsplit(text(value))
        host = parts.hostname
    except ValueError:  # urlsplit rejects some malformed hosts, e.g. "http://[::1"
        parts = host = None
    try:
        port = parts.port if parts is not None else None
    except ValueError:  # not a number, or out of range
        raise ValueError(no_port) from None
    if parts is not None and parts.scheme in ("http", "https") and host:
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"{show(value)} has no valid host name: {host!r}")
        if port == 0:
            raise ValueError(no_port)
        return value
    raise ValueError(f"must be an http:// or https:// URL with a host, got {show(value)}")


def is_secret_ref(value: dict[str, Any]) -> bool:
    """A table like { env = "NAME" }: exactly one secret key, with a string."""
    if len(value) != 1:
        return False
    [(key, ref)] = value.items()
    return key in SECRET_KEYS and isinstance(ref, str)


def hint(word: Any, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return "a table" if isinstance(value, dict) else "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"
