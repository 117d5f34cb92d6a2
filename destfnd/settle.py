"""What one attempt's outcome makes of each delivery: its next status and time (the retry
policy), the error kept, its log line and count, and the attempt's Event Delivery record.
Pure bookkeeping: never writes the store or waits (the dispatcher does both)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from destfnd.config import DestinationConfig
from destfnd.outcome import Kind, Outcome, Report, clip_error
from destfnd.redact import redacted_json
from destfnd.retry import decide_retry
from destfnd.store import Claimed, Finished, Status
from destfnd.store.models import Invocation
from destfnd.texts import sendable

_OUTCOME_STATUS = {
    Kind.OK: Status.DELIVERED,
    Kind.DISCARD: Status.DISCARDED,
    Kind.DROP: Status.DROPPED,
}


class Settler:
    def __init__(
        self,
        dest: DestinationConfig,
        log: Any,  # the dispatcher's bound logger
        *,
        rng: random.Random,
        redact: Callable[[str], str],
        log_successes: bool,
    ) -> None:
        self._dest = dest
        self._log = log
        self._rng = rng
        self._redact = redact
        self._log_successes = log_successes
        self.counts: dict[str, int] = {}  # outcomes since the last summary

    def invocation(self, started_at: int, duration_ms: float, report: Report) -> Invocation:
        """The attempt as the Event Delivery view shows it, secrets redacted."""
        redact = self._redact
        return Invocation(
            self._dest.name,
            started_at,
            duration_ms,
            report.version,
            redact(sendable(report.logs)),  # (a webhook's server or a function wrote them)
            redacted_json(redact, report.requests),
        )

    def finished(self, c: Claimed, outcome: Outcome, now: int, duration_ms: float) -> Finished:
        gave_up = ""
        if outcome.kind is Kind.RETRY:
            decision = decide_retry(
                self._dest.retry,
                attempt=c.attempt,
                created_at=c.created_at,
                now=now,
                rng=self._rng,
                retry_after_s=outcome.retry_after_s,
            )
            status, at, gave_up = decision.status, decision.at, decision.why
        else:
            status, at = _OUTCOME_STATUS[outcome.kind], now
        error_type = str(outcome.error_type) if outcome.error_type else None
        message = outcome.message
        if message:  # a server's reason phrase may hold bytes that are not UTF-8
            message = self._redact(sendable(message))
        if message:  # a function's error can be any size
            message = clip_error(message)
        if gave_up:
            message = f"{message}; gave up: {gave_up}" if message else f"gave up: {gave_up}"
        finished = Finished(c.delivery_id, status, at, error_type, message, c.attempt, now)
        key = str(status)  # a plain str: orjson refuses enum keys
        self.counts[key] = self.counts.get(key, 0) + 1
        if status is Status.DELIVERED and not self._log_successes:
            return finished  # the hot path: one line per success only at level = "debug"
        fields = {
            "message_id": c.message_id,
            "attempt": c.attempt,
            "status": str(status),
            "duration_ms": duration_ms,
        }
        if status is Status.DELIVERED:
            self._log.debug("delivery_attempted", **fields)
            return finished
        fields.update(error_type=error_type, error=message)
        if status is Status.RETRYING:
            fields["retry_in_s"] = round((at - now) / 1000, 3)
        if status is Status.DROPPED:
            self._log.debug("delivery_attempted", **fields)
        else:
            self._log.warning("delivery_failed", **fields)
        return finished

    def summary(self) -> dict[str, int] | None:
        """The counts since the last summary, then starts again; None if nothing happened."""
        counts, self.counts = self.counts, {}
        return counts or None
