"""What one delivery attempt came to, in Segment's taxonomy (shared/PRODUCT.md, "Outcomes")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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


def same_for_all(outcome: Outcome, n: int, **record: object) -> Report:
    return Report((outcome,) * n, **record)  # type: ignore[arg-type]
