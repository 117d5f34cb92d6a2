"""messageId dedupe without a random-key index write per event.

An index on random messageIds dirties one b-tree page per new event, and every dirty page is
written to the WAL and fsynced at commit: with random ids (Segment's SDKs send UUIDs) that cost
batch ingest about a quarter of its throughput. Instead, the keys of
recent events live in memory (rebuilt from the events table at start: nothing is lost in a
crash) and are written to `message_ids` together, sorted, once `FLUSH_AT` have gathered, so
one flush shares each page among many keys. Owned by the writer thread; nothing here awaits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from hashlib import blake2b

from destfnd.store.db import SQL, select_in, transaction

# Keys gathered in memory before they are written out: about 200 bytes each. A flush rewrites
# up to every leaf page of message_ids, so larger flushes cost less per key (about 1 us per
# key at 100k stored keys, 3 us at 1M, for 64k-key flushes).
FLUSH_AT = 65_536
# Keys per flush step: each step is its own transaction, run between two groups, so it delays
# the next group by a few milliseconds at most.
FLUSH_SLICE = 4096
_LOAD_CHUNK = 10_000


def key_of(source: str, message_id: str) -> int:
    """A stable 64-bit key of (source, messageId). A match is confirmed against the stored
    event where that still exists, so a hash collision cannot drop an event that is kept."""
    data = f"{source}\x00{message_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little", signed=True)


class Dedupe:
    """Which (source, messageId) keys were stored when: recent ones in memory, older ones in
    `message_ids`. Create with `load` on the writer's connection before any insert."""

    def __init__(self, flush_at: int = FLUSH_AT, slice_keys: int = FLUSH_SLICE) -> None:
        self.flush_at = flush_at
        self.slice_keys = slice_keys
        # key -> (key, event id, received_at ms): the row a flush writes, ready to sort.
        self.recent: dict[int, tuple[int, int, int]] = {}
        # A flush in progress: its keys (still looked up here until all are written), their
        # rows in key order, how many are written, and the event id they cover.
        self._flushing: dict[int, tuple[int, int, int]] | None = None
        self._rows: list[tuple[int, int, int]] = []
        self._written = 0
        self._through = 0
        # The highest event id handed out (or flushed through): new events get ids above it,
        # even if pruning deleted the newest events, so an id below flushed_through is never
        # reused for an event whose key is only in memory (load reads ids above it).
        self.high_id = 0
        self.flushed_keys = 0  # keys written to message_ids since start, for the sweep's pace

    @classmethod
    def load(
        cls, conn: sqlite3.Connection, flush_at: int = FLUSH_AT, slice_keys: int = FLUSH_SLICE
    ) -> Dedupe:
        """The keys of events stored since the last flush (all events, on a database from
        before message_ids existed), flushed in bounded chunks as they are read."""
        dedupe = cls(flush_at, slice_keys)
        (last_id,) = conn.execute(SQL["dedupe_flushed_through"]).fetchone()
        while True:
            dedupe.high_id = last_id
            rows = conn.execute(SQL["events_since"], (last_id, _LOAD_CHUNK)).fetchall()
            for event_id, source, message_id, received_at in rows:
                dedupe.add(key_of(source, message_id), event_id, received_at)
                last_id = event_id
            dedupe.high_id = last_id
            if dedupe.due():
                while dedupe.flush(conn):
                    pass
            if len(rows) < _LOAD_CHUNK:
                return dedupe

    def add(self, key: int, event_id: int, received_at: int) -> None:
        self.recent[key] = (key, event_id, received_at)

    def find(self, conn: sqlite3.Connection, keys: Iterable[int]) -> dict[int, tuple[int, int]]:
        """key -> (event id, received_at) of the newest stored event with that key."""
        found: dict[int, tuple[int, int]] = {}
        cold = []
        recent = self.recent
        flushing = self._flushing or {}
        for k in keys:
            hit = recent.get(k) or flushing.get(k)
            if hit is None:
                cold.append(k)
            else:
                found[k] = hit[1:]
        for k, event_id, received_at in select_in(conn, SQL["find_keys"], cold):
            found[k] = (event_id, received_at)
        return found

    def due(self) -> bool:
        return self._flushing is not None or len(self.recent) >= self.flush_at

    def flush(self, conn: sqlite3.Connection) -> int:
        """One step of writing the keys in memory to `message_ids`: the next `slice_keys` of
        them in key order, in a transaction of its own, so that no step holds the writer
        long. Returns how many were written (0: nothing to flush, or the flush is done).

        A flush starts with the keys in memory at that moment (new ones gather anew). Sorted
        keys make each slice a contiguous key range: a page is still rewritten once per
        flush, not once per slice. The mark `flushed_through` (`high_id` when the flush
        started: every key of an event up to it is in memory or written) moves with the last
        slice, so a crash in between only means reading those events' keys again at start."""
        if self._flushing is None:
            if not self.recent:
                return 0
            self._flushing, self.recent = self.recent, {}
            self._rows = sorted(self._flushing.values())
            self._written = 0
            self._through = self.high_id
        end = self._written + self.slice_keys
        rows = self._rows[self._written : end]
        last = end >= len(self._rows)
        with transaction(conn):
            conn.executemany(SQL["insert_message_id"], rows)
            if last:
                conn.execute(SQL["set_dedupe_flushed_through"], (self._through,))
        self._written = end
        self.flushed_keys += len(rows)
        if last:
            self._flushing, self._rows = None, []
        return len(rows)


