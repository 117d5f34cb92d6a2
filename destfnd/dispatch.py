"""One dispatcher per destination: lease due deliveries, deliver them with bounded concurrency
(one by one, or in batches), and record each outcome. Never touches another destination.

A feeder leases work into memory, `concurrency` workers deliver it, a flusher group-commits
the outcomes. Nothing here blocks on another destination: each has its own tasks and session.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

from destfnd.config import DestinationConfig
from destfnd.outcome import ErrorType, Report, retry, same_for_all
from destfnd.settle import Settler
from destfnd.store import Claimed, Finished, Status, StoreError, Writer
from destfnd.store import queue as q
from destfnd.store.models import Invocation

log = structlog.get_logger("destfnd.dispatch")

_IDLE_POLL_S = 1.0  # re-check for due work at least this often when nothing woke us

# A failed store write (a full disk) is tried again after this long, doubling up to the second.
_STORE_RETRY_S = (1.0, 10.0)


class Deliverer(Protocol):
    """A destination's way of delivering. One may say, as `timeouts` (an int), how many of
    the destination's `timeout` a delivery can take at most (default 2): the dispatcher's
    guard allows for that many, and GUARD_SLACK_S."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def deliver(self, payloads: list[bytes], batched: bool) -> Report: ...


_BATCHES_PER_CLAIM = 8  # batched destinations: full batches leased per claim, at most
_CLAIM_ROWS = 1000  # ... unless that is more rows than this (then one batch per claim)


# Beyond a delivery's `timeouts`: the starts of workers, a timeout's ending, the loop's lags.
GUARD_SLACK_S = 10.0


def delivery_bound_s(timeout_s: float, deliverer: Deliverer) -> float:
    """How long the dispatcher lets one delivery take (its guard): `timeouts` of the
    destination's `timeout`, as the deliverer counts them (2 by default), and GUARD_SLACK_S."""
    return timeout_s * getattr(deliverer, "timeouts", 2) + GUARD_SLACK_S


def now_ms() -> int:
    return int(time.time() * 1000)


T = TypeVar("T")


async def _despite_cancel(write: asyncio.Future[T]) -> T | None:
    """What came of a write whose caller was cancelled while it was on its way: the writer
    cannot take a write back, so it is waited for (a group: milliseconds). None if it failed,
    or a second cancellation came first (then what it did is found at the next start)."""
    try:
        return await asyncio.shield(write)
    except (Exception, asyncio.CancelledError):
        return None


