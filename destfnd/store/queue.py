"""The write-ahead queue's operations, each a function of the writer's connection.

Everything here runs inside a writer transaction (see writer.py); nothing here awaits.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence

from destfnd.store.db import SQL
from destfnd.store.models import Claimed, Finished, IncomingEvent, Status

# A leased row's next_at is pushed this far out, so it cannot be claimed twice even if the
# release were lost; crash recovery at start-up makes it due again at once.
LEASE_MS = 24 * 3600 * 1000
_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit


def insert_events(
    conn: sqlite3.Connection,
    source: str,
    events: Sequence[IncomingEvent],
    destinations: Sequence[str],
    now: int,
    dedupe_cutoff: int,
) -> int:
    """Store the events not seen before from `source`, fanned out to `destinations`.

    Returns how many were new (the rest were duplicates within the dedupe window).
    """
    new = 0
    deliveries = []
    for event in events:
        cur = conn.execute(SQL["seen_upsert"], (source, event.message_id, now, dedupe_cutoff))
        if cur.rowcount == 0:
            continue
        new += 1
        if not destinations:
            continue
        cur = conn.execute(
            SQL["insert_event"],
            (source, event.message_id, now, len(destinations), event.payload),
        )
        event_id = cur.lastrowid
        deliveries.extend((event_id, name, now, now) for name in destinations)
    if deliveries:
        conn.executemany(SQL["insert_delivery"], deliveries)
    return new


def claim(
    conn: sqlite3.Connection, destination: str, now: int, limit: int
) -> tuple[list[Claimed], int | None]:
    """Lease up to `limit` due deliveries, oldest due first, with their events.

    Returns the claimed deliveries and, when none was due, when the next one is (unix ms).
    """
    due = conn.execute(
        SQL["due"], {"destination": destination, "now": now, "limit": limit}
    ).fetchall()
    lease_until = now + LEASE_MS
    rows = [conn.execute(SQL["lease"], (lease_until, i)).fetchone() for (i,) in due]
    if not rows:
        (next_due,) = conn.execute(SQL["next_due"], (destination,)).fetchone()
        return [], next_due
    events: dict[int, tuple[str, bytes]] = {}
    event_ids = list({row[1] for row in rows})
    for start in range(0, len(event_ids), _CHUNK):
        chunk = event_ids[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for event_id, message_id, payload in conn.execute(
            f"SELECT id, message_id, payload FROM events WHERE id IN ({marks})", chunk
        ):
            events[event_id] = (message_id, payload)
    return [
        Claimed(delivery_id, event_id, attempt, created_at, *events[event_id])
        for delivery_id, event_id, attempt, created_at in rows
    ], None


def finish(conn: sqlite3.Connection, outcomes: Iterable[Finished]) -> None:
    done, retry = [], []
    for o in outcomes:
        if o.status is Status.RETRYING:
            retry.append((o.at, o.error_type, o.error, o.delivery_id))
        else:
            done.append((str(o.status), o.at, o.error_type, o.error, o.delivery_id))
    if done:
        conn.executemany(SQL["finish"], done)
    if retry:
        conn.executemany(SQL["schedule_retry"], retry)


def release(conn: sqlite3.Connection, delivery_ids: Iterable[int], now: int) -> None:
    conn.executemany(SQL["release"], [(now, i) for i in delivery_ids])


def recover(conn: sqlite3.Connection, now: int) -> int:
    return conn.execute(SQL["recover"], (now,)).rowcount


def prune(
    conn: sqlite3.Connection, finished_before: int, seen_before: int, limit: int
) -> tuple[int, int]:
    """Delete up to `limit` finished deliveries (and events left with none) and stale ids.

    Returns (deliveries deleted, seen ids deleted); call again while either equals `limit`.
    """
    unref = Counter(
        row[0] for row in conn.execute(SQL["prune_deliveries"], (finished_before, limit))
    )
    if unref:
        conn.executemany(SQL["unref_event"], [(n, i) for i, n in unref.items()])
        conn.executemany(SQL["delete_unreferenced_event"], [(i,) for i in unref])
    seen = conn.execute(SQL["prune_seen"], (seen_before, limit)).rowcount
    return sum(unref.values()), seen


def status_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for destination, status, n in conn.execute(SQL["status_counts"]):
        counts.setdefault(destination, {})[status] = n
    return counts


def leased_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute(SQL["leased_counts"]).fetchall())