def events_with_message_id(
    conn: sqlite3.Connection, sources: Iterable[str], message_id: str
) -> list[int]:
    """Ids of the stored events with `message_id` from `sources`, found without scanning the
    events table: through the keys on disk (events within the dedupe window; the newest copy
    per source) and among the events whose keys are not flushed yet. [] when there are none
    within the window; older events need a scan. (A reader's query: it runs beside the daemon.)
    """
    # The mark first: a flush that ends between the two reads then only makes more keys
    # visible on disk, where in the other order an event could fall between them.
    (flushed_through,) = conn.execute(SQL["dedupe_flushed_through"]).fetchone()
    keys = list({key_of(source, message_id) for source in sources})
    candidates = {event_id for _, event_id, _ in select_in(conn, SQL["find_keys"], keys)}
    candidates.update(
        event_id
        for (event_id,) in conn.execute(
            SQL["unflushed_events_with_message_id"], (flushed_through, message_id)
        )
    )
    # A key is a hash: the event itself says whether it has this messageId.
    return sorted(
        event_id
        for event_id, _, stored_id, _ in select_in(conn, SQL["confirm_events"], list(candidates))
        if stored_id == message_id
    )


KEY_MIN = -(2**63)  # where a sweep of the keys starts
SWEEP_MIN_ROWS = 200_000  # keys a prune pass looks at, at the least


def sweep_rows(keys_written: int) -> int:
    """How many keys a prune pass sweeps, given how many were written since the last pass:
    at least twice as many, so the sweep outpaces ingest and message_ids stays within about
    twice the keys of one dedupe window, at any ingest rate."""
    return max(SWEEP_MIN_ROWS, 2 * keys_written)


def sweep_keys(
    conn: sqlite3.Connection, before: int, after: int, rows: int
) -> tuple[int, int | None]:
    """Delete the keys stored before `before` (out of the dedupe window) among the next `rows`
    keys above `after`. Returns (deleted, where the next slice starts, or None once the sweep
    has reached the end). A key kept a little past the window is harmless: a match is checked
    against the stored event's received_at."""
    last, seen = conn.execute(SQL["key_slice"], (after, rows)).fetchone()
    if not seen:
        return 0, None
    deleted = conn.execute(SQL["prune_key_slice"], (after, last, before)).rowcount
    return deleted, (last if seen == rows else None)
