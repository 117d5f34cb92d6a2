"""messageId dedupe without a random-key index write per event.

An index on random messageIds dirties one b-tree page per new event, and every dirty page is
written to the WAL and fsynced at commit: that was half of ingest's cost. Instead, the keys of
recent events live in memory (rebuilt from the events table at start: nothing is lost in a
crash) and are written to `message_ids` together, sorted, once `FLUSH_AT` have gathered, so
one flush shares each page among many keys. Owned by the writer thread; nothing here awaits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from hashlib import blake2b

from destfnd.store.db import SQL

# Keys gathered in memory before they are written out: about 200 bytes each. Larger flushes
# share more pages; each flush holds the writer for tens of milliseconds.
FLUSH_AT = 32_768
_CHUNK = 500  # keys per IN (...) list, well under SQLite's variable limit
_LOAD_CHUNK = 10_000


def key_of(source: str, message_id: str) -> int:
    """A stable 64-bit key of (source, messageId). A match is confirmed against the stored
    event where that still exists, so a hash collision cannot drop an event that is kept."""
    data = f"{source}\x00{message_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little", signed=True)


class Dedupe:
    """Which (source, messageId) keys were stored when: recent ones in memory, older ones in
    `message_ids`. Create with `load` on the writer's connection before any insert."""

    def __init__(self, flush_at: int = FLUSH_AT) -> None:
        self.flush_at = flush_at
        # key -> (key, event id, received_at ms): the row `flush` writes, ready to sort.
        self.recent: dict[int, tuple[int, int, int]] = {}

    @classmethod
    def load(cls, conn: sqlite3.Connection, flush_at: int = FLUSH_AT) -> Dedupe:
        """The keys of events stored since the last flush (all events, on a database from
        before message_ids existed), flushed in bounded chunks as they are read."""
        dedupe = cls(flush_at)
        (last_id,) = conn.execute(SQL["dedupe_flushed_through"]).fetchone()
        while True:
            rows = conn.execute(SQL["events_since"], (last_id, _LOAD_CHUNK)).fetchall()
            for event_id, source, message_id, received_at in rows:
                dedupe.add(key_of(source, message_id), event_id, received_at)
                last_id = event_id
            if dedupe.due():
                dedupe.flush(conn, through=last_id)
            if len(rows) < _LOAD_CHUNK:
                return dedupe

    def add(self, key: int, event_id: int, received_at: int) -> None:
        self.recent[key] = (key, event_id, received_at)

    def find(self, conn: sqlite3.Connection, keys: Iterable[int]) -> dict[int, tuple[int, int]]:
        """key -> (event id, received_at) of the newest stored event with that key."""
        found: dict[int, tuple[int, int]] = {}
        cold = []
        recent = self.recent
        for k in keys:
            hit = recent.get(k)
            if hit is None:
                cold.append(k)
            else:
                found[k] = hit[1:]
        for start in range(0, len(cold), _CHUNK):
            chunk = cold[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for k, event_id, received_at in conn.execute(
                f"SELECT key, event_id, received_at FROM message_ids WHERE key IN ({marks})", chunk
            ):
                found[k] = (event_id, received_at)
        return found

    def due(self) -> bool:
        return len(self.recent) >= self.flush_at

    def flush(self, conn: sqlite3.Connection, through: int | None = None) -> int:
        """Write the keys in memory to `message_ids` in key order, in a transaction of its
        own; memory is cleared only once that committed. Returns how many were written.

        `through`: the newest event id whose key is in memory; by default the newest stored
        event (every committed insert has added its keys by the time a flush runs)."""
        if not self.recent:
            return 0
        rows = sorted(self.recent.values())
        conn.execute("BEGIN IMMEDIATE")
        try:
            if through is None:
                (through,) = conn.execute(SQL["max_event_id"]).fetchone()
            conn.executemany(SQL["insert_message_id"], rows)
            conn.execute(SQL["set_dedupe_flushed_through"], (through,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.recent.clear()
        return len(rows)


def prune_keys(conn: sqlite3.Connection, before: int, limit: int) -> int:
    """Forget up to `limit` keys stored before `before` (out of the dedupe window)."""
    return conn.execute(SQL["prune_message_ids"], (before, limit)).rowcount
