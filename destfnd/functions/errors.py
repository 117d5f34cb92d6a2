"""Segment's function errors; how each maps to an outcome is in shared/PRODUCT.md ("Outcomes")."""

from __future__ import annotations


class EventNotSupported(Exception):
    """The function does not handle this event type (Unsupported Event Type: discarded)."""


class InvalidEventPayload(Exception):
    """The event lacks what the function needs (Message Rejected: discarded)."""


class ValidationError(Exception):
    """The event failed the function's validation (Message Rejected: discarded)."""


class RetryError(Exception):
    """A temporary failure: retried with backoff. `retry_after_s` is a downstream hint that
    the scheduler honours as the minimum wait: seconds, or a Retry-After header's text as it
    came (seconds or an HTTP date)."""

    def __init__(self, message: str = "", retry_after_s: float | str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DropEvent(Exception):
    """Raised by an insert function to drop the event on purpose (status `dropped`)."""
