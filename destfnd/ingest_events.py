"""The events of a parsed Tracking API body: a batch's limits, then each message validated,
enriched and serialized as Segment does, with the destinations its `integrations` leave on.
No I/O and no store; what it refuses is a `Rejected`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from destfnd import spec
from destfnd.config import ENRICH_ALLOWANCE_BYTES, ServerConfig
from destfnd.ingest_body import Rejected
from destfnd.store import IncomingEvent


class Messages:
    """What ingest stores of a body, under `server`'s limits."""

    def __init__(self, server: ServerConfig) -> None:
        self._server = server
        self._skip_invalid = server.invalid_events == "skip"
        self._received_cache: tuple[int, datetime, str] = (-1, datetime.now(UTC), "")

    def _received(self, now_s: float) -> tuple[datetime, str]:
        """receivedAt as a datetime and as text; the text is reused within a millisecond."""
        now_ms = int(now_s * 1000)
        if now_ms != self._received_cache[0]:
            at = datetime.fromtimestamp(now_ms / 1000, UTC)
            self._received_cache = (now_ms, at, spec.format_timestamp(at))
        return self._received_cache[1], self._received_cache[2]

    def _check_merged_size(self, body: object) -> None:
        """Refused before the batch's context and integrations are copied into each message:
        the copies alone took hundreds of MB for a body of a few KB."""
        if not isinstance(body, dict) or not isinstance(batch := body.get("batch"), list):
            return
        shared = [body.get(key) for key in ("context", "integrations")]
        shared = [value for value in shared if isinstance(value, dict) and value]
        if not shared:
            return
        try:
            copied = len(batch) * sum(len(orjson.dumps(value)) for value in shared)
        except TypeError:  # nested too deep to write: each event is refused for it, below
            return
        if copied > self._server.max_merged_bytes:
            raise Rejected(413, "request too large", self._merged_detail())

    def _merged_detail(self) -> str:
        return (
            f"its events take over {self._server.max_merged_bytes} bytes once the batch's "
            "context and integrations are merged into each (server.max_merged_size)"
        )

    def prepare(
        self,
        body: object,
        endpoint_type: str | None,
        now_s: float,
        ip: str | None,
        destinations: Sequence[str],
        routes: Sequence[tuple[str, str]],
    ) -> tuple[list[IncomingEvent], list[Sequence[str]] | None, list[str], int]:
        """The events of `body`, validated, enriched and serialized; `ip` goes into the
        `context.ip` of each event that has none (Segment does so for client-side sources;
        an event that wants no address recorded sends its own, such as "0.0.0.0"). With them,
        each event's own destinations if an event's `integrations` turns some of the source's
        `destinations` off (`routes`: each with its key there), else None; and, with
        `server.invalid_events = "skip"`, why each invalid event was left out (else an
        invalid event refuses the request); and the events' bytes in all."""
        if endpoint_type is None:
            # Counted before anything is copied into each message: 2 KB of gzip can hold
            # 700,000 empty ones.
            batch = body.get("batch") if isinstance(body, dict) else None
            limit = self._server.max_batch_events
            if isinstance(batch, list) and len(batch) > limit:
                raise Rejected(400, "batch too large", f"{len(batch)} events; at most {limit}")
            self._check_merged_size(body)
        try:
            messages = spec.expand(body, endpoint_type, lenient=self._skip_invalid)
        except spec.SpecError as exc:
            raise Rejected(400, "invalid request", str(exc)) from None
        received_at, received_text = self._received(now_s)
        max_bytes = self._server.max_event_bytes + ENRICH_ALLOWANCE_BYTES
        prefix = "batch[{}]." if endpoint_type is None else ""
        events = []
        only: list[Sequence[str]] | None = None
        skipped: list[str] = []
        total = 0
        for index, message in enumerate(messages):
            path = prefix.format(index)
            try:
                times = spec.check(message, path)
                if ip is not None:
                    spec.fill_ip(message, ip)
                spec.enrich(
                    message, received_at, times=times, received_text=received_text, path=path
                )
                # A copy of exact size: orjson's output keeps the buffer it wrote into, 4 KB
                # for a small event and about 10 times a 3 KB one's size (orjson 3.13), and
                # the payloads wait in memory until their commit: a 2,500-event batch of
                # small events held 10 MB instead of 1.
                payload = memoryview(orjson.dumps(message)).tobytes()
            except (spec.SpecError, TypeError) as exc:
                if isinstance(exc, spec.SpecError):
                    why = str(exc)
                else:  # orjson writes at most 254 levels of nesting
                    deep = "nested more than 254 levels deep" if "Recursion" in str(exc) else exc
                    why = f"{path or 'body'}: {deep}"
                if not self._skip_invalid:
                    raise Rejected(400, "invalid event", why) from None
                skipped.append(why)
                continue
            if len(payload) > max_bytes:
                where = f"batch[{index}]" if endpoint_type is None else "event"
                raise Rejected(
                    413,
                    "event too large",
                    f"{where}: {len(payload)} bytes with destfnd's fields; at most "
                    f"{self._server.max_event_bytes} + {ENRICH_ALLOWANCE_BYTES}",
                )
            total += len(payload)
            if total > self._server.max_merged_bytes:
                raise Rejected(413, "request too large", self._merged_detail())
            integrations = message.get("integrations")
            targets = spec.routed(routes, integrations) if integrations else None
            if targets is not None and only is None:
                only = [destinations] * len(events)
            if only is not None:
                only.append(destinations if targets is None else targets)
            events.append(IncomingEvent(message["messageId"], payload))
        return events, only, skipped, total
