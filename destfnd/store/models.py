"""The values that cross the store boundary."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class Status(StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    DISCARDED = "discarded"
    DROPPED = "dropped"
    EXPIRED = "expired"


class IncomingEvent(NamedTuple):
    """An accepted event on its way in. A NamedTuple, not a frozen dataclass: one is made per
    event on the hot path, and a tuple is several times cheaper to build."""

    message_id: str
    payload: bytes  # the enriched event as JSON


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery leased to the dispatcher, with its event."""

    delivery_id: int
    event_id: int
    attempt: int  # 1 for the first try
    created_at: int  # unix ms
    message_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """What became of one attempt: a terminal status, or a retry at `next_at`."""

    delivery_id: int
    status: Status
    at: int  # unix ms: finished_at, or next_at for a retry
    error_type: str | None = None
    error: str | None = None
    attempt: int = 0  # which attempt this was; 0 = not recorded in `attempts`
    ended_at: int = 0  # unix ms, when the attempt ended (`at` is the next try for a retry)


@dataclass(frozen=True, slots=True)
class Invocation:
    """One webhook request or function call, shared by the attempts of the events in it."""

    destination: str
    started_at: int  # unix ms
    duration_ms: float
    version: str | None
    logs: str
    requests: bytes  # JSON array
