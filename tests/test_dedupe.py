"""messageId dedupe (destfnd.store.dedupe) on a real SQLite file: keys in memory, flushed in
sorted bulk, rebuilt from the events table after a restart, confirmed against stored events.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from support import database_at_schema

from destfnd.store import Dedupe, IncomingEvent, Writer, open_db
from destfnd.store import queue as q
from destfnd.store.dedupe import (
    KEY_MAX,
    KEY_MIN,
    SWEEP_MIN_ROWS,
    KeyFilter,
    events_with_message_id,
    key_of,
    sweep_keys,
    sweep_rows,
)

T0 = 1_700_000_000_000
WINDOW_MS = 24 * 3600 * 1000
DESTS = ("crm",)


def incoming(message_id: str) -> IncomingEvent:
    return IncomingEvent(message_id, orjson.dumps({"messageId": message_id, "type": "track"}))


def insert(conn, dedupe, ids, *, source="web", now=T0) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        new = q.insert_events(
            conn, dedupe, source, [incoming(i) for i in ids], DESTS, now, now - WINDOW_MS
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return new


def stored_ids(conn) -> list[str]:
    return [m for (m,) in conn.execute("SELECT message_id FROM events ORDER BY id")]


def keys_on_disk(conn) -> int:
    return conn.execute("SELECT count(*) FROM message_ids").fetchone()[0]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "destfnd.sqlite3"


@pytest.fixture
def conn(db_path):
    c = open_db(db_path)
    yield c
    c.close()


def test_dedupe_key_is_stable_and_separates_sources():
    assert key_of("web", "m1") == key_of("web", "m1")
    assert key_of("web", "m1") != key_of("ios", "m1")
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert key_of("ab", "c") != key_of("a", "bc")
    assert -(2**63) <= key_of("web", "\ud800 lone surrogate") < 2**63


def test_dedupe_flush_moves_keys_to_disk_and_they_still_match(conn):
    dedupe = Dedupe.load(conn, flush_at=3)
    assert insert(conn, dedupe, ["a", "b"]) == 2
    assert not dedupe.due() and keys_on_disk(conn) == 0
    assert insert(conn, dedupe, ["c"]) == 1
    assert dedupe.due()
    assert dedupe.flush(conn) == 3
    assert dedupe.recent == {} and keys_on_disk(conn) == 3
    # Matched from disk now, memory empty.
    assert insert(conn, dedupe, ["a", "b", "c", "d"], now=T0 + 1000) == 1
    assert stored_ids(conn) == ["a", "b", "c", "d"]
    (through,) = conn.execute("SELECT flushed_through FROM dedupe_state").fetchone()
    assert through == 3  # the newest event id whose key was written


def key_lookups(conn) -> list[str]:
    """Every SQL statement that looks keys up in message_ids, from now on."""
    seen: list[str] = []
    conn.set_trace_callback(
        lambda sql: seen.append(sql) if "FROM message_ids WHERE key IN" in sql else None
    )
    return seen


def fill(conn, dedupe) -> int:
    steps = 0
    while dedupe.pending():
        dedupe.step(conn)
        steps += 1
        assert steps < 10_000
    return steps


def test_dedupe_key_filter_holds_every_key_added_and_few_others():
    import random

    rng = random.Random(7)
    f = KeyFilter(bits=1 << 16)
    added = [rng.getrandbits(64) - 2**63 for _ in range(4096)]
    for k in added:
        f.add(k)
    assert all(f.may_hold(k) for k in added)
    assert f.added == 4096 and f.capacity == 8192
    others = [rng.getrandbits(64) - 2**63 for _ in range(20_000)]
    false_hits = sum(f.may_hold(k) for k in others)
    assert false_hits < 20_000 * 0.05  # about 1.4% expected at half its capacity
    assert not KeyFilter(bits=1 << 16).may_hold(added[0])
    for bad in (1000, 4, 1 << 33):
        with pytest.raises(ValueError):
            KeyFilter(bits=bad)


def test_dedupe_key_filter_skips_looking_up_new_keys_and_still_finds_stored_ones(conn):
    dedupe = Dedupe.load(conn, flush_at=3)
    insert(conn, dedupe, ["a", "b", "c"])
    dedupe.flush(conn)
    assert dedupe.recent == {} and keys_on_disk(conn) == 3
    lookups = key_lookups(conn)
    # No filter yet (as after a start): a new key is looked up on disk.
    assert dedupe.key_filter is None and dedupe.pending()
    assert insert(conn, dedupe, ["d"], now=T0 + 1) == 1
    assert len(lookups) == 1
    fill(conn, dedupe)
    assert dedupe.key_filter is not None and not dedupe.pending()
    # With it, a new key is not looked up at all...
    assert insert(conn, dedupe, ["e", "f"], now=T0 + 2) == 2
    assert len(lookups) == 1
    # ...and a key on disk still is, and matches.
    assert insert(conn, dedupe, ["a", "g"], now=T0 + 3) == 1
    assert len(lookups) == 2
    assert stored_ids(conn) == ["a", "b", "c", "d", "e", "f", "g"]


def test_dedupe_key_filter_fill_takes_keys_flushed_while_it_runs(conn):
    first = [f"old{i}" for i in range(20)]
    later = [f"new{i}" for i in range(20)]
    dedupe = Dedupe.load(conn, flush_at=20, slice_keys=20)
    insert(conn, dedupe, first)
    dedupe.flush(conn)
    dedupe.slice_keys = 2
    for _ in range(5):  # half of the keys on disk read into the new filter
        dedupe.step(conn)
    assert dedupe.key_filter is None and dedupe.pending()
    passed = dedupe._fill_from
    # Keys flushed now: the scan has already passed some of them (asserted, as the keys
    # are fixed hashes); only the flush itself can put those into the new filter.
    insert(conn, dedupe, later, now=T0 + 1)
    assert dedupe.due()
    while dedupe.due():
        dedupe.step(conn)
    assert any(key_of("web", m) < passed for m in later)
    fill(conn, dedupe)
    assert dedupe.key_filter is not None
    assert all(dedupe.key_filter.may_hold(key_of("web", m)) for m in first + later)
    assert insert(conn, dedupe, first + later + ["x"], now=T0 + 2) == 1


@pytest.mark.parametrize("slice_keys", [1, 2, 3])
def test_dedupe_key_filter_fill_reads_the_keys_at_both_ends_of_the_key_space(conn, slice_keys):
    ends = [KEY_MIN, KEY_MIN + 1, -1, 0, KEY_MAX - 1, KEY_MAX]
    dedupe = Dedupe.load(conn, flush_at=len(ends), slice_keys=len(ends))
    for n, k in enumerate(ends, 1):
        dedupe.add(k, n, T0)
    dedupe.flush(conn)
    assert keys_on_disk(conn) == len(ends)
    dedupe.slice_keys = slice_keys
    steps = fill(conn, dedupe)
    # Every slice is full; the one ending at KEY_MAX ends the fill (there is nothing above).
    assert steps == len(ends) // slice_keys
    assert dedupe.key_filter is not None
    assert all(dedupe.key_filter.may_hold(k) for k in ends)
    assert dedupe.key_filter.added == len(ends)  # each read once


def test_dedupe_key_filter_is_refilled_once_overfull_and_not_more_often(conn):
    # A filter of 64 bits holds 8 keys; swept keys stay set in it, so it is refilled from
    # message_ids once overfull, after as many keys were flushed as the last fill read.
    dedupe = Dedupe.load(conn, flush_at=4, slice_keys=4, filter_bits=64)
    fill(conn, dedupe)
    empty = dedupe.key_filter
    assert empty is not None and empty.added == 0
    ids = [f"m{i}" for i in range(12)]
    for n in range(0, 12, 4):
        insert(conn, dedupe, ids[n : n + 4], now=T0 + n)
        while dedupe.due():
            dedupe.step(conn)
    assert empty.added == 12 and dedupe.pending()  # over its 8, and 12 flushed since
    fill(conn, dedupe)
    refilled = dedupe.key_filter
    assert refilled is not empty and refilled.added == 12  # read back from message_ids
    conn.execute("DELETE FROM message_ids")  # as if swept out of the window
    more = [f"n{i}" for i in range(12)]
    for n in range(0, 8, 4):
        insert(conn, dedupe, more[n : n + 4], now=T0 + 100 + n)
        while dedupe.due():
            dedupe.step(conn)
    assert not dedupe.pending()  # 8 flushed since that fill, which read 12: not yet
    insert(conn, dedupe, more[8:], now=T0 + 200)
    while dedupe.due():
        dedupe.step(conn)
    assert dedupe.pending()
    fill(conn, dedupe)
    assert dedupe.key_filter.added == 12  # only what message_ids holds now
    assert insert(conn, dedupe, ids + more, now=T0 + 300) == len(ids)  # ids were swept


def test_dedupe_flush_keeps_pace_with_keys_arriving_faster_than_a_slice(db_path):
    """One step runs per group: with a fixed slice, keys arriving faster than a slice per group
    (batch ingest above about 20k events/s) piled up in memory without end (10 MB/s). Each
    step now writes at least half of what gathered meanwhile, so memory stays bounded, and
    every key is still found."""
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=8, slice_keys=2)
    per_group, held = 10, []
    for group in range(200):
        insert(conn, dedupe, [f"g{group}-{i}" for i in range(per_group)], now=T0 + group)
        if dedupe.pending():
            dedupe.step(conn)
        held.append(len(dedupe.recent) + len(dedupe._flushing or {}))
    assert max(held) <= 10 * per_group, held[-10:]  # (was 1,690 at the end, and growing)
    every = [f"g{group}-{i}" for group in range(200) for i in range(per_group)]
    assert insert(conn, dedupe, every, now=T0 + 300) == 0  # all found: none stored twice
    while dedupe.pending() and dedupe.due():
        dedupe.step(conn)
    assert keys_on_disk(conn) == len(every)
    conn.close()


def test_dedupe_flush_goes_in_slices_and_keys_stay_found_meanwhile(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=5, slice_keys=2)
    insert(conn, dedupe, [f"m{i}" for i in range(5)])
    assert dedupe.flush(conn) == 2  # the first slice: one transaction, 2 keys
    assert keys_on_disk(conn) == 2 and dedupe.due()
    # Mid-flush, every key still matches, and new keys gather for the next flush.
    assert insert(conn, dedupe, [f"m{i}" for i in range(7)], now=T0 + 1) == 2
    assert set(dedupe.recent) == {key_of("web", "m5"), key_of("web", "m6")}
    (through,) = conn.execute("SELECT flushed_through FROM dedupe_state").fetchone()
    assert through == 0  # moves only with the last slice
    assert dedupe.flush(conn) == 2
    assert dedupe.flush(conn) == 1
    assert not dedupe.due() and keys_on_disk(conn) == 5
    (through,) = conn.execute("SELECT flushed_through FROM dedupe_state").fetchone()
    assert through == 5  # the newest event when the flush started, not m5/m6's
    conn.close()

    conn = open_db(db_path)
    try:
        dedupe = Dedupe.load(conn)
        assert set(dedupe.recent) == {key_of("web", "m5"), key_of("web", "m6")}
        assert insert(conn, dedupe, [f"m{i}" for i in range(8)], now=T0 + 2) == 1
    finally:
        conn.close()


def test_dedupe_restart_rebuilds_unflushed_keys_from_events(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=2)
    insert(conn, dedupe, ["a", "b"])
    dedupe.flush(conn)
    insert(conn, dedupe, ["c"])  # in memory only when the daemon "dies"
    conn.close()

    conn = open_db(db_path)
    try:
        dedupe = Dedupe.load(conn, flush_at=1000)
        # Only the unflushed tail is read back into memory; the rest stays on disk.
        assert set(dedupe.recent) == {key_of("web", "c")}
        assert insert(conn, dedupe, ["a", "b", "c", "e"], now=T0 + 5) == 1
        assert stored_ids(conn) == ["a", "b", "c", "e"]
    finally:
        conn.close()


def test_dedupe_a_colliding_key_does_not_drop_a_different_message(conn):
    dedupe = Dedupe.load(conn)
    insert(conn, dedupe, ["first"])
    # Pretend "second" hashes to the same key as "first" did: the key points at event 1.
    dedupe.add(key_of("web", "second"), 1, T0)
    assert insert(conn, dedupe, ["second"], now=T0 + 1) == 1
    # The same holds once the keys are on disk.
    dedupe.add(key_of("web", "third"), 1, T0)
    dedupe.flush(conn)
    assert insert(conn, dedupe, ["third"], now=T0 + 2) == 1
    assert stored_ids(conn) == ["first", "second", "third"]


def test_dedupe_keys_colliding_within_one_call_are_both_stored(conn, monkeypatch):
    dedupe = Dedupe.load(conn)
    insert(conn, dedupe, ["q"])  # stored before, under its real key
    # "p" and "q" hash alike: "p" is taken first in the call, so "q" finds an in-call entry
    # that is not its own and must still be caught as the copy of the stored "q".
    collide = {"p": 7, "q": 7}
    monkeypatch.setattr(q, "key_of", lambda source, mid: collide.get(mid) or key_of(source, mid))
    dedupe.add(7, 1, T0)  # the stored "q" under the colliding key
    assert insert(conn, dedupe, ["p", "q", "p"], now=T0 + 1) == 1
    assert stored_ids(conn) == ["q", "p"]


def test_dedupe_a_rolled_back_insert_leaves_no_false_duplicate(conn):
    dedupe = Dedupe.load(conn)
    conn.execute("BEGIN IMMEDIATE")
    q.insert_events(conn, dedupe, "web", [incoming("m1")], DESTS, T0, T0 - WINDOW_MS)
    conn.execute("ROLLBACK")  # the writer does this when an op in the group fails
    assert key_of("web", "m1") in dedupe.recent  # memory still names the lost event id...
    # ...but no stored event confirms it, so the retried request is stored.
    assert insert(conn, dedupe, ["m1"]) == 1
    assert insert(conn, dedupe, ["m1"], now=T0 + 1) == 0
    assert stored_ids(conn) == ["m1"]


def test_dedupe_ids_are_not_reused_after_the_newest_events_are_pruned(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=3)
    insert(conn, dedupe, ["a", "b", "c"])
    while dedupe.flush(conn):
        pass
    # Retention pruned every event (a long idle spell), then one more came in.
    conn.execute("DELETE FROM deliveries")
    conn.execute("DELETE FROM events")
    insert(conn, dedupe, ["x"], now=T0 + 1)
    (x_id,) = conn.execute("SELECT id FROM events WHERE message_id = 'x'").fetchone()
    assert x_id == 4  # above flushed_through (3), not 1 again
    conn.close()

    conn = open_db(db_path)  # x's key was only in memory: a restart reads it back
    try:
        dedupe = Dedupe.load(conn)
        assert insert(conn, dedupe, ["x"], now=T0 + 2) == 0
    finally:
        conn.close()


def test_dedupe_a_left_over_entry_sharing_an_event_id_hides_no_duplicate(conn):
    dedupe = Dedupe.load(conn)
    # A group that failed half-way: "a" got a key naming event id 1, then rolled back
    # before insert_many could record its high id.
    dedupe.add(key_of("web", "a"), 1, T0)
    insert(conn, dedupe, ["b"])  # really stored, as event id 1
    (b_id,) = conn.execute("SELECT id FROM events WHERE message_id = 'b'").fetchone()
    assert b_id == 1
    # Both keys name event 1; "b" must still be found a duplicate, "a" must still be new.
    assert insert(conn, dedupe, ["a", "b"], now=T0 + 1) == 1
    assert stored_ids(conn) == ["b", "a"]


def test_dedupe_an_entry_left_by_a_call_that_failed_half_way_names_nothing(conn):
    dedupe = Dedupe.load(conn)
    insert(conn, dedupe, ["a"])
    # A call raised in the middle of its loop: its keys are in memory with ids it was about
    # to use, and Dedupe.high_id never moved past them, so the next call hands them out again.
    dedupe.add(key_of("web", "z"), dedupe.high_id + 3, T0)
    dedupe.add(key_of("web", "y"), dedupe.high_id + 1, T0)
    assert insert(conn, dedupe, ["y", "z", "z"], now=T0 + 1) == 2
    assert stored_ids(conn) == ["a", "y", "z"]


def test_dedupe_a_crash_between_flush_slices_loses_no_key(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=6, slice_keys=2)
    insert(conn, dedupe, [f"m{i}" for i in range(6)])
    dedupe.flush(conn)
    dedupe.flush(conn)  # 4 of 6 keys written, then the daemon is killed
    conn.close()

    conn = open_db(db_path)
    try:
        dedupe = Dedupe.load(conn)
        assert len(dedupe.recent) == 6  # flushed_through had not moved: all read back
        assert insert(conn, dedupe, [f"m{i}" for i in range(7)], now=T0 + 1) == 1
        while dedupe.flush(conn):
            pass
        assert keys_on_disk(conn) == 7
    finally:
        conn.close()


def test_dedupe_sweep_rows_outpace_what_was_written():
    assert sweep_rows(0) == SWEEP_MIN_ROWS
    assert sweep_rows(1_000_000) == 2_000_000


def test_dedupe_keys_reach_only_as_far_as_stored_events(conn):
    dedupe = Dedupe.load(conn)
    insert(conn, dedupe, ["m1"])
    dedupe.flush(conn)
    # Retention pruned the event (here by hand): its key can no longer match.
    conn.execute("DELETE FROM deliveries")
    conn.execute("DELETE FROM events")
    assert insert(conn, dedupe, ["m1"], now=T0 + 1) == 1


def test_dedupe_sweep_keys_forgets_only_keys_out_of_the_window(conn):
    dedupe = Dedupe.load(conn)
    insert(conn, dedupe, [f"old{i}" for i in range(10)], now=T0)
    insert(conn, dedupe, [f"new{i}" for i in range(10)], now=T0 + 10_000)
    dedupe.flush(conn)
    # A slice of 4 keys at a time, resumed where the last one ended, until the end.
    deleted, cursor, slices = 0, KEY_MIN, 0
    while cursor is not None:
        n, cursor = sweep_keys(conn, T0 + 1, cursor, 4)
        deleted += n
        slices += 1
    assert deleted == 10
    assert slices == 6  # 20 keys: 5 full slices of 4, then one that finds none
    left = {k for (k,) in conn.execute("SELECT key FROM message_ids")}
    assert left == {key_of("web", f"new{i}") for i in range(10)}
    assert sweep_keys(conn, T0 + 1, KEY_MIN, 100) == (0, None)


def test_dedupe_upgrade_from_schema_3_indexes_existing_events(db_path):
    """A database from before message_ids: its stored events still dedupe after the upgrade."""
    old = database_at_schema(db_path, 3)
    for i in range(5):
        old.execute(
            "INSERT INTO events (id, source, message_id, received_at, refs, payload)"
            " VALUES (?, 'web', ?, ?, 1, x'7b7d')",
            (i + 1, f"m{i}", T0),
        )
    old.close()

    conn = open_db(db_path)
    try:
        dedupe = Dedupe.load(conn, flush_at=2)  # loading flushes as it goes
        assert keys_on_disk(conn) + len(dedupe.recent) == 5
        assert keys_on_disk(conn) >= 4
        assert insert(conn, dedupe, [f"m{i}" for i in range(6)], now=T0 + 1) == 1
    finally:
        conn.close()


async def test_dedupe_writer_flushes_between_groups_once_due(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=50)
    writer = Writer(conn, dedupe)
    task = asyncio.create_task(writer.serve(), name="writer")
    try:
        async with asyncio.timeout(10):
            for start in range(0, 120, 10):
                new = await writer.run(
                    q.insert_events, dedupe, "web",
                    [incoming(f"m{i}") for i in range(start, start + 10)],
                    DESTS, T0, T0 - WINDOW_MS,
                )  # fmt: skip
                assert new == 10
            on_disk = await writer.run(keys_on_disk)
            assert on_disk == 100  # flushed after the 5th and the 10th group, not per group
            assert len(dedupe.recent) == 120 - on_disk
            again = await writer.run(
                q.insert_events, dedupe, "web", [incoming(f"m{i}") for i in range(130)],
                DESTS, T0 + 1, T0 + 1 - WINDOW_MS,
            )  # fmt: skip
            assert again == 10
    finally:
        writer.close()
        async with asyncio.timeout(10):
            await task
        writer.shutdown()


async def test_dedupe_writer_fills_the_key_filter_between_groups(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn, flush_at=20, slice_keys=20)
    insert(conn, dedupe, [f"old{i}" for i in range(20)])
    dedupe.flush(conn)
    dedupe.slice_keys = 8  # the fill takes 3 steps: one after each of the next 3 groups
    writer = Writer(conn, dedupe)
    task = asyncio.create_task(writer.serve(), name="writer")
    lookups = key_lookups(conn)
    try:
        async with asyncio.timeout(10):
            for n in range(4):
                await writer.run(
                    q.insert_events, dedupe, "web", [incoming(f"new{n}")], DESTS, T0, T0 - WINDOW_MS
                )
            assert dedupe.key_filter is not None and not dedupe.pending()
            assert len(lookups) == 3  # the groups before the filter was complete
            again = await writer.run(
                q.insert_events, dedupe, "web",
                [incoming(m) for m in ("old3", "new9", "old7")], DESTS, T0 + 1, T0 + 1 - WINDOW_MS,
            )  # fmt: skip
            assert again == 1 and len(lookups) == 4
    finally:
        writer.close()
        async with asyncio.timeout(10):
            await task
        writer.shutdown()


def test_dedupe_events_with_message_id_finds_flushed_and_unflushed_events(db_path):
    """The Event Delivery lookup by messageId: through the keys on disk and the events whose
    keys are only in the daemon's memory, each confirmed against the stored event."""
    conn = open_db(db_path)
    try:
        dedupe = Dedupe.load(conn, flush_at=3)
        insert(conn, dedupe, ["a", "b", "c"])
        while dedupe.flush(conn):  # a, b, c: on disk, their events at or below the mark
            pass
        insert(conn, dedupe, ["d"])  # only in memory (above flushed_through)
        insert(conn, dedupe, ["a"], source="app")  # the same messageId from another source
        ids = {
            m: i for i, m in conn.execute("SELECT id, message_id FROM events WHERE source = 'web'")
        }
        (app_a,) = conn.execute("SELECT id FROM events WHERE source = 'app'").fetchone()
        reader = open_db(db_path, readonly=True)  # as `destfnd deliveries` reads, beside the daemon
        try:
            assert events_with_message_id(reader, ["web"], "b") == [ids["b"]]
            assert events_with_message_id(reader, ["web"], "d") == [ids["d"]]
            assert events_with_message_id(reader, ["web", "app"], "a") == sorted([ids["a"], app_a])
            assert events_with_message_id(reader, ["web"], "zzz") == []
        finally:
            reader.close()
    finally:
        conn.close()


