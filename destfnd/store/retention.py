"""Pruning: finished deliveries with their attempts and events, and the invocation records
(logs and requests) past their age or the size budget, a batch at a time inside the writer's
transactions (upkeep.py's retention; the start reads the records' size).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Collection

from destfnd.store.db import SQL


def prune(conn: sqlite3.Connection, finished_before: int, limit: int) -> int:
    """Delete up to `limit` finished deliveries, their attempts, and events left with none.

    Returns how many deliveries were deleted; call again while it equals `limit`.
    """
    deleted = conn.execute(SQL["prune_deliveries"], (finished_before, limit)).fetchall()
    conn.executemany(SQL["delete_attempts"], [(delivery_id,) for delivery_id, _ in deleted])
    unref = Counter(event_id for _, event_id in deleted)
    if unref:
        conn.executemany(SQL["unref_event"], [(n, i) for i, n in unref.items()])
        conn.executemany(SQL["delete_unreferenced_event"], [(i,) for i in unref])
    return len(deleted)


def prune_invocations(
    conn: sqlite3.Connection,
    started_before: int,
    max_total_bytes: int,
    total_bytes: int,
    limit: int,
) -> tuple[int, int]:
    """Delete the oldest invocation records while older than `started_before` or while the
    records take more than `max_total_bytes`. Returns (deleted, bytes freed). The newest is
    kept: its id is never taken again (the per-destination scans go on from ids they saw)."""
    deleted = freed = 0
    (newest,) = conn.execute(SQL["newest_invocation"]).fetchone()
    for invocation_id, started_at, size in conn.execute(
        SQL["oldest_invocations"], (limit,)
    ).fetchall():
        if invocation_id == newest or (
            started_at >= started_before and total_bytes - freed <= max_total_bytes
        ):
            break
        conn.execute(SQL["delete_invocation"], (invocation_id,))
        deleted += 1
        freed += size
    return deleted, freed


def prune_invocations_of(
    conn: sqlite3.Connection,
    destinations: Collection[str],
    started_before: int,
    after_id: int,
    limit: int,
) -> tuple[int, int, int, bool]:
    """Delete the records of `destinations` started before `started_before`, looking at up to
    `limit` records in id order after `after_id`; those of other destinations are passed by.
    Returns (deleted, bytes freed, the id to go on after, whether there may be more to do):
    the scan ends at the newest record, which it keeps (SQLite would give its id again), or
    at one started at or after `started_before`."""
    deleted = freed = 0
    (newest,) = conn.execute(SQL["newest_invocation"]).fetchone()
    rows = conn.execute(SQL["invocations_after"], (after_id, limit)).fetchall()
    for invocation_id, destination, started_at, size in rows:
        if started_at >= started_before or invocation_id == newest:
            return deleted, freed, after_id, False
        after_id = invocation_id
        if destination in destinations:
            conn.execute(SQL["delete_invocation"], (invocation_id,))
            deleted += 1
            freed += size
    return deleted, freed, after_id, len(rows) == limit


def invocations_size(conn: sqlite3.Connection) -> int:
    return conn.execute(SQL["invocations_size"]).fetchone()[0]