class Dispatcher:
    def __init__(
        self,
        dest: DestinationConfig,
        writer: Writer,
        deliverer: Deliverer,
        *,
        clock: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
        redact: Callable[[str], str] = str,
        on_recorded: Callable[[int], None] = lambda size: None,
        summary_every_s: float = 60.0,
        log_successes: bool = False,
    ) -> None:
        self.dest = dest
        self._writer = writer
        self._deliverer = deliverer
        self._clock = clock
        self._on_recorded = on_recorded
        self._summary_every_s = summary_every_s
        self._batch = dest.batch
        # Units of work leased but not started: enough to keep every worker busy between claims.
        self._max_units = max(2 * dest.concurrency, 2 if self._batch else 64)
        self._units: deque[list[Claimed]] = deque()
        self._held: list[Claimed] = []  # a batch being filled by the feeder
        self._running: dict[int, list[Claimed]] = {}  # worker -> unit in delivery
        self._outcomes: list[tuple[list[Finished], Invocation | None]] = []
        self._wake = asyncio.Event()  # new work may be due (ingest, a retry, stop)
        self._unit_ready = asyncio.Event()
        self._room = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()  # set with _stopping: ends a wait after a store failure
        self._store_wait_s: dict[str, float] = {}  # op -> its last wait, while it fails
        self._workers_left = dest.concurrency
        self._paused_until = 0.0  # monotonic: no delivery starts before (the downstream asked)
        self._log = log.bind(destination=dest.name)
        self._settle = Settler(
            dest, self._log, rng=rng or random.Random(), redact=redact,
            log_successes=log_successes,
        )  # fmt: skip

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop leasing and starting work; what is in delivery finishes (see daemon drain)."""
        self._stopping = True
        for event in (self._wake, self._unit_ready, self._room, self._flush_wake, self._stopped):
            event.set()

    async def run(self) -> None:
        """Deliver until stopped; the deliverer was started by the daemon, closed here."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._feed(), name=f"feed:{self.dest.name}")
                for i in range(self.dest.concurrency):
                    tg.create_task(self._work(i), name=f"deliver:{self.dest.name}:{i}")
                tg.create_task(self._flush_loop(), name=f"flush:{self.dest.name}")
        finally:
            # Cancelled or stopped: record what finished, give back every lease not finished.
            unfinished = [c for unit in self._units for c in unit] + self._held
            unfinished += [c for unit in self._running.values() for c in unit]
            self._units.clear()
            self._held = []
            self._running.clear()
            outcomes, self._outcomes = self._outcomes, []
            ids = [c.delivery_id for c in unfinished]
            now = self._clock()

            def settle(conn):
                q.finish_batches(conn, [outcomes])
                q.release(conn, ids, now)

            try:
                if ids or outcomes:  # (nothing to write: no line saying it was not written)
                    await self._writer.run(settle)
            except StoreError as exc:
                # Nothing is lost: at the next start the leases are due again (attempts kept),
                # and deliveries whose outcome was not recorded are sent again (at least once).
                self._log.error(
                    "leases_not_released", deliveries=len(ids), outcomes=len(outcomes),
                    error=str(exc),
                )  # fmt: skip
                ids = []
            finally:
                await self._deliverer.close()
            if ids:
                self._log.info("leases_released", deliveries=len(ids))

    # -- feeder ------------------------------------------------------------------------------

    async def _feed(self) -> None:
        name = self.dest.name
        batch_started = 0.0
        while not self._stopping:
            if (pause_s := self._paused_until - time.monotonic()) > 0:
                # Nothing is leased while the destination pauses: a lease counts the attempt
                # (and a crash meanwhile would keep that count for an attempt never made).
                await self._sleep_unless_stopped(pause_s)
                continue
            if len(self._units) >= self._max_units:
                self._room.clear()
                await self._room.wait()
                continue
            if self._batch:
                # Several batches per claim (one writer round trip feeds several workers),
                # as long as a claim stays small enough not to hold the writer long.
                max_events = self._batch.max_events
                room = self._max_units - len(self._units)
                batches = max(1, min(_BATCHES_PER_CLAIM, room, _CLAIM_ROWS // max_events))
                limit = max_events * batches - len(self._held)
            else:
                limit = self._max_units - len(self._units)
            self._wake.clear()
            now = self._clock()
            claim = asyncio.ensure_future(
                self._writer.run_batched(q.claim_many, (name, now, limit))
            )
            try:
                claimed, next_due = await asyncio.shield(claim)
            except asyncio.CancelledError:
                # Cancelled (a drain that ran out) with the claim on its way: it commits all
                # the same, so its leases go to the final settle, which gives them back
                # (else they stayed leased, an attempt counted that was never made).
                done = await _despite_cancel(claim)
                if done is not None:
                    self._held.extend(done[0])
                raise
            except StoreError as exc:
                if self._held and time.monotonic() - batch_started >= self._batch.max_wait_s:
                    self._push(self._held)  # leased already: deliver it meanwhile
                    self._held = []
                await self._store_failed("claim", exc)
                continue
            self._store_wait_s.pop("claim", None)
            if self._stopping:
                self._held.extend(claimed)
                return
            if claimed and self._paused_until > time.monotonic():
                # The pause started while this claim was on its way: given back as those
                # waiting were (held through the pause, they showed in flight, and a crash
                # meanwhile counted them an attempt never made).
                size = self._batch.max_events if self._batch else 1  # units, if kept
                await self._give_back([claimed[i : i + size] for i in range(0, len(claimed), size)])
                continue
            wait_s = _IDLE_POLL_S
            if next_due is not None:
                wait_s = min(wait_s, max(0.0, (next_due - self._clock()) / 1000))
            if self._batch:
                max_events = self._batch.max_events
                if claimed and not self._held:
                    batch_started = time.monotonic()
                self._held.extend(claimed)
                if len(self._held) >= max_events:
                    while len(self._held) >= max_events:
                        self._push(self._held[:max_events])
                        del self._held[:max_events]
                    batch_started = time.monotonic()  # what is left starts its own wait
                    continue
                if self._held:
                    left_s = batch_started + self._batch.max_wait_s - time.monotonic()
                    if left_s <= 0:
                        self._push(self._held)
                        self._held = []
                        continue
                    wait_s = min(wait_s, left_s)
                if claimed:
                    continue  # more may be due right now
            elif claimed:
                for c in claimed:
                    self._units.append([c])
                self._unit_ready.set()
                continue
            # Nothing was claimable: never spin, even if next_due says "now" (a clock step).
            try:
                await asyncio.wait_for(self._wake.wait(), max(wait_s, 0.005))
            except TimeoutError:
                pass

    def _push(self, unit: list[Claimed]) -> None:
        self._units.append(unit)
        self._unit_ready.set()

    # -- workers -----------------------------------------------------------------------------

    async def _work(self, worker: int) -> None:
        try:
            while True:
                while not self._units and not self._stopping:
                    self._unit_ready.clear()
                    await self._unit_ready.wait()
                if self._stopping:
                    return
                while (pause_s := self._paused_until - time.monotonic()) > 0:
                    await self._sleep_unless_stopped(pause_s)
                    if self._stopping:
                        return
                if not self._units:  # another worker took it meanwhile
                    continue
                unit = self._units.popleft()
                self._room.set()
                self._running[worker] = unit
                await self._deliver(unit)
                del self._running[worker]
        finally:
            self._workers_left -= 1
            self._flush_wake.set()

    async def _deliver(self, unit: list[Claimed]) -> None:
        started_at = self._clock()
        started = time.monotonic()
        # The deliverer enforces `timeout` itself; this guard catches one that does not.
        guard_s = delivery_bound_s(self.dest.timeout_s, self._deliverer)
        try:
            async with asyncio.timeout(guard_s):
                report = await self._deliverer.deliver(
                    [c.payload for c in unit], self._batch is not None
                )
            if len(report.outcomes) != len(unit):
                raise RuntimeError(f"{len(report.outcomes)} outcomes for {len(unit)} events")
        except TimeoutError:
            report = same_for_all(
                retry(ErrorType.TIMEOUT, f"no result within {guard_s:g}s"), len(unit)
            )
        except Exception as exc:  # a task boundary: one delivery
            self._log.exception("deliverer_crashed")
            failed = retry(ErrorType.RETRY, f"internal error: {type(exc).__name__}: {exc}")
            report = same_for_all(failed, len(unit))
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        if report.pause_s and self._pause(report.pause_s):
            await self._give_back_waiting()
        now = self._clock()
        invocation = self._settle.invocation(started_at, duration_ms, report)
        finished = [
            self._settle.finished(claimed, outcome, now, duration_ms)
            for claimed, outcome in zip(unit, report.outcomes, strict=True)
        ]
        self._outcomes.append((finished, invocation))
        self._flush_wake.set()

    def _pause(self, asked_s: float) -> bool:
        """No delivery of this destination starts for `asked_s` (at most `max_age`): the
        downstream asked every request to wait, not only the one it refused, and the others
        would each burn an attempt on the same answer meanwhile. True if a pause starts."""
        pause_s = min(asked_s, self.dest.retry.max_age_s)
        until = time.monotonic() + pause_s
        if until <= self._paused_until:
            return False
        started = until > self._paused_until + 1  # once per pause, not per refused request
        if started:
            self._log.info("destination_paused", seconds=round(pause_s, 3))
        self._paused_until = until
        return started

    async def _give_back_waiting(self) -> None:
        """The deliveries leased but not started go back to the queue, their attempt not
        counted: during the pause they are not in flight (as `stats` would say), and a crash
        meanwhile would count an attempt never made. The feeder leases them again after."""
        units, self._units = list(self._units), deque()
        if self._held:
            units.append(self._held)  # a batch being filled
            self._held = []
        self._room.set()
        await self._give_back(units)

    async def _give_back(self, units: list[list[Claimed]]) -> None:
        waiting = [c.delivery_id for unit in units for c in unit]
        if not waiting:
            return
        try:
            await self._writer.run(q.release, waiting, self._clock())
        except StoreError:  # kept leased: delivered after the pause, or recovered at start
            self._units.extend(units)
            self._unit_ready.set()
            self._log.warning("leases_not_released", deliveries=len(waiting))

    async def _store_failed(self, op: str, exc: StoreError) -> None:
        """A store write failed (say the disk is full): its transaction changed nothing, so
        wait and let the caller try again, longer each time in a row, instead of crashing the
        daemon; a stop ends the wait."""
        first, longest = _STORE_RETRY_S
        wait_s = min(longest, max(first, 2 * self._store_wait_s.get(op, 0.0)))
        self._store_wait_s[op] = wait_s
        self._log.warning("store_write_failed", op=op, error=str(exc), retry_in_s=wait_s)
        await self._sleep_unless_stopped(wait_s)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """Wait `seconds`, or less if a stop comes meanwhile."""
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except TimeoutError:
            pass

    # -- outcomes ----------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        last_summary = time.monotonic()
        while True:
            # Draining after a failed write: no more tries here, only wait for the workers.
            given_up = self._stopping and "record outcomes" in self._store_wait_s
            if not self._outcomes or given_up:
                if self._workers_left == 0:
                    if counts := self._settle.summary():  # since the last one, at shutdown
                        self._log.info("delivery_summary", **counts)
                    return  # outcomes not written yet: run() tries once more
                self._flush_wake.clear()
                try:
                    await asyncio.wait_for(self._flush_wake.wait(), self._summary_every_s)
                except TimeoutError:
                    pass
                if given_up:
                    continue
            if self._outcomes:
                outcomes, self._outcomes = self._outcomes, []
                write = asyncio.ensure_future(self._writer.run_batched(q.finish_batches, outcomes))
                try:
                    self._on_recorded(await asyncio.shield(write))
                except asyncio.CancelledError:
                    # The write commits all the same: settled at stop only if it did not
                    # (else recorded twice, its first invocation records left unreferenced).
                    sizes = await _despite_cancel(write)
                    if sizes is None:
                        self._outcomes[:0] = outcomes
                    else:
                        self._on_recorded(sizes)
                    raise
                except StoreError as exc:
                    self._outcomes[:0] = outcomes  # kept, to be recorded later or at stop
                    if not self._stopping:
                        await self._store_failed("record outcomes", exc)
                        continue
                    # Draining (a stop would end each wait at once): give up until the
                    # workers are done; run() then tries once more.
                    self._store_wait_s["record outcomes"] = _STORE_RETRY_S[0]
                    self._log.warning("store_write_failed", op="record outcomes", error=str(exc))
                    continue
                except BaseException:
                    self._outcomes[:0] = outcomes  # settled at stop
                    raise
                self._store_wait_s.pop("record outcomes", None)
                if any(f.status is Status.RETRYING for done, _ in outcomes for f in done):
                    self._wake.set()  # the feeder recomputes when the next retry is due
            if time.monotonic() - last_summary >= self._summary_every_s:
                if counts := self._settle.summary():
                    self._log.info("delivery_summary", **counts)
                    last_summary = time.monotonic()