class _Rows:
    """What `execute` returned, read at once (as a cursor: fetchone, iteration)."""

    def __init__(self, rows: list) -> None:
        self.rows = rows

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def __iter__(self):
        return iter(self.rows)


def test_dedupe_events_with_message_id_sees_an_event_whose_flush_ends_mid_lookup(db_path):
    """`destfnd deliveries --message-id` reads beside the daemon, each statement on its own
    snapshot. A flush that commits between its reads moves the event's key to disk and the
    mark past the event at once: whichever read comes second must still find it."""
    conn = open_db(db_path)
    reader = open_db(db_path, readonly=True)
    try:
        dedupe = Dedupe.load(conn, flush_at=1)
        insert(conn, dedupe, ["late"])  # its key only in memory, its id above the mark
        (event_id,) = conn.execute("SELECT id FROM events").fetchone()

        class FlushAfterFirstRead:
            """The real reader; the daemon's flush commits right after its first statement."""

            def __init__(self) -> None:
                self.reads = 0

            def execute(self, *args):
                rows = _Rows(reader.execute(*args).fetchall())
                self.reads += 1
                if self.reads == 1:
                    while dedupe.flush(conn):
                        pass
                return rows

        looking = FlushAfterFirstRead()
        assert events_with_message_id(looking, ["web"], "late") == [event_id]
        assert looking.reads >= 3 and keys_on_disk(conn) == 1  # the flush did land in between
    finally:
        reader.close()
        conn.close()


def test_dedupe_events_with_message_id_does_not_trust_a_colliding_key(conn, monkeypatch):
    from destfnd.store import dedupe as dedupe_module

    dedupe = Dedupe.load(conn, flush_at=1)
    insert(conn, dedupe, ["first"])
    while dedupe.flush(conn):
        pass
    # Every messageId now hashes to the key of "first": the stored event must say no.
    monkeypatch.setattr(dedupe_module, "key_of", lambda source, message_id: key_of("web", "first"))
    assert events_with_message_id(conn, ["web"], "other") == []
    assert len(events_with_message_id(conn, ["web"], "first")) == 1
