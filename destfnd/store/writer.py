"""The one writer: every write runs on one SQLite connection in one thread, group-committed.

Callers submit small functions of the connection; whatever has queued up while the previous
transaction committed runs next, together, in one `BEGIN IMMEDIATE ... COMMIT` (one fsync).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from destfnd.store.db import StoreError

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]


def _call(op: Callable[..., Any], args: tuple, conn: sqlite3.Connection) -> Any:
    return op(conn, *args)


class Writer:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._queue: list[tuple[Op, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="destfnd-sqlite")
        self.groups = 0  # transactions committed, for tests and stats

    async def run(self, op: Callable[..., T], *args: Any) -> T:
        """Run `op(conn, *args)` inside the next group's transaction; return once committed.

        If `op` raises, only its own savepoint is rolled back and the error is raised here.
        """
        if self._closing:
            raise StoreError("the store is closing")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((functools.partial(_call, op, args), future))
        self._wake.set()
        return await future

    async def serve(self) -> None:
        """Commit groups until `close()` and the queue is empty. Owned by the daemon."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                group, self._queue = self._queue, []
                # The thread is not cancelled with us: wait for the commit, then resolve.
                results = await asyncio.shield(
                    loop.run_in_executor(self._thread, self._commit, group)
                )
                self.groups += 1
                for (_, future), (ok, value) in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._closing = True  # also when cancelled or crashed: later run() calls fail fast
            for _, future in self._queue:
                if not future.done():
                    future.set_exception(StoreError("the store closed before this write ran"))
            self._queue = []

    def close(self) -> None:
        """Stop taking work; `serve` returns once what is queued has committed."""
        self._closing = True
        self._wake.set()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)
        self._conn.close()

    def _commit(self, group: list[tuple[Op, asyncio.Future]]) -> list[tuple[bool, Any]]:
        conn = self._conn
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in group:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    error = exc if not isinstance(exc, sqlite3.Error) else StoreError(str(exc))
                    results.append((False, error))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"commit failed: {exc}")
            return [(False, error) for _ in group]
        return results
