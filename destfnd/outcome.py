"""What one delivery attempt came to, in Segment's taxonomy (shared/PRODUCT.md, "Outcomes")."""

from __future__ import annotations

import email.utils
import math
import re
from dataclasses import dataclass
from datetime import UTC
from enum import StrEnum

MAX_ERROR_CHARS = 4096  # of an error message, stored and logged (an exception can hold megabytes)
_CLIPPED = re.compile(r"\.\.\. \[[\d,]{1,19} characters in all\]\Z")


def clip_error(message: str) -> str:
    """An error message of at most MAX_ERROR_CHARS, saying how long it was. One clipped
    already (by the worker, which clips what it sends) is left as it is."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    if len(message) <= MAX_ERROR_CHARS + 48:  # the note is at most 44 characters
        found = _CLIPPED.search(message, MAX_ERROR_CHARS)
        if found is not None and found.start() == MAX_ERROR_CHARS:
            return message
    return clip(message, MAX_ERROR_CHARS)


def clip(text: str, limit: int) -> str:
    """`text` of at most `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text):,} characters in all]"


class Kind(StrEnum):
    OK = "ok"  # delivered
    RETRY = "retry"  # retried with backoff, then expired
    DISCARD = "discard"  # discarded with a recorded reason
    DROP = "drop"  # dropped on purpose by an insert function


class ErrorType(StrEnum):
    RETRY = "Retry"
    TIMEOUT = "Timeout"
    MESSAGE_REJECTED = "Message Rejected"
    UNSUPPORTED_EVENT_TYPE = "Unsupported Event Type"
    BAD_REQUEST = "Bad Request"
    INVALID_SETTINGS = "Invalid Settings"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    error_type: ErrorType | None = None
    message: str | None = None
    retry_after_s: float | None = None  # a downstream hint (Retry-After), honoured as a minimum


DELIVERED = Outcome(Kind.OK)
# Statuses of an answer that ask for another try (PRODUCT.md): 5xx, 408 and 429.
_RETRY_STATUSES = frozenset({408, 429})


def retried_status(status: int) -> bool:
    """Whether an HTTP status (a webhook's answer, an `on_batch` item's) is retried, rather
    than delivered (2xx) or discarded (another 4xx)."""
    return status >= 500 or status in _RETRY_STATUSES


def retry(error_type: ErrorType, message: str, retry_after_s: float | None = None) -> Outcome:
    return Outcome(Kind.RETRY, error_type, message, retry_after_s)


def discard(error_type: ErrorType, message: str) -> Outcome:
    return Outcome(Kind.DISCARD, error_type, message)


@dataclass(frozen=True, slots=True)
class Report:
    """One invocation (a webhook request, a function call) for a unit of events: an outcome
    per event, plus what the Event Delivery view shows (logs, outgoing requests, version)."""

    outcomes: tuple[Outcome, ...]
    logs: str = ""
    requests: tuple[dict, ...] = ()
    version: str | None = None
    # The downstream asked for a pause of every delivery, not only these (a webhook's 429 or
    # 503 with Retry-After: rate limited, or down for maintenance), in seconds.
    pause_s: float | None = None


def same_for_all(outcome: Outcome, n: int, **record: object) -> Report:
    return Report((outcome,) * n, **record)  # type: ignore[arg-type]


# A wait longer than this (about 31 years) is this: past any max_age, and still an integer
# of milliseconds, where 1e300 or infinity would not be.
MAX_RETRY_AFTER_S = 1e9


def retry_after_hint(value: object) -> float | None:
    """A downstream hint as seconds to wait, clamped to 0..MAX_RETRY_AFTER_S; None if it is
    no number (from a user's function anything is possible)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):  # any size: 10**400 is no float
        return float(min(max(value, 0), int(MAX_RETRY_AFTER_S)))
    return None if math.isnan(value) else min(max(value, 0.0), MAX_RETRY_AFTER_S)


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (fractions allowed) or an
    HTTP date; None if it is neither."""
    if not value:
        return None
    value = value.strip()
    try:
        return retry_after_hint(float(value)) if value.isascii() else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": UTC, not this host's zone
            when = when.replace(tzinfo=UTC)
        return retry_after_hint(when.timestamp() - now_s)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
