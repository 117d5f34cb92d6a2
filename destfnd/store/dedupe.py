"""messageId dedupe without a random-key index write per event.

An index on random messageIds dirties one b-tree page per new event, and every dirty page is
written to the WAL and fsynced at commit: with random ids (Segment's SDKs send UUIDs) that cost
batch ingest about a quarter of its throughput. Instead, the keys of
recent events live in memory (rebuilt from the events table at start: nothing is lost in a
crash) and are written to `message_ids` together, sorted, once `FLUSH_AT` have gathered, so
one flush shares each page among many keys. Owned by the writer thread; nothing here awaits.

Nearly every key is new, and looking a new key up in `message_ids` cost single-event ingest
about 6% of its throughput (same-run A/B). So a Bloom filter (`KeyFilter`, a fixed 8 MiB)
holds every key written there: a key it does not hold is not looked up. It is filled from
`message_ids` a slice at a time after start-up (until then, every key is looked up, as
before), and refilled once it is overfull, since keys swept out of the window stay set in it.
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
# Keys per flush step (at least): each step is its own transaction, run between two groups, so
# it delays the next group by a few milliseconds, more only while keys arrive faster than that.
FLUSH_SLICE = 4096
_LOAD_CHUNK = 10_000
# The key filter: 2**26 bits (8 MiB), two bits per key; 1 in 20 absent keys is still
# looked up when it holds 2**23 keys (a 24 h window at about 97 events/s), so it is refilled
# from message_ids beyond that (see Dedupe._filter_wanted). Fuller, it still spares most
# lookups: 1 in 6 absent keys is looked up at twice that many keys, 2 in 5 at four times.
FILTER_BITS = 1 << 26
KEY_MIN, KEY_MAX = -(2**63), 2**63 - 1  # the key space; a sweep of the keys starts at KEY_MIN


def key_of(source: str, message_id: str) -> int:
    """A stable 64-bit key of (source, messageId). A match is confirmed against the stored
    event where that still exists, so a hash collision cannot drop an event that is kept."""
    data = f"{source}\x00{message_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little", signed=True)


class KeyFilter:
    """A Bloom filter of 64-bit keys: `may_hold(k)` is True for every key added, and for a
    few others. Keys are already uniform hashes, so their low and high bits index it."""

    __slots__ = ("_bits", "_mask", "added")

    def __init__(self, bits: int = FILTER_BITS) -> None:
        if not 8 <= bits <= 1 << 32 or bits & (bits - 1):
            raise ValueError("bits must be a power of two from 8 to 2**32")
        self._bits = bytearray(bits >> 3)
        self._mask = bits - 1
        self.added = 0  # adds, counting a key added twice twice: an upper bound of its keys

    @property
    def capacity(self) -> int:
        """Keys it holds before 1 in 20 absent keys looks present (1 in 8 of its bits)."""
        return (self._mask + 1) >> 3

    def add(self, key: int) -> None:
        bits, mask = self._bits, self._mask
        i, j = key & mask, (key >> 32) & mask
        bits[i >> 3] |= 1 << (i & 7)
        bits[j >> 3] |= 1 << (j & 7)
        self.added += 1

    def may_hold(self, key: int) -> bool:
        bits, mask = self._bits, self._mask
        i, j = key & mask, (key >> 32) & mask
        return bool(bits[i >> 3] >> (i & 7) & bits[j >> 3] >> (j & 7) & 1)


class Dedupe:
    """Which (source, messageId) keys were stored when: recent ones in memory, older ones in
    `message_ids`. Create with `load` on the writer's connection before any insert."""

    def __init__(
        self,
        flush_at: int = FLUSH_AT,
        slice_keys: int = FLUSH_SLICE,
        filter_bits: int = FILTER_BITS,
    ) -> None:
        self.flush_at = flush_at
        self.slice_keys = slice_keys
        self.filter_bits = filter_bits
        # Every key in message_ids (or in a flush's open transaction) is in `key_filter`
        # once it is not None; `_filling` is a new one being filled by a scan of
        # message_ids in key order, up to `_fill_from`, and gets every key flushed meanwhile.
        self.key_filter: KeyFilter | None = None
        self._filling: KeyFilter | None = None
        self._fill_from = KEY_MIN
        self._last_fill = 0  # keys the last fill took in (read, or flushed while it ran)
        self._flushed_since_fill = 0  # keys flushed since the last fill started
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
        cls,
        conn: sqlite3.Connection,
        flush_at: int = FLUSH_AT,
        slice_keys: int = FLUSH_SLICE,
        filter_bits: int = FILTER_BITS,
    ) -> Dedupe:
        """The keys of events stored since the last flush (all events, on a database from
        before message_ids existed), flushed in bounded chunks as they are read. The key
        filter is filled later, by `step` (every key is looked up until then)."""
        dedupe = cls(flush_at, slice_keys, filter_bits)
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
        on_disk = self.key_filter.may_hold if self.key_filter is not None else None
        for k in keys:
            hit = recent.get(k) or flushing.get(k)
            if hit is not None:
                found[k] = hit[1:]
            elif on_disk is None or on_disk(k):
                cold.append(k)
        for k, event_id, received_at in select_in(conn, SQL["find_keys"], cold):
            found[k] = (event_id, received_at)
        return found

    def due(self) -> bool:
        """A flush is due or under way."""
        return self._flushing is not None or len(self.recent) >= self.flush_at

    def pending(self) -> bool:
        """The writer has work here: a flush, or filling the key filter."""
        return self.due() or self._filter_wanted()

    def step(self, conn: sqlite3.Connection) -> int:
        """One bounded step of that work, in a transaction of its own: a flush slice first,
        else a slice of the key filter's fill. Returns how many keys it wrote or read."""
        if self.due():
            return self.flush(conn)
        if self._filter_wanted():
            return self.fill_filter(conn)
        return 0

    def _filter_wanted(self) -> bool:
        """A fill is under way, or there is no filter yet, or it is overfull (swept keys stay
        set in it) and at least as many keys were flushed since the last fill started as that
        fill took in: refilling then reads about one key per key flushed once message_ids
        holds a steady window, up to two while it still grows."""
        if self._filling is not None or self.key_filter is None:
            return True
        return self.key_filter.added > self.key_filter.capacity and (
            self._flushed_since_fill >= max(self.key_filter.capacity // 2, self._last_fill)
        )

    def fill_filter(self, conn: sqlite3.Connection) -> int:
        """Read the next `slice_keys` keys of message_ids, in key order, into a new key
        filter; once the scan reaches the end, the new filter replaces the one in use.
        Returns how many keys were read. Keys flushed meanwhile go into the new filter as they
        are written, so the keys the scan has passed are in it too."""
        if self._filling is None:
            self._filling = KeyFilter(self.filter_bits)
            self._fill_from = KEY_MIN
            self._flushed_since_fill = 0
        with transaction(conn):
            keys = conn.execute(SQL["key_scan"], (self._fill_from, self.slice_keys)).fetchall()
        add = self._filling.add
        for (k,) in keys:
            add(k)
        if len(keys) == self.slice_keys and keys[-1][0] < KEY_MAX:
            self._fill_from = keys[-1][0] + 1
        else:
            self._last_fill = self._filling.added
            self.key_filter, self._filling = self._filling, None
        return len(keys)

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
        # At least half of the keys gathered since this flush began, so that a flush keeps
        # pace with any rate of new keys (one step runs per group): at a fixed slice, batch
        # ingest above about 20k events/s gathered keys faster than the steps wrote them,
        # and memory grew by 10 MB/s. A longer step is the writer's backpressure.
        end = self._written + max(self.slice_keys, len(self.recent) // 2)
        rows = self._rows[self._written : end]
        last = end >= len(self._rows)
        for key_filter in (self.key_filter, self._filling):  # before the keys are on disk
            if key_filter is not None:
                for k, _, _ in rows:
                    key_filter.add(k)
        with transaction(conn):
            conn.executemany(SQL["insert_message_id"], rows)
            if last:
                conn.execute(SQL["set_dedupe_flushed_through"], (self._through,))
        self._written = end
        self.flushed_keys += len(rows)
        self._flushed_since_fill += len(rows)
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
