"""The one writer: every write runs on one SQLite connection in one thread, group-committed.

Callers submit small functions of the connection; whatever has queued up while the previous
transaction committed runs next, together, in one `BEGIN IMMEDIATE ... COMMIT` (one fsync),
except that urgent work (ingest: a client waits) may go first, alone (see `run_batched`).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import structlog

from destfnd.store.db import StoreError, transaction

log = structlog.get_logger("destfnd.store")

T = TypeVar("T")
# Before it takes a group, the writer lets the event loop turn while each turn brings more
# work, up to this many turns: under load a group then holds about all 64 in-flight requests
# instead of half, which halves each request's share of the commit (its statements, its
# fsync): +10-15% single-event ingest here. A turn that brings nothing ends it, so an idle
# daemon adds one loop turn (microseconds) to a request's latency.
GATHER_TURNS = 16
# A group's urgent work (ingest) holds at most this many bytes of events, unless one request
# alone is more; what is over waits for the next group. Small requests (a single event, a
# small batch) go first, so that one source posting big batches (a few KB of gzip can be
# 8 MB of events) does not hold up everyone else's for seconds.
GROUP_BYTES = 16 * 1024 * 1024
SMALL_BYTES = 64 * 1024
Op = Callable[[sqlite3.Connection], Any]  # or a _Batched item


def _resolve(group: list[tuple[Op, asyncio.Future]], results: list[tuple[bool, Any]]) -> None:
    for (_, future), (ok, value) in zip(group, results, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _call(op: Callable[..., Any], args: tuple, conn: sqlite3.Connection) -> Any:
    return op(conn, *args)


class Deferred(Protocol):
    """Work the writer does between groups, a `step` at a time in a short transaction of its
    own, while `pending()`: after a group's waiters are answered, never inside their
    transaction (a slice of the dedupe keys' flush or of their filter's fill; it delays the
    next group by its few milliseconds)."""

    def pending(self) -> bool: ...

    def step(self, conn: sqlite3.Connection) -> Any: ...


class Writer:
    def __init__(self, conn: sqlite3.Connection, deferred: Deferred | None = None) -> None:
        self._conn = conn
        self._deferred = deferred
        self._queue: list[tuple[Op, asyncio.Future]] = []
        self._urgent: list[tuple[Op, asyncio.Future]] = []  # a client waits: see run_batched
        self._wake = asyncio.Event()
        self._closing = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="destfnd-sqlite")
        self.groups = 0  # transactions committed, for tests and stats

    async def run(self, op: Callable[..., T], *args: Any) -> T:
        """Run `op(conn, *args)` inside the next group's transaction; return once committed.

        If `op` raises, the error is raised here and the rest of the group still commits.
        """
        if self._closing:
            raise StoreError("the store is closing")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((functools.partial(_call, op, args), future))
        self._wake.set()
        return await future

    async def run_batched(
        self,
        fn: Callable[[sqlite3.Connection, list], list],
        item: Any,
        *,
        urgent: bool = False,
        size: int = 0,
    ) -> Any:
        """Like `run`, for work that is cheaper done together: every item submitted with the
        same `fn` before the group starts goes to one call `fn(conn, items)`, which returns
        one result per item (this item's is returned here).

        `urgent`: a client waits for it (ingest). When both kinds wait, every other group
        takes the urgent work alone, so a client waits for at most one group with other work
        in it, however busy delivery keeps the writer. `size`: the item's bytes, for an
        urgent one (see GROUP_BYTES)."""
        if self._closing:
            raise StoreError("the store is closing")
        future = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._queue).append((_Batched(fn, item, size), future))
        self._wake.set()
        return await future

    async def serve(self) -> None:
        """Commit groups until `close()` and the queue is empty. Owned by the daemon."""
        loop = asyncio.get_running_loop()
        try:
            alone = False  # the last group was urgent work alone, the other work waiting
            while True:
                if not self._queue and not self._urgent:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for _ in range(GATHER_TURNS):
                    waiting = len(self._urgent) + len(self._queue)
                    await asyncio.sleep(0)
                    if len(self._urgent) + len(self._queue) == waiting:
                        break
                if self._urgent and self._queue and not alone:
                    group, self._urgent = _within_bytes(self._urgent)
                    alone = True
                else:
                    urgent, self._urgent = _within_bytes(self._urgent)
                    group, self._queue = urgent + self._queue, []
                    alone = False
                running = loop.run_in_executor(self._thread, self._commit, group)
                try:
                    results = await asyncio.shield(running)
                except asyncio.CancelledError:
                    # The thread cannot be stopped: let it finish, answer its waiters (the
                    # rows are committed), then stop.
                    _resolve(group, await running)
                    raise
                self.groups += 1
                _resolve(group, results)
                if self._deferred is not None and self._deferred.pending():
                    await self._run_deferred(loop)
        finally:
            self._closing = True  # also when cancelled or crashed: later run() calls fail fast
            for _, future in self._urgent + self._queue:
                if not future.done():
                    future.set_exception(StoreError("the store closed before this write ran"))
            self._urgent, self._queue = [], []

    async def _run_deferred(self, loop: asyncio.AbstractEventLoop) -> None:
        # Not shielded: if cancelled, the thread still finishes it before shutdown() returns.
        try:
            await loop.run_in_executor(self._thread, self._deferred.step, self._conn)  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            # Nothing is lost: the work stays due and is tried again after the next group.
            log.warning("store_deferred_failed", error=str(exc))

    def close(self) -> None:
        """Stop taking work; `serve` returns once what is queued has committed."""
        self._closing = True
        self._wake.set()

    def checkpoint(self) -> tuple[int, int, int]:
        """`PRAGMA wal_checkpoint(FULL)` on the writer's connection, once `serve` has ended:
        (busy, pages in the WAL, pages moved into the database file)."""
        return self._conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)
        self._conn.close()

    def _commit(self, group: list[tuple[Op, asyncio.Future]]) -> list[tuple[bool, Any]]:
        """One transaction for the whole group. If an op raises, nothing of the group is kept
        and each op runs again in a transaction of its own, so that only that op fails (rare:
        the ops are destfnd's own; savepoints around every op would cost each request more)."""
        try:
            return [(True, r) for r in self._transaction([op for op, _ in group])]
        except _OpFailed:
            pass
        except sqlite3.Error as exc:
            error = StoreError(f"commit failed: {exc}")
            return [(False, error) for _ in group]
        results: list[tuple[bool, Any]] = []
        for op, _ in group:
            try:
                results.append((True, self._transaction([op])[0]))
            except _OpFailed as failed:
                results.append((False, failed.error))
            except sqlite3.Error as exc:
                results.append((False, StoreError(f"commit failed: {exc}")))
        return results

    def _transaction(self, ops: list[Op]) -> list[Any]:
        conn = self._conn
        with transaction(conn):
            results: list[Any] = [None] * len(ops)
            batches: dict[Callable, list[int]] = {}
            for index, op in enumerate(ops):
                if isinstance(op, _Batched):
                    batches.setdefault(op.fn, []).append(index)
            for index, op in enumerate(ops):
                try:
                    if not isinstance(op, _Batched):
                        results[index] = op(conn)
                    elif batches[op.fn][0] == index:  # the batch runs at its first item
                        members = batches[op.fn]
                        out = op.fn(conn, [ops[i].item for i in members])  # type: ignore[union-attr]
                        for i, result in zip(members, out, strict=True):
                            results[i] = result
                except Exception as exc:
                    error = StoreError(str(exc)) if isinstance(exc, sqlite3.Error) else exc
                    raise _OpFailed(error) from exc
        return results


def _within_bytes(
    urgent: list[tuple[Op, asyncio.Future]],
) -> tuple[list[tuple[Op, asyncio.Future]], list[tuple[Op, asyncio.Future]]]:
    """The urgent work of the next group, and what waits for the one after: small items first,
    in order, then big ones in order, while the group stays under GROUP_BYTES; one big item
    always (none waits for ever), and every item of no size (not ingest)."""
    sizes = [op.size if isinstance(op, _Batched) else 0 for op, _ in urgent]
    if sum(sizes) <= GROUP_BYTES:
        return urgent, []
    take = [False] * len(urgent)
    room = GROUP_BYTES
    for i, size in enumerate(sizes):
        if size <= SMALL_BYTES and size <= room:
            take[i], room = True, room - size
    first_big = True
    for i, size in enumerate(sizes):
        if size > SMALL_BYTES:
            if size > room and not first_big:
                break  # the rest wait, in order
            take[i], room, first_big = True, room - size, False
    taken = [entry for entry, yes in zip(urgent, take, strict=True) if yes]
    left = [entry for entry, yes in zip(urgent, take, strict=True) if not yes]
    return taken, left


class _Batched:
    __slots__ = ("fn", "item", "size")

    def __init__(self, fn: Callable, item: Any, size: int = 0) -> None:
        self.fn = fn
        self.item = item
        self.size = size


class _OpFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
