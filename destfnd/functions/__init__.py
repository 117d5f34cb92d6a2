"""What user functions import: Segment's errors, `fetch`, `cache`.

Imported only in worker processes (and by user code), never by the daemon process.
"""

from __future__ import annotations

from destfnd.functions.cache import cache
from destfnd.functions.errors import (
    DropEvent,
    EventNotSupported,
    InvalidEventPayload,
    RetryError,
    ValidationError,
)
from destfnd.functions.fetching import FetchError, Response, fetch

__all__ = [
    "DropEvent",
    "EventNotSupported",
    "FetchError",
    "InvalidEventPayload",
    "Response",
    "RetryError",
    "ValidationError",
    "cache",
    "fetch",
]
