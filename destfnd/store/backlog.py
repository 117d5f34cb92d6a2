"""What the operator's commands do to the queue (retry, move, discard, a slice of ids at a
time: interventions.py walks the windows) and the counts `stats` and the start read.

Each is a function of a connection; the writes run inside a transaction of the caller's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

from destfnd.store.db import SQL

# The schema version from which finished deliveries are counted in finished_counts.
FINISHED_COUNTS_SCHEMA = 6


class RetryFilter(NamedTuple):
    """Which deliveries `destfnd retry` makes due: in `status`, of `destination` and of
    `event_ids` when given."""

    status: str
    destination: str | None
    event_ids: list[int] | None


def retry_now(
    conn: sqlite3.Connection, which: RetryFilter, now: int, after: int, until: int, limit: int
) -> list[int]:
    """Up to `limit` deliveries `which` selects, ids from `after` (excluded) to `until`, due
    now with their attempts kept (a finished one retrying again); their ids, in order."""
    params = {"status": which.status, "destination": which.destination, "now": now,
              "after": after, "until": until, "limit": limit}  # fmt: skip
    query = SQL["retry_ids"].format(**_of_events(which.event_ids))
    ids = [row[0] for row in conn.execute(query, params)]
    if ids:
        conn.execute(SQL["retry_now"].format(ids=",".join("?" * len(ids))), [now, *ids])
    return ids


def unfinished(
    conn: sqlite3.Connection,
    destination: str,
    event_ids: list[int] | None,
    after: int,
    limit: int,
    stale: bool = False,
    until: int | None = None,
) -> list[int]:
    """Up to `limit` ids of `destination`'s pending and retrying deliveries (of `event_ids`
    when given) not in flight, from id `after` on, up to id `until`, in order. `stale`: no
    daemon runs, so the leased ones are too (a killed daemon's, taken back at the next
    start)."""
    params = {"destination": destination, "after": after, "limit": limit, "stale": stale,
              "until": 2**63 - 1 if until is None else until}  # fmt: skip
    query = SQL["unfinished_ids"].format(**_of_events(event_ids))
    return [row[0] for row in conn.execute(query, params)]


def _of_events(event_ids: list[int] | None) -> dict[str, str]:
    """The `{events}` filter of retry_ids and unfinished_ids ("" for none: every event), and
    their `{scan}`: without events, the table walked in id order over a range of ids, never
    an index (the one on destinations' due deliveries made each call read and sort all of a
    destination's backlog: a million-delivery `discard` took minutes); with events, through
    the index on event ids."""
    if event_ids is None:
        return {"events": "", "scan": "NOT INDEXED"}
    return {"events": f"AND event_id IN ({_id_list(event_ids) or 'NULL'})", "scan": ""}


def _id_list(ids: Iterable[int]) -> str:
    """Ids written into a statement (as integers: nothing else can get in)."""
    return ",".join(str(int(i)) for i in ids)


def newest_delivery(conn: sqlite3.Connection) -> int:
    return conn.execute(SQL["newest_delivery"]).fetchone()[0]


def waiting_bounds(conn: sqlite3.Connection, destination: str | None) -> tuple[int, int]:
    """(just before the first, the last) id of the pending and retrying deliveries of
    `destination` (of all, for None), read from their index alone; (0, 0) if none."""
    if destination is None:
        first, last = conn.execute(SQL["waiting_bounds_all"]).fetchone()
    else:
        first, last = conn.execute(SQL["waiting_bounds"], {"destination": destination}).fetchone()
    return (0, 0) if first is None else (first - 1, last)


def move(conn: sqlite3.Connection, ids: list[int], to: str, now: int) -> int:
    """Deliveries `ids` go to destination `to`, due now, attempts kept; those of an event
    `to` already has a delivery of stay. How many moved."""
    if not ids:
        return 0
    query = SQL["move_deliveries"].format(ids=_id_list(ids))
    return conn.execute(query, {"now": now, "to": to}).rowcount


def discard(conn: sqlite3.Connection, ids: list[int], now: int, reason: str) -> int:
    if not ids:
        return 0
    query = SQL["discard_deliveries"].format(ids=_id_list(ids))
    return conn.execute(query, {"now": now, "reason": reason}).rowcount


def status_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """destination -> status -> deliveries; statuses without any are left out."""
    counts: dict[str, dict[str, int]] = {}
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    query = SQL["status_counts"] if version >= FINISHED_COUNTS_SCHEMA else SQL["status_counts_scan"]
    for destination, status, n in conn.execute(query):
        counts.setdefault(destination, {})[status] = n
    return counts


def waiting_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """destination -> its pending and retrying deliveries (those in flight included)."""
    return dict(conn.execute(SQL["waiting_counts"]).fetchall())


def earliest_due(conn: sqlite3.Connection, destination: str) -> int | None:
    """When `destination`'s earliest waiting delivery is due (unix ms); None if none waits."""
    return conn.execute(SQL["earliest_due"], (destination,)).fetchone()[0]


def leased_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute(SQL["leased_counts"]).fetchall())
