"""The write-ahead queue's operations, each a function of the writer's connection.

Everything here runs inside a writer transaction (see writer.py); nothing here awaits.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

import orjson

from destfnd.store.db import SQL, select_in
from destfnd.store.dedupe import Dedupe, key_of
from destfnd.store.models import Claimed, Finished, IncomingEvent, Invocation, Status

# A leased row's next_at is pushed this far out, so it cannot be claimed twice even if the
# release were lost; crash recovery at start-up makes it due again at once.
LEASE_MS = 24 * 3600 * 1000
# What a record's row takes on disk beyond its texts (ids, times, SQLite's row and cell
# headers, B-tree slack), so that `storage.records_max_size` bounds the file: a webhook's
# record holds about 100 bytes of text, and counting the texts alone let 1 GB of budget
# take 1.4 GB of disk (measured: 129 bytes a row on disk for 95 of text).
RECORD_ROW_BYTES = 32
# The schema version from which finished deliveries are counted in finished_counts.
FINISHED_COUNTS_SCHEMA = 6
_DUE_ROWS = SQL["due_rows"].format(due=SQL["due"].rstrip().rstrip(";"))


class IngestRequest(NamedTuple):
    """The events of one accepted request, for `insert_many` (a NamedTuple: one per request)."""

    source: str
    events: Sequence[IncomingEvent]
    destinations: Sequence[str]
    now: int  # unix ms: received_at, and when the deliveries are first due
    dedupe_cutoff: int  # a messageId stored since then is a duplicate
    # Each event's own destinations, when an event's `integrations` turns some off (an event
    # with none left is not stored); None: every event goes to `destinations`.
    only: Sequence[Sequence[str]] | None = None


def insert_many(
    conn: sqlite3.Connection, requests: list[IngestRequest], dedupe: Dedupe
) -> list[int]:
    """Store the events of several requests at once (one statement for all the events, one
    per source and destination for their deliveries), skipping messageIds stored from the same
    source since the request's dedupe cutoff, and fan each new event out into one delivery per
    destination. Returns how many were new, per request.

    Events of a source with no destinations are not stored: there is nothing to deliver.
    Nor are those whose `integrations` turned every destination off (`IngestRequest.only`).
    """
    keyed = [
        [(key_of(r.source, e.message_id), e) for e in r.events] if r.destinations else ()
        for r in requests
    ]
    stored = _stored_events(conn, dedupe, {k for ks in keyed for k, _ in ks})
    (max_id,) = conn.execute(SQL["max_event_id"]).fetchone()
    first_id = max(max_id, dedupe.high_id) + 1  # ids are never reused (see Dedupe.high_id)
    rows: list[tuple] = []  # the event with id first_id + i is rows[i]
    fanout: dict[str, Sequence[str]] = {}  # source -> destinations (the same for all, from ingest)
    mixed = False
    new_counts = []
    # A request's new ids [start, end), for fan-out; its events with their own destinations.
    spans: list[tuple[str, int, int, Sequence[str]]] = []
    routed: list[tuple[int, Sequence[str], int]] = []  # an event with its own destinations
    recent = dedupe.recent  # the keys of this call's events go in as they are taken
    for r, pairs in zip(requests, keyed, strict=True):
        source, destinations, now, cutoff = r.source, r.destinations, r.now, r.dedupe_cutoff
        if not destinations:
            new_counts.append(len(r.events))
            continue
        only = r.only
        mixed = mixed or fanout.setdefault(source, destinations) != destinations
        refs = len(destinations)
        before = len(rows)
        for index, (k, (message_id, payload)) in enumerate(pairs):
            if only is not None:
                targets = only[index]
                if not targets:
                    continue
                refs = len(targets)
            if k in recent or k in stored:  # seen before, maybe: keys are hashes, so check
                hit = recent.get(k)
                # Stored earlier in this call? (An id past the rows taken so far is an entry
                # left by a call that failed half-way: it names nothing.)
                if hit is not None and first_id <= hit[1] < first_id + len(rows):
                    row = rows[hit[1] - first_id]
                    if row[1] == source and row[2] == message_id:
                        continue
                prior = stored.get(k)  # stored before this call
                if (
                    prior is not None
                    and prior[0] == source
                    and prior[1] == message_id
                    and prior[2] >= cutoff
                ):
                    continue
            event_id = first_id + len(rows)
            recent[k] = (k, event_id, now)  # Dedupe.add, inline: this loop is the hot path
            rows.append((event_id, source, message_id, now, refs, payload))
            if only is not None:
                routed.append((event_id, targets, now))
        new_counts.append(len(rows) - before)
        if only is None:
            spans.append((source, first_id + before, first_id + len(rows), destinations))
    if not rows:
        return new_counts
    last_id = first_id + len(rows) - 1
    dedupe.high_id = last_id
    conn.executemany(SQL["insert_event"], rows)
    # Fanned out in SQL from the rows just inserted: no Python tuple per delivery.
    if not mixed and not routed:
        for source, destinations in fanout.items():
            conn.execute(
                SQL["fan_out"], (orjson.dumps(list(destinations)), first_id, last_id, source)
            )
        return new_counts
    # Some events have their own destinations, or one source has two sets in this call (not
    # something ingest does): the others by id range, requests next to each other as one.
    runs: list[list] = []  # [source, destinations, first id, last id]
    for source, start, end, destinations in spans:
        if start == end:
            continue
        last = runs[-1] if runs else None
        if last is not None and last[:2] == [source, destinations] and last[3] == start - 1:
            last[3] = end - 1
        else:
            runs.append([source, destinations, start, end - 1])
    for source, destinations, first, last_of_run in runs:
        conn.execute(SQL["fan_out"], (orjson.dumps(list(destinations)), first, last_of_run, source))
    if routed:
        own = [(event_id, name, now) for event_id, targets, now in routed for name in targets]
        conn.execute(SQL["insert_deliveries"], (orjson.dumps(own),))
    return new_counts


def _utf8_len(text: str) -> int:
    """Bytes of `text` as SQLite stores it (UTF-8): a character of CJK logs takes 3."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _stored_events(
    conn: sqlite3.Connection, dedupe: Dedupe, keys: set[int]
) -> dict[int, tuple[str, str, int]]:
    """key -> (source, messageId, received_at) of the stored event its dedupe entry names.

    A key is a hash: the event itself says whether it is the same messageId. An entry whose
    event is gone (pruned, or never committed) matches nothing, so dedupe reaches back as far
    as events are kept, and an entry left by a rolled-back insert cannot drop a later event.
    (Several keys may name one event id, e.g. such a left-over entry and a real one.)"""
    found = dedupe.find(conn, keys)
    if not found:
        return {}
    event_ids = list({event_id for event_id, _ in found.values()})
    events = {row[0]: row[1:] for row in select_in(conn, SQL["confirm_events"], event_ids)}
    return {k: events[event_id] for k, (event_id, _) in found.items() if event_id in events}


def insert_events(
    conn: sqlite3.Connection,
    dedupe: Dedupe,
    source: str,
    events: Sequence[IncomingEvent],
    destinations: Sequence[str],
    now: int,
    dedupe_cutoff: int,
) -> int:
    """`insert_many` for one request: how many of `events` were new."""
    request = IngestRequest(source, events, destinations, now, dedupe_cutoff)
    return insert_many(conn, [request], dedupe)[0]


def claim(
    conn: sqlite3.Connection, destination: str, now: int, limit: int
) -> tuple[list[Claimed], int | None]:
    """Lease up to `limit` due deliveries, oldest due first, with their events.

    Returns the claimed deliveries and, when none was due, when the next one is (unix ms).
    """
    return claim_many(conn, [(destination, now, limit)])[0]


def claim_many(
    conn: sqlite3.Connection, requests: Sequence[tuple[str, int, int]]
) -> list[tuple[list[Claimed], int | None]]:
    """`claim` for several destinations (destination, now, limit) at once, one result each:
    one statement per destination and one for all their leases and events, whatever the
    number of rows (they come as JSON arrays, see `due_rows`)."""
    found: list[list] = []
    results: list[tuple[list[Claimed], int | None]] = []
    lease_until = 0
    taken: set[int] = set()  # leased below, after every destination's rows are read
    for destination, now, limit in requests:
        params = {"destination": destination, "now": now, "limit": limit}
        (due,) = conn.execute(_DUE_ROWS, params).fetchone()
        # (A destination asked for twice in one call, which dispatchers never do, would
        # otherwise read the same rows twice.)
        rows = [row for row in orjson.loads(due) if row[0] not in taken]
        taken.update(row[0] for row in rows)
        if rows:
            rows.sort(key=_due_order)
            lease_until = max(lease_until, now + LEASE_MS)
            results.append(([], None))
        else:
            (next_due,) = conn.execute(SQL["next_due"], (destination,)).fetchone()
            results.append(([], next_due))
        found.append(rows)
    if not lease_until:
        return results
    all_rows = [row for rows in found for row in rows]
    conn.execute(SQL["lease"], (lease_until, orjson.dumps([row[0] for row in all_rows])))
    events = _claimed_events(conn, list({row[2] for row in all_rows}))
    for (claimed, _), rows in zip(results, found, strict=True):
        for delivery_id, _, event_id, attempts, created_at in rows:
            message_id, payload = events[event_id]
            claimed.append(
                Claimed(delivery_id, event_id, attempts + 1, created_at, message_id, payload)
            )
    return results


