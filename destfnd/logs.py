"""structlog setup: JSON lines (orjson) to stderr for journald, a console renderer on a TTY.

Log ids, counts and sizes; never payloads, headers or secrets.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import orjson
import structlog

from destfnd.texts import sendable_tree

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


# Control characters (C0 but tab, DEL, C1) as escapes: what a sender or a remote server put
# in a messageId, a log line or a response body must not move the cursor, recolour the
# terminal or forge a line of the output.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r"})
# Bidirectional controls, which reorder what follows them on screen ("Trojan Source"), and
# the Unicode line and paragraph separators.
_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)
_ESCAPES.update({c: f"\\u{c:04x}" for c in _BIDI})


def printable(value: object) -> str:
    """`value` as text that is safe to print on a terminal, on one line."""
    return str(value).translate(_ESCAPES)


class Throttle:
    """Lines of one kind that someone else can make as fast as they like (any client's
    refused requests, a function's stray output): `burst` at once, then `per_s` a second (a
    token bucket). Without it one client flooded the journal, whose own rate limit then
    dropped the lines that matter beside them."""

    def __init__(
        self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_s, self._burst, self._clock = per_s, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self.held = 0  # lines held back since the last one let through

    def room(self) -> int:
        """How many lines would be let through now, one after another."""
        self._refill()
        return int(self._tokens)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
        self._at = now

    def allow(self) -> int | None:
        """None: hold this line back (it is counted). Otherwise how many were held back
        since the last line let through, to be told with this one (`not_logged`)."""
        self._refill()
        if self._tokens < 1:
            self.held += 1
            return None
        self._tokens -= 1
        held, self.held = self.held, 0
        return held

    def fields(self) -> dict | None:
        """`allow` for a log line: None to hold it back, else the fields to add to it
        (`not_logged`, when lines were held back since the last)."""
        held = self.allow()
        if held is None:
            return None
        return {"not_logged": held} if held else {}


def setup(level: str = "info", fmt: str = "auto") -> None:
    json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
        factory = structlog.BytesLoggerFactory(_Tolerant(sys.stderr.buffer))
    else:
        # On a terminal: what a client sent (a path, a header) must not drive it.
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=_printable_traceback)
        processors += [_printable_values, renderer]
        factory = structlog.PrintLoggerFactory(_Tolerant(sys.stderr))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library: to the same stream, in the same
    # format, one line each (its default, with no handler set, is a multi-line traceback).
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(max(_LEVELS.get(level, logging.INFO), logging.WARNING))


def _dumps(value: Any, **kw: Any) -> bytes:
    """orjson's, for a line with a lone surrogate too (a server's reason phrase that was not
    UTF-8, a path): a log line must never take the daemon down."""
    try:
        return orjson.dumps(value, **kw)
    except TypeError:
        return orjson.dumps(sendable_tree(value), **kw)


def _printable_values(_logger: Any, _name: str, event: dict) -> dict:
    return {k: printable(v) if isinstance(v, str) else v for k, v in event.items()}


def _printable_traceback(out: TextIO, exc_info: Any) -> None:
    """A plain traceback, each of its lines escaped as `printable` escapes values, and an
    exception's message on one line: a message may quote what a client sent or a function
    wrote, and its line breaks would start lines of their own (a forged log line, say)."""
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if not isinstance(exc, BaseException):
        text = io.StringIO()
        structlog.dev.plain_traceback(text, exc_info)
        lines = text.getvalue().split("\n")
    else:
        shown = traceback.TracebackException.from_exception(exc)
        _one_line_messages(shown, set())
        lines = "".join(shown.format()).split("\n")
    out.write("\n".join(printable(line) for line in lines))


def _one_line_messages(shown: traceback.TracebackException, seen: set[int]) -> None:
    """The messages of an exception, its causes and its group's members with their line
    breaks escaped (`_str` is what `traceback` prints as the message, 3.11-3.14)."""
    if id(shown) in seen:
        return
    seen.add(id(shown))
    message = getattr(shown, "_str", None)
    if isinstance(message, str):
        shown._str = message.replace("\r", "\\r").replace("\n", "\\n")
    for other in (shown.__cause__, shown.__context__, *(getattr(shown, "exceptions", None) or ())):
        if other is not None:
            _one_line_messages(other, seen)


class _ToStructlog(logging.Handler):
    """A standard-library record as a structlog line: `event` is its message, `logger` its
    name. What a client causes by sending a malformed request or going away in the middle of
    one, which aiohttp's server logs with a traceback although the daemon is fine, is an
    `http_client_error` line at `info`, naming the error, without the traceback, nor the
    bytes aiohttp quotes from the request (a write key, an event); at a bounded rate, as
    anyone can send malformed requests as fast as they like."""

    _client_errors = Throttle(per_s=10.0, burst=100)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            exc = record.exc_info[1] if record.exc_info else None
            # Standard levels only (structlog knows no other): 35 is logged as a warning.
            level = max(lv for lv in _LEVELS.values() if lv <= max(record.levelno, 10))
            fields: dict[str, Any] = {"logger": record.name}
            if exc is not None and record.name.startswith("aiohttp.") and _client_error(exc):
                more = self._client_errors.fields()
                if more is None:
                    return
                fields["error"] = f"{type(exc).__name__}: {_error_words(exc)}"
                log.info("http_client_error", detail=record.getMessage(), **fields, **more)
                return
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            log.log(level, record.getMessage(), **fields)
        except Exception:  # a log line must never take the daemon down
            self.handleError(record)


def _client_error(exc: BaseException) -> bool:
    """A lost connection, or aiohttp's HttpProcessingError (a malformed request), known by
    its module: importing aiohttp here would slow every command down by a tenth of a second."""
    if isinstance(exc, ConnectionError):
        return True
    return any(c.__module__ == "aiohttp.http_exceptions" for c in type(exc).__mro__)


def _error_words(exc: BaseException) -> str:
    """The error's own words, on one line, without what it quotes of the request: aiohttp's
    parse errors add the bytes they stopped at (`Invalid header value char: b'Authorization:
    Basic ...'`, `Bad status line 'POST ...'`), which may hold a write key or an event."""
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    quoted = min((i for i in (text.find("'"), text.find('"')) if i >= 0), default=len(text))
    if quoted < len(text):
        text = text[:quoted].rstrip(" :b")
    return text[:200]


class _Tolerant:
    """stderr whose lines are dropped once nobody reads them (a closed terminal gives EIO, a
    closed pipe EPIPE): the daemon goes on, and stops gracefully, without its log."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        try:
            return self._stream.write(data)
        except OSError:
            return len(data)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass
