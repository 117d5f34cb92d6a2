"""The write-ahead queue's own operations (insert, claim, finish, release, recover), each a
function of the writer's connection inside its transaction; nothing here awaits. The
operator's are in backlog.py, pruning in retention.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
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
    size: int = 0  # the events' bytes: the writer keeps a group's under GROUP_BYTES


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


def shift_retries(conn: sqlite3.Connection, step_ms: int, now: int) -> int:
    """After the wall clock stepped back by -`step_ms`: the retries waiting are due that much
    sooner, as they were scheduled to be; how many."""
    return conn.execute(SQL["shift_retries"], {"step": step_ms, "now": now}).rowcount


def recover(conn: sqlite3.Connection, now: int) -> int:
    return conn.execute(SQL["recover"], (now,)).rowcount