# Events fetched together, at most: their payloads come back as one string, which SQLite caps
# at 1e9 bytes (in hex, twice their size); 256 of 1 MB each still fit.
_EVENTS_TOGETHER = 256


def _claimed_events(conn: sqlite3.Connection, event_ids: list[int]) -> dict[int, tuple[str, bytes]]:
    events: dict[int, tuple[str, bytes]] = {}
    for start in range(0, len(event_ids), _EVENTS_TOGETHER):
        chunk = event_ids[start : start + _EVENTS_TOGETHER]
        try:
            (text,) = conn.execute(SQL["claim_events"], (orjson.dumps(chunk),)).fetchone()
        except sqlite3.DataError:  # "string or blob too big": events of many MB each
            for event_id, message_id, payload in select_in(conn, SQL["claim_events_rows"], chunk):
                events[event_id] = (message_id, payload)
            continue
        for event_id, message_id, payload in orjson.loads(text):
            events[event_id] = (message_id, bytes.fromhex(payload))
    return events


def _due_order(row: list) -> tuple[int, int]:
    return row[1], row[0]  # next_at, id


def finish(
    conn: sqlite3.Connection, outcomes: Iterable[Finished], invocation: Invocation | None = None
) -> int:
    """Record attempts' outcomes (and the invocation they shared, for the Event Delivery view).

    Returns the bytes recorded, rows included (for the records size budget)."""
    return finish_batches(conn, [[(list(outcomes), invocation)]])[0]


def finish_batches(
    conn: sqlite3.Connection,
    batches: Sequence[Iterable[tuple[Sequence[Finished], Invocation | None]]],
) -> list[int]:
    """`finish` for several batches (destinations) of units of work at once, the bytes
    recorded for each: one statement for each kind of row, their values as a JSON array (one
    SQLite step each, see `due_rows`), whatever their number."""
    invocations: list[tuple] = []
    attempts: list[tuple] = []
    done: list[tuple] = []
    retry: list[tuple] = []
    sizes: list[int] = []
    next_id = 0
    for items in batches:
        size = 0
        for outcomes, invocation in items:
            invocation_id = None
            if invocation is not None:
                if not next_id:  # ids given here, as SQLite would: the writer is the only one
                    next_id = conn.execute(SQL["max_invocation_id"]).fetchone()[0] + 1
                i = invocation
                invocation_id = next_id
                next_id += 1
                recorded = (
                    _utf8_len(i.logs) + len(i.requests) + _utf8_len(i.destination)
                    + len(i.version or "")
                    + RECORD_ROW_BYTES
                )  # fmt: skip
                size += recorded
                invocations.append(
                    (invocation_id, i.destination, i.started_at, i.duration_ms, i.version,
                     i.logs, i.requests.decode(), recorded)
                )  # fmt: skip
            for o in outcomes:
                # A delivered attempt is the delivery row itself (finished_at, invocation_id).
                if o.attempt and o.status is not Status.DELIVERED:
                    attempts.append(
                        (o.delivery_id, o.attempt, invocation_id, o.ended_at, o.status,
                         o.error_type, o.error)
                    )  # fmt: skip
                if o.status is Status.RETRYING:
                    retry.append((o.at, o.error_type, o.error, invocation_id, o.delivery_id))
                else:
                    done.append(
                        (o.status, o.at, o.error_type, o.error, invocation_id, o.delivery_id)
                    )
        sizes.append(size)
    for name, values in (
        ("insert_invocations", invocations),
        ("insert_attempts", attempts),
        ("finish", done),
        ("schedule_retry", retry),
    ):
        if not values:
            continue
        data = orjson.dumps(values)
        if b"\\u0000" in data:  # json_extract would cut a text at its NUL: a row at a time
            conn.executemany(SQL[f"{name}_row"], values)
        else:
            conn.execute(SQL[name], (data,))
    return sizes


def release(conn: sqlite3.Connection, delivery_ids: Iterable[int], now: int) -> None:
    conn.executemany(SQL["release"], [(now, i) for i in delivery_ids])


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


def shift_retries(conn: sqlite3.Connection, step_ms: int, now: int) -> int:
    """After the wall clock stepped back by -`step_ms`: the retries waiting are due that much
    sooner, as they were scheduled to be; how many."""
    return conn.execute(SQL["shift_retries"], {"step": step_ms, "now": now}).rowcount


def recover(conn: sqlite3.Connection, now: int) -> int:
    return conn.execute(SQL["recover"], (now,)).rowcount


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
