"""destfnd.store on a real SQLite file: migrations, queue operations, the group-committing writer.

A restart is closing the connection and opening the same file again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import database_at_schema, run_cli

from destfnd.store import (
    Dedupe,
    Finished,
    IncomingEvent,
    Status,
    StoreError,
    Writer,
    backlog,
    open_db,
    retention,
)
from destfnd.store import queue as q
from destfnd.store import writer as writer_module
from destfnd.store.db import SQL

T0 = 1_700_000_000_000  # unix ms
WINDOW_MS = 24 * 3600 * 1000  # Segment's dedupe window
DESTS = ("crm", "warehouse")


def incoming(message_id: str) -> IncomingEvent:
    return IncomingEvent(message_id, orjson.dumps({"messageId": message_id, "type": "track"}))


def tx(conn: sqlite3.Connection, op: Callable[..., Any], *args: Any) -> Any:
    """Run one queue function the way the writer does: in its own BEGIN IMMEDIATE ... COMMIT."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = op(conn, *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def insert(conn, ids, *, source="web", destinations=DESTS, now=T0) -> int:
    # A Dedupe loaded afresh each time, as after a restart: its keys come from the events.
    return tx(
        conn,
        q.insert_events,
        Dedupe.load(conn),
        source,
        [incoming(i) for i in ids],
        destinations,
        now,
        now - WINDOW_MS,
    )


def rows(conn: sqlite3.Connection, sql: str, *args: Any) -> list[tuple]:
    return conn.execute(sql, args).fetchall()


def delivery(conn: sqlite3.Connection, delivery_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
    names = [d[0] for d in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "var" / "destfnd.sqlite3"


@pytest.fixture
def conn(db_path):
    c = open_db(db_path)
    yield c
    c.close()


@asynccontextmanager
async def running_writer(conn: sqlite3.Connection) -> AsyncIterator[Writer]:
    """A Writer serving inside the test; closed, drained and shut down on the way out."""
    writer = Writer(conn)
    task = asyncio.create_task(writer.serve(), name="writer")
    try:
        async with asyncio.timeout(10):
            yield writer
    finally:
        writer.close()
        async with asyncio.timeout(10):
            await task
        writer.shutdown()


# --- opening and migrations ------------------------------------------------------------------


def newest_migration() -> int:
    names = [e.name for e in resources.files("destfnd.store").joinpath("sql").iterdir()]
    return max(int(m.group(1)) for n in names if (m := re.match(r"(\d+)_.*\.sql$", n)))


def test_open_db_migrations_set_user_version_and_reopen_is_noop(db_path):
    conn = open_db(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == newest_migration() >= 1
    insert(conn, ["m1"])
    conn.close()

    # Re-running the migration would fail on CREATE TABLE, or lose the rows.
    conn = open_db(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newest_migration()
        assert rows(conn, "SELECT message_id FROM events") == [("m1",)]
        assert len(rows(conn, "SELECT id FROM deliveries")) == len(DESTS)
    finally:
        conn.close()


def test_open_db_sets_wal_and_durability_pragmas(conn, db_path):
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    # WAL is a property of the file: a read-only reader sees it too.
    reader = open_db(db_path, readonly=True)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        reader.close()


def test_sql_uses_no_numbered_parameters():
    """Python 3.14's sqlite3 refuses a numbered parameter (`?1`) given a sequence of values
    (3.12 and 3.13 warn): a daemon on it would fail at its first ingest, and CI runs 3.11,
    which says nothing. Every statement destfnd runs is in these files."""
    package = Path(q.__file__).resolve().parent.parent
    numbered = re.compile(r"\?\d")
    found = []
    files = [*package.rglob("*.sql"), *package.rglob("*.py")]
    assert len(files) > 20
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("--")[0] if path.suffix == ".sql" else line.split("#")[0]
            if numbered.search(code):
                found.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert found == []


def test_open_db_every_foreign_key_has_an_index_on_its_child_column(conn):
    # Else each delete of a parent row (pruning) makes SQLite scan the whole child table.
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    checked = 0
    for table in tables:
        for fk in conn.execute(f"PRAGMA foreign_key_list({table})").fetchall():
            child_column = fk[3]
            leading = {  # a partial index cannot serve the foreign key check
                conn.execute(f"PRAGMA index_info({index[1]})").fetchone()[2]
                for index in conn.execute(f"PRAGMA index_list({table})").fetchall()
                if not index[4]
            }
            assert child_column in leading, f"{table}.{child_column} has no index"
            checked += 1
    assert checked >= 1  # deliveries.event_id -> events.id


def test_open_db_refuses_a_newer_schema(db_path):
    conn = open_db(db_path)
    conn.execute(f"PRAGMA user_version = {newest_migration() + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        open_db(db_path)


EARLY_SCHEMAS = Path(__file__).parent / "fixtures" / "early_schemas"


def database_made_early(path: Path, version: int, early: tuple[int, ...]) -> sqlite3.Connection:
    """A database as a destfnd of the past left it, at schema `version`: the migrations whose
    number is in `early` as they were before being edited in place (tests/fixtures)."""
    from destfnd.store import db as store_db

    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in store_db._migrations():
        if number <= version:
            if number in early:
                (file,) = EARLY_SCHEMAS.glob(f"{number:03d}_*.sql")
                script = file.read_text()
            for statement in store_db._statements(script):
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def schema_of(path: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        found = conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    return sorted((kind, name, " ".join((sql or "").split())) for kind, name, sql in found)


@pytest.mark.parametrize(
    ("version", "early"),
    [(1, (1,)), (2, (1,)), (4, (4,)), (5, (4,)), (6, (4, 6)), (6, (6,))],
    # Made by that commit, or by the first one and migrated by the others since.
    ids=["6e511c3", "d47ff36", "0a0544f", "0a0544f,367216c", "0a0544f,96c6455", "96c6455"],
)
def test_open_db_brings_a_database_of_an_early_destfnd_to_todays_schema(tmp_path, version, early):
    """Migrations edited in place left such databases unable to migrate (001 before 5fc04df
    had no events_by_message, which 004 dropped) or unlike a new one (an index that doubled
    the dedupe flush's writes, a trigger that lost a renamed destination's counts)."""
    database_made_early(tmp_path / "old.sqlite3", version, early).close()
    open_db(tmp_path / "old.sqlite3").close()
    open_db(tmp_path / "new.sqlite3").close()
    assert schema_of(tmp_path / "old.sqlite3") == schema_of(tmp_path / "new.sqlite3")


def test_open_db_a_delivered_attempt_recorded_twice_by_an_early_destfnd_is_listed_once(tmp_path):
    """Before 003 a delivered attempt had its attempts row; `deliveries` listed it beside the
    delivery row's own, as two "attempt 1"s, one without its record. The queue goes on."""
    path = tmp_path / "old.sqlite3"
    conn = database_made_early(path, 2, (1,))
    conn.execute("INSERT INTO events VALUES (1, 'web', 'sent', ?, 1, '{}')", (T0,))
    conn.execute("INSERT INTO events VALUES (2, 'web', 'waits', ?, 1, '{}')", (T0,))
    conn.execute("INSERT INTO seen VALUES ('web', 'sent', ?)", (T0,))
    conn.execute(
        "INSERT INTO deliveries (id, event_id, destination, status, attempts, created_at,"
        " next_at, finished_at) VALUES (1, 1, 'crm', 'delivered', 1, ?, ?, ?),"
        " (2, 2, 'crm', 'retrying', 1, ?, ?, NULL)",
        (T0, T0, T0 + 5, T0, T0 + 1000),
    )
    conn.execute(
        "INSERT INTO invocations VALUES (7, 'crm', ?, 5.0, NULL, 'sent it', '[]', 9)", (T0,)
    )
    conn.execute(
        "INSERT INTO attempts VALUES (1, 1, 7, ?, 'delivered', NULL, NULL),"
        " (2, 1, NULL, ?, 'retrying', 'Retry', 'HTTP 500')",
        (T0 + 5, T0 + 5),
    )
    conn.close()
    conn = open_db(path)
    try:
        assert rows(conn, "SELECT id, invocation_id FROM deliveries ORDER BY id") == [
            (1, 7),
            (2, None),
        ]
        assert rows(conn, "SELECT delivery_id, status FROM attempts") == [(2, "retrying")]
        (claimed,), _ = tx(conn, q.claim, "crm", T0 + 1000, 10)
        assert (claimed.delivery_id, claimed.attempt) == (2, 2)
    finally:
        conn.close()
    config = tmp_path / "destfnd.toml"
    config.write_text(
        f'[storage]\npath = "{path}"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "crm"\ntype = "file"\npath = "out.ndjson"\n'
    )
    result = run_cli("deliveries", "--config", str(config), "--status", "delivered", "--json")
    (delivery,) = orjson.loads(result.stdout)
    (attempt,) = delivery["history"]
    assert attempt["logs"] == "sent it"


def test_open_db_counts_again_what_an_early_trigger_lost_to_a_rename(tmp_path):
    """006 before 4f3fde2 kept a destination renamed by hand counted under its old name."""
    path = tmp_path / "old.sqlite3"
    conn = database_made_early(path, 6, (6,))
    conn.execute("INSERT INTO events VALUES (1, 'web', 'm', ?, 1, '{}')", (T0,))
    conn.execute(
        "INSERT INTO deliveries (id, event_id, destination, status, created_at, next_at)"
        " VALUES (1, 1, 'hook', 'pending', ?, ?)",
        (T0, T0),
    )
    conn.execute("UPDATE deliveries SET status = 'delivered', finished_at = ?", (T0,))
    conn.execute("UPDATE deliveries SET destination = 'hook2'")
    assert backlog.status_counts(conn) == {"hook": {"delivered": 1}}  # (the early trigger)
    conn.close()
    conn = open_db(path)
    try:
        assert backlog.status_counts(conn) == {"hook2": {"delivered": 1}}
    finally:
        conn.close()


def test_deliveries_on_a_database_the_daemon_has_not_migrated_says_so(tmp_path):
    """It said "cannot read: no such table: invocations" (stats reads any schema)."""
    path = tmp_path / "old.sqlite3"
    database_made_early(path, 2, (1,)).close()
    config = tmp_path / "destfnd.toml"
    config.write_text(f'[storage]\npath = "{path}"\n[[sources]]\nname = "web"\nwrite_key = "k"\n')
    result = run_cli("deliveries", "--config", str(config))
    assert result.returncode == 4
    assert "the database is at schema version 2" in result.stderr
    assert "start the daemon of this version first" in result.stderr
    assert run_cli("stats", "--config", str(config)).returncode == 0


def test_open_db_a_migration_that_fails_leaves_the_database_as_it_was(tmp_path):
    """One transaction per migration left a file at 3 when 004 failed: the destfnd that made
    it refused a newer schema, and this one could not migrate it either."""
    path = tmp_path / "db.sqlite3"
    conn = database_made_early(path, 1, ())
    conn.execute("CREATE TABLE message_ids (x)")  # 004 creates it: it fails there
    conn.close()
    with pytest.raises(StoreError, match="message_ids already exists"):
        open_db(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        assert rows(conn, "SELECT name FROM sqlite_master WHERE name = 'invocations'") == []


def test_open_db_readonly_without_file_raises(tmp_path):
    with pytest.raises(StoreError):
        open_db(tmp_path / "missing.sqlite3", readonly=True)


# --- insert_events ---------------------------------------------------------------------------


def test_insert_events_fans_out_one_delivery_per_destination(conn):
    assert insert(conn, ["m1", "m2"], destinations=("a", "b", "c")) == 2
    events = rows(conn, "SELECT id, message_id, refs FROM events ORDER BY id")
    assert [(m, r) for _, m, r in events] == [("m1", 3), ("m2", 3)]
    for event_id, _, _ in events:
        found = rows(
            conn,
            "SELECT destination, status, attempts, next_at FROM deliveries WHERE event_id = ?"
            " ORDER BY destination",
            event_id,
        )
        assert found == [("a", "pending", 0, T0), ("b", "pending", 0, T0), ("c", "pending", 0, T0)]
    assert backlog.status_counts(conn) == {d: {"pending": 2} for d in ("a", "b", "c")}


def test_insert_events_stores_payload_verbatim(conn):
    event = IncomingEvent("m1", b'{"messageId":"m1","properties":{"x":1}}')
    tx(conn, q.insert_events, Dedupe.load(conn), "web", [event], DESTS, T0, T0 - WINDOW_MS)
    assert rows(conn, "SELECT source, received_at, payload FROM events") == [
        ("web", T0, event.payload)
    ]


def test_insert_events_dedupes_message_id_from_same_source_within_window(conn):
    assert insert(conn, ["m1"]) == 1
    assert insert(conn, ["m1", "m2"], now=T0 + 60_000) == 1  # only m2 is new
    assert insert(conn, ["m3", "m3"], now=T0 + 60_000) == 1  # a duplicate inside one request
    messages = [m for (m,) in rows(conn, "SELECT message_id FROM events ORDER BY id")]
    assert messages == ["m1", "m2", "m3"]
    assert len(rows(conn, "SELECT id FROM deliveries")) == 3 * len(DESTS)


def test_insert_events_same_message_id_from_another_source_is_new(conn):
    assert insert(conn, ["m1"], source="web") == 1
    assert insert(conn, ["m1"], source="ios", now=T0 + 1) == 1
    assert rows(conn, "SELECT source FROM events ORDER BY id") == [("web",), ("ios",)]


def test_insert_events_accepts_same_message_id_after_dedupe_cutoff(conn):
    assert insert(conn, ["m1"]) == 1
    # Just inside the window: still a duplicate.
    assert insert(conn, ["m1"], now=T0 + WINDOW_MS) == 0
    # One ms past the window: the old sighting is before the cutoff, so it is new again.
    assert insert(conn, ["m1"], now=T0 + WINDOW_MS + 1) == 1
    assert len(rows(conn, "SELECT id FROM events WHERE message_id = 'm1'")) == 2
    # And the window restarts from the new sighting.
    assert insert(conn, ["m1"], now=T0 + WINDOW_MS + 2) == 0


def test_insert_events_without_destinations_stores_nothing(conn):
    # Nothing to deliver, nothing to dedupe against later: not even the messageId is kept.
    assert insert(conn, ["m1"], destinations=()) == 1
    assert rows(conn, "SELECT id FROM events") == []
    assert insert(conn, ["m1"], now=T0 + 1) == 1
    assert insert(conn, ["m1"], now=T0 + 2) == 0


def test_insert_many_dedupes_within_one_group_and_across_requests(conn):
    first = q.IngestRequest("web", [incoming("a"), incoming("b"), incoming("a")], DESTS, T0,
                            T0 - WINDOW_MS)  # fmt: skip
    second = q.IngestRequest("web", [incoming("b"), incoming("c")], DESTS, T0, T0 - WINDOW_MS)
    other = q.IngestRequest("ios", [incoming("a")], DESTS, T0, T0 - WINDOW_MS)
    assert q.insert_many(conn, [first, second, other], Dedupe.load(conn)) == [2, 1, 1]
    stored = rows(conn, "SELECT source, message_id FROM events ORDER BY id")
    assert stored == [("web", "a"), ("web", "b"), ("web", "c"), ("ios", "a")]
    # Each new event fans out once per destination, pointing at its own event.
    fanned = rows(
        conn,
        "SELECT e.message_id, count(*) FROM deliveries d "
        "JOIN events e ON e.id = d.event_id GROUP BY e.id ORDER BY e.id",
    )
    assert fanned == [("a", len(DESTS)), ("b", len(DESTS)), ("c", len(DESTS)), ("a", len(DESTS))]


def test_insert_many_fans_out_in_sql_with_each_request_s_time(conn):
    first = q.IngestRequest("web", [incoming("a")], DESTS, T0, T0 - WINDOW_MS)
    dup = q.IngestRequest("web", [incoming("a"), incoming("b")], DESTS, T0 + 5, T0 - WINDOW_MS)
    nothing = q.IngestRequest("web", [incoming("c")], (), T0 + 6, T0 - WINDOW_MS)
    later = q.IngestRequest("web", [incoming("d")], DESTS, T0 + 9, T0 - WINDOW_MS)
    counts = q.insert_many(conn, [first, dup, nothing, later], Dedupe.load(conn))
    assert counts == [1, 1, 1, 1]  # "c" goes nowhere: counted, not stored
    fanned = rows(
        conn,
        "SELECT e.message_id, d.destination, d.created_at, d.next_at"
        " FROM deliveries d JOIN events e ON e.id = d.event_id ORDER BY e.id, d.destination",
    )
    assert fanned == [
        (m, d, t, t) for m, t in (("a", T0), ("b", T0 + 5), ("d", T0 + 9)) for d in sorted(DESTS)
    ]


def test_insert_many_fans_out_per_request_when_a_source_has_different_destinations(conn):
    # Ingest always gives one source the same destinations; the store does not rely on it.
    first = q.IngestRequest("web", [incoming("a"), incoming("b")], ("crm",), T0, T0 - WINDOW_MS)
    second = q.IngestRequest("web", [incoming("c")], ("crm", "warehouse"), T0 + 1, 0)
    other = q.IngestRequest("ios", [incoming("a")], ("warehouse",), T0 + 2, 0)
    assert q.insert_many(conn, [first, second, other], Dedupe.load(conn)) == [2, 1, 1]
    fanned = rows(
        conn,
        "SELECT e.source, e.message_id, d.destination, d.created_at, d.next_at, e.refs"
        " FROM deliveries d JOIN events e ON e.id = d.event_id ORDER BY e.id, d.destination",
    )
    assert fanned == [
        ("web", "a", "crm", T0, T0, 1),
        ("web", "b", "crm", T0, T0, 1),
        ("web", "c", "crm", T0 + 1, T0 + 1, 2),
        ("web", "c", "warehouse", T0 + 1, T0 + 1, 2),
        ("ios", "a", "warehouse", T0 + 2, T0 + 2, 1),
    ]


# --- claim, finish, release ------------------------------------------------------------------


def test_claim_returns_due_deliveries_with_payload_and_message_id(conn):
    for i, mid in enumerate(["m1", "m2", "m3"]):
        insert(conn, [mid], destinations=("crm",), now=T0 + i)
    claimed, next_due = tx(conn, q.claim, "crm", T0 + 10, 10)
    assert next_due is None
    assert [c.message_id for c in claimed] == ["m1", "m2", "m3"]
    for i, c in enumerate(claimed):
        assert orjson.loads(c.payload) == {"messageId": c.message_id, "type": "track"}
        assert c.attempt == 1
        assert c.created_at == T0 + i
        assert delivery(conn, c.delivery_id)["attempts"] == 1


def test_claim_only_returns_its_destination(conn):
    insert(conn, ["m1"], destinations=("crm", "warehouse"))
    claimed, _ = tx(conn, q.claim, "crm", T0, 10)
    assert len(claimed) == 1
    assert delivery(conn, claimed[0].delivery_id)["destination"] == "crm"
    other, _ = tx(conn, q.claim, "warehouse", T0, 10)
    assert len(other) == 1
    assert other[0].event_id == claimed[0].event_id


def test_claim_limit_takes_earliest_due_first(conn):
    for i, mid in enumerate(["m1", "m2", "m3", "m4"]):
        insert(conn, [mid], destinations=("crm",), now=T0 + i)
    first, _ = tx(conn, q.claim, "crm", T0 + 10, 2)
    second, _ = tx(conn, q.claim, "crm", T0 + 10, 2)
    assert [c.message_id for c in first] == ["m1", "m2"]
    assert [c.message_id for c in second] == ["m3", "m4"]


def test_claim_limit_prefers_older_due_retry_over_newer_id(conn):
    insert(conn, ["m1"], destinations=("crm",), now=T0)
    insert(conn, ["m2"], destinations=("crm",), now=T0 + 1)
    (c1,), _ = tx(conn, q.claim, "crm", T0 + 10, 1)
    # m1 fails and is due again at T0 + 100; m2 has been due since T0 + 1.
    tx(conn, q.finish, [Finished(c1.delivery_id, Status.RETRYING, T0 + 100, "Retry", "HTTP 503")])
    (picked,), _ = tx(conn, q.claim, "crm", T0 + 200, 1)
    assert picked.message_id == "m2"


def test_claim_returns_claimed_deliveries_in_due_order(conn):
    insert(conn, ["m1"], destinations=("crm",), now=T0)
    insert(conn, ["m2"], destinations=("crm",), now=T0 + 1)
    (c1,), _ = tx(conn, q.claim, "crm", T0 + 10, 1)
    tx(conn, q.finish, [Finished(c1.delivery_id, Status.RETRYING, T0 + 100, "Retry", "HTTP 503")])
    claimed, _ = tx(conn, q.claim, "crm", T0 + 200, 10)
    # m2 due at T0 + 1, m1 due at T0 + 100.
    assert [c.message_id for c in claimed] == ["m2", "m1"]


def test_claim_does_not_return_leased_deliveries_again(conn):
    insert(conn, ["m1", "m2"], destinations=("crm",))
    claimed, _ = tx(conn, q.claim, "crm", T0, 10)
    assert len(claimed) == 2
    again, _ = tx(conn, q.claim, "crm", T0 + 3_600_000, 10)
    assert again == []
    assert backlog.leased_counts(conn) == {"crm": 2}
    assert backlog.status_counts(conn) == {"crm": {"pending": 2}}


def test_claim_respects_next_at_of_scheduled_retry(conn):
    insert(conn, ["m1"], destinations=("crm",))
    (c,), _ = tx(conn, q.claim, "crm", T0, 10)
    tx(conn, q.finish, [Finished(c.delivery_id, Status.RETRYING, T0 + 5_000, "Retry", "HTTP 503")])

    early, next_due = tx(conn, q.claim, "crm", T0 + 4_999, 10)
    assert early == []
    assert next_due == T0 + 5_000

    (retry,), next_due = tx(conn, q.claim, "crm", T0 + 5_000, 10)
    assert next_due is None
    assert retry.delivery_id == c.delivery_id
    assert retry.attempt == 2


def test_claim_with_nothing_queued_returns_no_next_due(conn):
    assert tx(conn, q.claim, "crm", T0, 10) == ([], None)


@pytest.mark.parametrize("status", [Status.DELIVERED, Status.DISCARDED, Status.EXPIRED])
def test_finish_terminal_status_sets_status_and_finished_at(conn, status):
    insert(conn, ["m1"], destinations=("crm",))
    (c,), _ = tx(conn, q.claim, "crm", T0, 10)
    tx(conn, q.finish, [Finished(c.delivery_id, status, T0 + 50, "Bad Request", "boom")])
    row = delivery(conn, c.delivery_id)
    assert row["status"] == str(status)
    assert row["finished_at"] == T0 + 50
    assert row["leased"] == 0
    assert row["attempts"] == 1
    assert (row["last_error_type"], row["last_error"]) == ("Bad Request", "boom")
    assert backlog.status_counts(conn) == {"crm": {str(status): 1}}
    assert backlog.leased_counts(conn) == {}
    # Finished work is never due again.
    assert tx(conn, q.claim, "crm", T0 + 10 * WINDOW_MS, 10) == ([], None)


def test_finish_records_many_outcomes_at_once(conn):
    insert(conn, ["m1", "m2", "m3"], destinations=("crm",))
    c1, c2, c3 = tx(conn, q.claim, "crm", T0, 10)[0]
    tx(
        conn,
        q.finish,
        [
            Finished(c1.delivery_id, Status.DELIVERED, T0 + 1),
            Finished(c2.delivery_id, Status.RETRYING, T0 + 9_000, "Timeout", "no result"),
            Finished(c3.delivery_id, Status.DISCARDED, T0 + 1, "Message Rejected", "bad"),
        ],
    )
    assert backlog.status_counts(conn) == {"crm": {"delivered": 1, "retrying": 1, "discarded": 1}}


def test_finish_retrying_schedules_and_keeps_delivery_unfinished(conn):
    insert(conn, ["m1"], destinations=("crm",))
    (c,), _ = tx(conn, q.claim, "crm", T0, 10)
    tx(conn, q.finish, [Finished(c.delivery_id, Status.RETRYING, T0 + 7_000, "Timeout", "5s")])
    row = delivery(conn, c.delivery_id)
    assert row["status"] == "retrying"
    assert row["finished_at"] is None
    assert row["next_at"] == T0 + 7_000
    assert row["leased"] == 0
    assert (row["last_error_type"], row["last_error"]) == ("Timeout", "5s")
    assert backlog.status_counts(conn) == {"crm": {"retrying": 1}}


def test_release_gives_the_attempt_back(conn):
    insert(conn, ["m1"], destinations=("crm",))
    (c,), _ = tx(conn, q.claim, "crm", T0, 10)
    tx(conn, q.release, [c.delivery_id], T0 + 20)
    row = delivery(conn, c.delivery_id)
    assert (row["attempts"], row["leased"], row["next_at"]) == (0, 0, T0 + 20)
    assert tx(conn, q.claim, "crm", T0 + 19, 10) == ([], T0 + 20)
    (again,), _ = tx(conn, q.claim, "crm", T0 + 20, 10)
    assert again.delivery_id == c.delivery_id
    assert again.attempt == 1


# --- crash recovery --------------------------------------------------------------------------


def test_recover_after_abandoned_claim_makes_delivery_due_with_attempts_kept(db_path):
    conn = open_db(db_path)
    insert(conn, ["m1", "later"], destinations=("crm",))
    c, later = tx(conn, q.claim, "crm", T0, 10)[0]
    tx(conn, q.finish, [Finished(later.delivery_id, Status.RETRYING, T0 + 60_000, "Retry", "x")])
    assert c.message_id == "m1"
    conn.close()  # the daemon died mid-delivery: no finish, no release

    conn = open_db(db_path)
    try:
        # Still leased after the restart: without recovery it would wait out the lease.
        assert backlog.leased_counts(conn) == {"crm": 1}
        assert tx(conn, q.recover, T0 + 100) == 1
        assert backlog.leased_counts(conn) == {}
        claimed, _ = tx(conn, q.claim, "crm", T0 + 100, 10)
        # Only the abandoned one is due, and its lost try counts; the retry keeps its time.
        assert [(x.delivery_id, x.attempt) for x in claimed] == [(c.delivery_id, 2)]
    finally:
        conn.close()


def test_recover_leaves_unleased_deliveries_alone(db_path):
    conn = open_db(db_path)
    insert(conn, ["m1", "m2", "m3"], destinations=("crm",))
    (c1, c2), _ = tx(conn, q.claim, "crm", T0, 2)
    tx(
        conn,
        q.finish,
        [
            Finished(c1.delivery_id, Status.RETRYING, T0 + 60_000, "Retry", "HTTP 503"),
            Finished(c2.delivery_id, Status.DELIVERED, T0 + 5),
        ],
    )
    before = rows(conn, "SELECT * FROM deliveries ORDER BY id")
    conn.close()

    conn = open_db(db_path)
    try:
        assert tx(conn, q.recover, T0 + 100) == 0
        assert rows(conn, "SELECT * FROM deliveries ORDER BY id") == before
    finally:
        conn.close()


# --- prune -----------------------------------------------------------------------------------


def finish_all(conn, destination: str, now: int, status: Status = Status.DELIVERED) -> list[int]:
    claimed, _ = tx(conn, q.claim, destination, now, 100)
    tx(conn, q.finish, [Finished(c.delivery_id, status, now) for c in claimed])
    return [c.delivery_id for c in claimed]


def test_prune_deletes_finished_deliveries_older_than_cutoff(conn):
    insert(conn, ["old"], destinations=("crm",), now=T0)
    insert(conn, ["new"], destinations=("crm",), now=T0 + 1)
    insert(conn, ["waiting"], destinations=("crm",), now=T0 + 900_000)
    # "old" and "new" are due, "waiting" is not yet; "new" finishes after the cutoff.
    (old, new), _ = tx(conn, q.claim, "crm", T0 + 10, 10)
    tx(
        conn,
        q.finish,
        [
            Finished(old.delivery_id, Status.DELIVERED, T0 + 10),
            Finished(new.delivery_id, Status.DELIVERED, T0 + 1_000),
        ],
    )

    assert tx(conn, retention.prune, T0 + 500, 100) == 1
    remaining = rows(
        conn,
        "SELECT e.message_id, d.status FROM deliveries d JOIN events e ON e.id = d.event_id"
        " ORDER BY d.id",
    )
    assert remaining == [("new", "delivered"), ("waiting", "pending")]
    assert rows(conn, "SELECT message_id FROM events ORDER BY id") == [("new",), ("waiting",)]


def test_prune_keeps_event_until_all_its_deliveries_are_gone(conn):
    insert(conn, ["m1"], destinations=("crm", "warehouse"))
    finish_all(conn, "crm", T0 + 10)
    assert tx(conn, retention.prune, T0 + 500, 100) == 1
    assert rows(conn, "SELECT message_id, refs FROM events") == [("m1", 1)]
    # The warehouse delivery still has its payload to deliver.
    (c,), _ = tx(conn, q.claim, "warehouse", T0 + 600, 10)
    assert orjson.loads(c.payload)["messageId"] == "m1"
    tx(conn, q.finish, [Finished(c.delivery_id, Status.DISCARDED, T0 + 700)])
    assert tx(conn, retention.prune, T0 + 800, 100) == 1
    assert rows(conn, "SELECT id FROM events") == []


def test_prune_never_deletes_unfinished_deliveries(conn):
    insert(conn, ["pending", "retrying", "leased"], destinations=("crm",))
    c1, c2 = tx(conn, q.claim, "crm", T0, 2)[0]
    tx(conn, q.finish, [Finished(c1.delivery_id, Status.RETRYING, T0 + 1_000, "Retry", "x")])
    # c2 stays leased; the third is pending.
    assert tx(conn, retention.prune, T0 + 100 * WINDOW_MS, 100) == 0
    assert len(rows(conn, "SELECT id FROM deliveries")) == 3
    assert len(rows(conn, "SELECT id FROM events")) == 3
    assert c2.delivery_id in [i for (i,) in rows(conn, "SELECT id FROM deliveries")]


def test_prune_respects_limit_and_can_be_called_again(conn):
    insert(conn, [f"m{i}" for i in range(5)], destinations=("crm",))
    finish_all(conn, "crm", T0 + 10)
    assert tx(conn, retention.prune, T0 + 500, 2) == 2
    assert tx(conn, retention.prune, T0 + 500, 2) == 2
    assert tx(conn, retention.prune, T0 + 500, 2) == 1
    assert rows(conn, "SELECT id FROM deliveries") == []
    assert rows(conn, "SELECT id FROM events") == []


def test_status_counts_groups_by_destination_and_status(conn):
    insert(conn, ["m1", "m2", "m3"], destinations=("crm", "warehouse"))
    (c, *_), _ = tx(conn, q.claim, "crm", T0, 1)
    tx(conn, q.finish, [Finished(c.delivery_id, Status.EXPIRED, T0 + 1)])
    assert backlog.status_counts(conn) == {
        "crm": {"pending": 2, "expired": 1},
        "warehouse": {"pending": 3},
    }


def counted_by_scan(conn) -> dict[str, dict[str, int]]:
    """What status_counts must say: every delivery row counted."""
    counts: dict[str, dict[str, int]] = {}
    for destination, status, n in conn.execute(SQL["status_counts_scan"]):
        counts.setdefault(destination, {})[status] = n
    return counts


def test_status_counts_stay_exact_through_every_transition(conn):
    """Finished deliveries are counted by triggers, not by a scan: after each kind of change
    (fan-out, lease, retry, each finished status, a retry that finishes, pruning, release and
    crash recovery) the counts equal a count of every row."""

    def check() -> None:
        assert backlog.status_counts(conn) == counted_by_scan(conn)

    insert(conn, [f"m{i}" for i in range(12)], destinations=("crm", "warehouse"))
    check()
    claimed, _ = tx(conn, q.claim, "crm", T0, 12)
    check()
    statuses = [Status.DELIVERED, Status.DISCARDED, Status.EXPIRED, Status.DROPPED]
    retry = [
        Finished(c.delivery_id, Status.RETRYING, T0 + 5, "Retry", "HTTP 503") for c in claimed[:4]
    ]
    done = [Finished(c.delivery_id, statuses[i % 4], T0 + 1) for i, c in enumerate(claimed[4:10])]
    tx(conn, q.finish, retry + done)
    check()
    tx(conn, q.release, [c.delivery_id for c in claimed[10:11]], T0 + 2)
    check()
    assert tx(conn, q.recover, T0 + 3) == 1  # claimed[11], as after a crash
    check()
    # The retries come due and finish, one of them delivered, one retried again.
    again, _ = tx(conn, q.claim, "crm", T0 + 10, 100)
    assert {c.delivery_id for c in retry} <= {c.delivery_id for c in again}
    outcomes = [Finished(c.delivery_id, Status.DELIVERED, T0 + 11) for c in again[1:]]
    outcomes.append(Finished(again[0].delivery_id, Status.RETRYING, T0 + 20, "Retry", "again"))
    tx(conn, q.finish, outcomes)
    check()
    assert backlog.status_counts(conn)["crm"] == {
        "retrying": 1,
        "delivered": 7,  # 2 at once, then 3 retried + the released and the recovered one
        "discarded": 2,
        "expired": 1,
        "dropped": 1,
    }
    assert backlog.status_counts(conn)["warehouse"] == {"pending": 12}
    # A discarded delivery sent again by hand (SQL, as an operator might): out of the counts.
    discarded = done[1].delivery_id
    conn.execute(
        "UPDATE deliveries SET status = 'pending', next_at = ? WHERE id = ?", (T0, discarded)
    )
    check()
    tx(conn, q.claim, "crm", T0 + 30, 100)
    tx(conn, q.finish, [Finished(discarded, Status.DELIVERED, T0 + 31)])
    check()
    assert backlog.status_counts(conn)["crm"]["discarded"] == 1
    # A destination renamed by hand: its finished counts move with it.
    conn.execute("UPDATE deliveries SET destination = 'crm2' WHERE destination = 'crm'")
    check()
    conn.execute("UPDATE deliveries SET destination = 'crm' WHERE destination = 'crm2'")
    check()
    # Pruning takes finished rows out of the counts; a destination with none left disappears.
    tx(conn, retention.prune, T0 + 1_000, 3)
    check()
    while tx(conn, retention.prune, T0 + 1_000, 100):
        pass
    check()
    assert backlog.status_counts(conn) == {"crm": {"retrying": 1}, "warehouse": {"pending": 12}}


def test_status_counts_upgrade_counts_existing_history(db_path):
    """A database from before finished_counts (schema 5): `stats` still counts it (by a scan)
    until the daemon opens it, and the upgrade counts every finished delivery once."""
    db_path.parent.mkdir(parents=True)
    old = database_at_schema(db_path, 5)
    old.execute(
        "INSERT INTO events (id, source, message_id, received_at, refs, payload)"
        " VALUES (1, 'web', 'm1', 1, 4, x'7b7d')"
    )
    for dest, status in [
        ("crm", "delivered"),
        ("crm", "delivered"),
        ("crm", "pending"),
        ("hook", "expired"),
    ]:
        old.execute(
            "INSERT INTO deliveries (event_id, destination, status, created_at, next_at)"
            " VALUES (1, ?, ?, 1, 1)",
            (dest, status),
        )
    old.close()
    expected = {"crm": {"delivered": 2, "pending": 1}, "hook": {"expired": 1}}
    reader = open_db(db_path, readonly=True)
    assert backlog.status_counts(reader) == expected
    reader.close()
    conn = open_db(db_path)
    assert rows(conn, "SELECT * FROM finished_counts ORDER BY 1, 2") == [
        ("crm", "delivered", 2),
        ("hook", "expired", 1),
    ]
    assert backlog.status_counts(conn) == expected
    conn.close()


# --- query plan ------------------------------------------------------------------------------


def test_claim_query_plan_uses_deliveries_due_index(conn):
    inner = SQL["due"]
    # Some finished history, so the planner has something to avoid.
    insert(conn, [f"m{i}" for i in range(50)], destinations=("crm", "warehouse"))
    finish_all(conn, "crm", T0 + 10)
    conn.execute("ANALYZE")
    plan = [
        row[3]
        for row in conn.execute(
            f"EXPLAIN QUERY PLAN {inner}", {"destination": "crm", "now": T0, "limit": 10}
        )
    ]
    text = "\n".join(plan)
    assert "deliveries_due" in text, text
    assert not any(re.match(r"SCAN deliveries\b(?! USING)", d) for d in plan), text
    # The index also yields due order: no sort step.
    assert "TEMP B-TREE" not in text, text


def test_stats_queries_never_walk_delivered_history(conn):
    insert(conn, [f"m{i}" for i in range(50)], destinations=("crm", "warehouse"))
    finish_all(conn, "crm", T0 + 10)
    conn.execute("ANALYZE")
    for name in ("status_counts", "leased_counts"):
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {SQL[name]}")]
        text = "\n".join(plan)
        assert not any(re.match(r"SCAN deliveries\b(?! USING)", d) for d in plan), text


# --- the writer ------------------------------------------------------------------------------


async def test_writer_runs_queue_functions_in_transactions(db_path):
    conn = open_db(db_path)
    async with running_writer(conn) as writer:
        new = await writer.run(
            q.insert_events,
            Dedupe.load(conn),
            "web",
            [incoming("m1")],
            ("crm",),
            T0,
            T0 - WINDOW_MS,
        )
        assert new == 1
        claimed, _ = await writer.run(q.claim, "crm", T0, 10)
        await writer.run(q.finish, [Finished(claimed[0].delivery_id, Status.DELIVERED, T0 + 1)])
        counts = await writer.run(backlog.status_counts)
    assert counts == {"crm": {"delivered": 1}}
    assert writer.groups >= 4
    # Committed: a fresh connection (a restart) sees it.
    conn = open_db(db_path)
    try:
        assert backlog.status_counts(conn) == {"crm": {"delivered": 1}}
    finally:
        conn.close()


async def test_writer_group_commits_concurrent_runs(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn)
    async with running_writer(conn) as writer:
        await writer.run(backlog.status_counts)  # warm up: the serve task is waiting for work
        before = writer.groups
        results = await asyncio.gather(
            *(
                writer.run(
                    q.insert_events, dedupe, "web", [incoming(f"m{i}")], DESTS, T0, T0 - WINDOW_MS
                )
                for i in range(200)
            )
        )
        groups = writer.groups - before
        counts = await writer.run(backlog.status_counts)
    assert results == [1] * 200
    assert counts == {d: {"pending": 200} for d in DESTS}
    assert 1 <= groups <= 20


@pytest.mark.parametrize("turns", [16, 0])
async def test_writer_gathers_work_that_keeps_arriving_into_one_group(db_path, monkeypatch, turns):
    monkeypatch.setattr(writer_module, "GATHER_TURNS", turns)
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn)

    async def arrive_after(turns_later: int, i: int) -> int:
        for _ in range(turns_later):
            await asyncio.sleep(0)
        return await writer.run(
            q.insert_events, dedupe, "web", [incoming(f"m{i}")], DESTS, T0, T0 - WINDOW_MS
        )

    async with running_writer(conn) as writer:
        await writer.run(backlog.status_counts)  # the writer now waits for work
        before = writer.groups
        # Five requests, one loop turn apart, as under load.
        assert await asyncio.gather(*(arrive_after(i, i) for i in range(5))) == [1] * 5
        groups = writer.groups - before
    if turns:
        assert groups == 1
    else:
        assert groups > 1  # without gathering the first group leaves at once


async def test_writer_failing_op_fails_alone_in_its_group(db_path):
    def insert_then_fail(c: sqlite3.Connection) -> None:
        q.insert_events(c, Dedupe.load(c), "web", [incoming("doomed")], DESTS, T0, T0 - WINDOW_MS)
        raise ValueError("handler bug")

    def violate_constraint(c: sqlite3.Connection) -> None:
        q.insert_events(
            c, Dedupe.load(c), "web", [incoming("doomed-too")], DESTS, T0, T0 - WINDOW_MS
        )
        c.execute("INSERT INTO deliveries (event_id, destination, status) VALUES (1, 'x', 'y')")

    def ok(i: int):
        return writer.run(
            q.insert_events, dedupe, "web", [incoming(f"m{i}")], DESTS, T0, T0 - WINDOW_MS
        )

    conn = open_db(db_path)
    dedupe = Dedupe.load(conn)
    async with running_writer(conn) as writer:
        await writer.run(backlog.status_counts)
        before = writer.groups
        results = await asyncio.gather(
            ok(0),
            writer.run(insert_then_fail),
            ok(1),
            writer.run(violate_constraint),
            ok(2),
            return_exceptions=True,
        )
        groups = writer.groups - before
        messages = await writer.run(
            lambda c: sorted(m for (m,) in c.execute("SELECT message_id FROM events"))
        )
    assert groups == 1  # all five were queued before the writer woke: one transaction
    assert results[0] == results[2] == results[4] == 1
    assert isinstance(results[1], ValueError)
    # SQLite errors are wrapped once at the store boundary.
    assert isinstance(results[3], StoreError)
    # The failed ops' own writes were rolled back; the others committed.
    assert messages == ["m0", "m1", "m2"]


async def test_writer_close_commits_queued_work_then_refuses_more(db_path):
    conn = open_db(db_path)
    dedupe = Dedupe.load(conn)
    writer = Writer(conn)
    task = asyncio.create_task(writer.serve(), name="writer")
    try:
        pending = [
            asyncio.ensure_future(
                writer.run(q.insert_events, dedupe, "web", [incoming(f"m{i}")], DESTS, T0, 0)
            )
            for i in range(3)
        ]
        await asyncio.sleep(0)  # let the runs queue up
        writer.close()
        async with asyncio.timeout(10):
            assert await asyncio.gather(*pending) == [1, 1, 1]
            await task
        with pytest.raises(StoreError):
            await writer.run(backlog.status_counts)
    finally:
        writer.close()
        async with asyncio.timeout(10):
            await task
        writer.shutdown()
    conn = open_db(db_path)
    try:
        assert len(rows(conn, "SELECT id FROM events")) == 3
    finally:
        conn.close()


# --- attempt records ---------------------------------------------------------------------------


def test_finish_records_attempts_and_prune_invocations_keeps_the_size_budget(conn):
    from destfnd.store.models import Invocation

    insert(conn, [f"m{i}" for i in range(6)], destinations=("crm",), now=T0)
    claimed, _ = q.claim(conn, "crm", T0, 10)
    sizes = []
    for n, c in enumerate(claimed):
        logs = "x" * (100 * (n + 1))
        inv = Invocation("crm", T0 + n, 1.0, "function:abc", logs, b"[]")
        done = Finished(c.delivery_id, Status.DELIVERED, T0 + n, None, None, c.attempt, T0 + n)
        sizes.append(q.finish(conn, [done], inv))
    # Logs and requests, and the row's own texts and fixed bytes.
    row = len("crm") + len("function:abc") + q.RECORD_ROW_BYTES
    assert sizes == [100 * (n + 1) + 2 + row for n in range(6)]
    total = retention.invocations_size(conn)
    assert total == sum(sizes)
    # A delivered attempt is the delivery row itself, pointing at its invocation.
    assert conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0
    linked = conn.execute(
        "SELECT i.started_at FROM deliveries d JOIN invocations i ON i.id = d.invocation_id"
        " ORDER BY d.id"
    ).fetchall()
    assert linked == [(T0 + n,) for n in range(6)]
    # Nothing is old: only the budget prunes, oldest first, until the rest fits.
    deleted, freed = retention.prune_invocations(conn, T0 - 1, total - 250, total, 100)
    assert (deleted, freed) == (2, sizes[0] + sizes[1])
    left = [r[0] for r in conn.execute("SELECT started_at FROM invocations ORDER BY id")]
    assert left == [T0 + n for n in range(2, 6)]
    # Age prunes whatever started before the cutoff, whatever the budget.
    deleted, _ = retention.prune_invocations(conn, T0 + 4, 10**9, total - freed, 100)
    assert deleted == 2
    # Pruning a delivery takes its attempts along.
    insert(conn, ["failing"], destinations=("crm",), now=T0)
    (c,), _ = q.claim(conn, "crm", T0, 10)
    failed = Finished(
        c.delivery_id, Status.DISCARDED, T0 + 7, "Bad Request", "no", c.attempt, T0 + 7
    )
    q.finish(conn, [failed], Invocation("crm", T0 + 7, 1.0, None, "", b"[]"))
    assert conn.execute("SELECT status FROM attempts").fetchall() == [("discarded",)]
    retention.prune(conn, T0 + 100, 100)
    assert conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0


def test_the_records_size_budget_counts_what_records_take_on_disk(conn):
    """`storage.records_max_size` bounds the file: a webhook's records, about 100 bytes of
    text each, are counted with their rows, within a quarter of the pages they fill."""
    from destfnd.store.models import Invocation

    request = b'[{"method":"POST","url":"http://127.0.0.1:8000/in","events":1,"status":200}]'
    pages_before = _pages_in_use(conn)
    counted = 0
    for k in range(20_000):  # records alone (no outcomes): only their table grows
        counted += q.finish(conn, [], Invocation("hook", T0 + k, 1.7, None, "", request))
    on_disk = (_pages_in_use(conn) - pages_before) * 4096
    assert retention.invocations_size(conn) == counted
    assert 0.75 * on_disk <= counted <= 1.25 * on_disk, (counted, on_disk)


def _pages_in_use(conn) -> int:
    (size,) = conn.execute("PRAGMA page_size").fetchone()
    assert size == 4096
    (count,) = conn.execute("PRAGMA page_count").fetchone()
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    return count - free


def test_insert_many_gives_events_their_own_destinations(conn):
    """`only`: an event's own destinations (its integrations object turned some off); one
    with none left is not stored, so its messageId can still come again to a destination."""
    routed = q.IngestRequest(
        "web", [incoming("a"), incoming("b"), incoming("none"), incoming("c")], DESTS, T0,
        T0 - WINDOW_MS, [DESTS, ("warehouse",), (), ("crm",)],
    )  # fmt: skip
    plain = q.IngestRequest("web", [incoming("d"), incoming("b")], DESTS, T0, T0 - WINDOW_MS)
    dedupe = Dedupe.load(conn)
    assert tx(conn, q.insert_many, [routed, plain], dedupe) == [3, 1]
    deliveries = rows(
        conn,
        "SELECT e.message_id, d.destination FROM deliveries d JOIN events e ON e.id = d.event_id"
        " ORDER BY e.id, d.destination",
    )
    assert deliveries == [("a", "crm"), ("a", "warehouse"), ("b", "warehouse"), ("c", "crm"),
                          ("d", "crm"), ("d", "warehouse")]  # fmt: skip
    # refs count each event's own deliveries, so pruning frees them when those are gone.
    assert rows(conn, "SELECT message_id, refs FROM events ORDER BY id") == [
        ("a", 2),
        ("b", 1),
        ("c", 1),
        ("d", 2),
    ]
    again = q.IngestRequest("web", [incoming("none")], DESTS, T0 + 1, T0 - WINDOW_MS)
    assert tx(conn, q.insert_many, [again], dedupe) == [1]


def test_move_and_discard_take_waiting_deliveries_not_in_flight(conn):
    """`destfnd move` and `discard`: a delivery in flight is the daemon's, and an event the
    new destination has a delivery of already is not given a second one."""
    insert(conn, ["running"], destinations=("crm",))
    (leased,), _ = tx(conn, q.claim, "crm", T0 + 10_000, 1)
    insert(conn, ["both"], destinations=("crm", "warehouse"))
    insert(conn, ["alone"], destinations=("crm",))
    ids = tx(conn, backlog.unfinished, "crm", None, 0, 100)
    assert leased.delivery_id not in ids and len(ids) == 2
    # Not those of events ingested after the command started (its newest delivery then).
    assert tx(conn, backlog.unfinished, "crm", None, 0, 100, False, ids[0]) == ids[:1]
    assert tx(conn, backlog.move, ids, "warehouse", T0 + 5) == 1
    by_event = rows(
        conn,
        "SELECT e.message_id, d.destination, d.next_at FROM deliveries d"
        " JOIN events e ON e.id = d.event_id ORDER BY d.id",
    )
    assert by_event == [("running", "crm", by_event[0][2]), ("both", "crm", T0),
                        ("both", "warehouse", T0), ("alone", "warehouse", T0 + 5)]  # fmt: skip
    ids = tx(conn, backlog.unfinished, "warehouse", None, 0, 100)
    assert tx(conn, backlog.discard, ids, T0 + 6, "by hand") == 2
    assert backlog.status_counts(conn)["warehouse"] == {"discarded": 2}
    # Finished now: pruned with the others after retention.
    assert tx(conn, retention.prune, T0 + 7, 100) == 2


def test_move_takes_the_leases_a_killed_daemon_left_only_when_none_runs(tmp_path):
    """After a kill -9 a delivery stays leased until the next start: `move` passed it by, and
    at the start it was due again under the old name. With a daemon running (its lock held),
    a leased delivery is in flight and is left alone."""
    from destfnd.store.lock import DatabaseLock

    path = tmp_path / "db.sqlite3"
    conn = open_db(path)
    insert(conn, ["leased", "waiting"], destinations=("crm",))
    tx(conn, q.claim, "crm", T0 + 10_000, 1)  # then killed: the lease stays
    conn.close()
    config = tmp_path / "destfnd.toml"
    config.write_text(
        f'[storage]\npath = "{path}"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "warehouse"\ntype = "file"\npath = "out.ndjson"\n'
    )
    move = ("move", "--config", str(config), "--from", "crm", "--to", "warehouse", "--json")
    lock = DatabaseLock(path)  # as a running daemon holds it
    try:
        assert orjson.loads(run_cli(*move).stdout) == {"moved": 1, "left": 0}
    finally:
        lock.close()
    assert orjson.loads(run_cli(*move).stdout) == {"moved": 1, "left": 0}
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert rows(conn, "SELECT destination, leased, attempts FROM deliveries ORDER BY id") == [
            ("warehouse", 0, 1),
            ("warehouse", 0, 0),
        ]


def test_prune_invocations_of_deletes_one_destinations_old_records_among_others(conn):
    """A destination with a short max_age has its records pruned by it, not by the longest
    max_age of another destination, whose records in between are passed by and kept."""
    # Interleaved, one per ms: crm at T0 + 0, warehouse at T0 + 1, crm at T0 + 2, ...
    records = [(DESTS[n % 2], T0 + n) for n in range(10)]
    conn.executemany(
        SQL["insert_invocation"], [(d, t, 1.0, None, "x" * 10, b"[]", 12) for d, t in records]
    )

    def left() -> list[tuple[str, int]]:
        query = "SELECT destination, started_at FROM invocations ORDER BY id"
        return conn.execute(query).fetchall()

    # crm's records started before T0 + 5, in scans of 2 records: the warehouse's are passed by.
    after, more, passes, gone = 0, True, 0, 0
    while more:
        deleted, freed, after, more = tx(
            conn, retention.prune_invocations_of, {"crm"}, T0 + 5, after, 2
        )
        assert freed == 12 * deleted
        gone += deleted
        passes += 1
    assert gone == 3 and passes == 3  # the third scan reaches T0 + 5 and ends
    assert left() == [(d, t) for d, t in records if d == "warehouse" or t >= T0 + 5]
    # The next scan goes on from there: records already looked at are not looked at again,
    # and a later cutoff takes the rest.
    # The scan stops before the newest record (id 10): its id would be taken again.
    assert tx(conn, retention.prune_invocations_of, {"crm"}, T0 + 100, 5, 100) == (2, 24, 9, False)
    assert left() == [(d, t) for d, t in records if d == "warehouse"]
    assert retention.invocations_size(conn) == 60
    # The newest is kept however old: a record of crm after it (id 11) is found next time,
    # and one deleted would have given its id to the next (12), which the scan, gone on
    # from 11, would never have looked at.
    insert_invocation = SQL["insert_invocation"]
    conn.execute(insert_invocation, ("crm", T0 + 10, 1.0, None, "x" * 10, b"[]", 12))
    assert tx(conn, retention.prune_invocations_of, {"crm"}, T0 + 100, 9, 100) == (0, 0, 10, False)
    conn.execute(insert_invocation, ("crm", T0 + 11, 1.0, None, "x" * 10, b"[]", 12))
    assert tx(conn, retention.prune_invocations_of, {"crm"}, T0 + 100, 10, 100) == (
        1,
        12,
        11,
        False,
    )
    (newest,) = conn.execute("SELECT max(id) FROM invocations").fetchone()
    assert newest == 12


@pytest.mark.parametrize("folder", ["with#hash", "with?question", "with%25percent", "with space"])
def test_store_a_database_path_with_uri_characters_opens_for_commands(tmp_path, folder):
    """stats, deliveries and retry open the database as an SQLite URI: a "#" or "?" in its path
    ended the path there ("no such table", and a stray empty file created at the cut)."""
    path = tmp_path / folder / "db.sqlite3"
    open_db(path).close()
    for mode in ({"readonly": True}, {"update": True}):
        conn = open_db(path, **mode)
        try:
            assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
        finally:
            conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]


def test_shift_retries_brings_waiting_retries_forward_by_a_step_back(conn):
    """The wall clock stepped back an hour: a retry meant for a minute from now waited an
    hour and a minute. Only waiting retries move, never before now; pending, leased and
    finished ones are left as they are."""
    insert(conn, ["wait", "soon", "leased", "done", "pending"], destinations=("crm",))
    (wait, soon, leased, done), _ = tx(conn, q.claim, "crm", T0, 4)
    hour = 3_600_000
    tx(conn, q.finish, [
        Finished(wait.delivery_id, Status.RETRYING, T0 + hour + 60_000, "Retry", "x"),
        Finished(soon.delivery_id, Status.RETRYING, T0 + 30_000, "Retry", "x"),
        Finished(done.delivery_id, Status.DELIVERED, T0 + 5),
    ])  # fmt: skip
    before = dict(rows(conn, "SELECT id, next_at FROM deliveries"))
    # The clock read T0 + hour when it stepped back to T0.
    assert tx(conn, q.shift_retries, -hour, T0) == 2
    after = dict(rows(conn, "SELECT id, next_at FROM deliveries"))
    assert after[wait.delivery_id] == T0 + 60_000
    assert after[soon.delivery_id] == T0  # not before now
    for unmoved in (leased, done):
        assert after[unmoved.delivery_id] == before[unmoved.delivery_id]
    assert len(after) == 5 and after[5] == before[5]  # the pending one (id 5), due at ingest


# --- work for several destinations at once, in a few SQLite steps ------------------------------


def test_claim_many_gives_each_destination_its_due_deliveries_with_payloads_byte_exact(conn):
    """The rows come back from SQLite as JSON text (one step for all of them): payloads and
    messageIds must still be exactly the bytes stored, whatever they hold."""
    odd = [
        "plain",
        'quote " backslash \\ newline \n tab \t',
        "é ☃ 😀 \u2028 \x01",
    ]
    tx(
        conn,
        q.insert_events,
        Dedupe.load(conn),
        "web",
        [
            IncomingEvent(m, orjson.dumps({"messageId": m, "p": m, "n": i, "f": 0.1}))
            for i, m in enumerate(odd)
        ],
        DESTS,
        T0,
        T0 - WINDOW_MS,
    )
    stored = dict(rows(conn, "SELECT message_id, payload FROM events"))
    # A retry of crm's first delivery comes due before its other two (due order, not id order).
    (first,), _ = tx(conn, q.claim, "crm", T0, 1)
    retry = Finished(first.delivery_id, Status.RETRYING, T0 - 5, "Retry", "HTTP 503")
    tx(conn, q.finish, [retry])
    results = tx(conn, q.claim_many, [("crm", T0, 10), ("warehouse", T0, 2), ("gone", T0, 10)])
    (crm, crm_next), (warehouse, _), (gone, gone_next) = results
    assert [c.message_id for c in crm] == odd  # the retry (due at T0 - 5) first
    assert [c.attempt for c in crm] == [2, 1, 1]
    assert [c.message_id for c in warehouse] == odd[:2]  # its limit
    for c in crm + warehouse:
        assert isinstance(c.payload, bytes)
        assert c.payload == stored[c.message_id]
    assert crm_next is None and gone == [] and gone_next is None
    # Leased: claimed again, none of them comes back; warehouse's third still does.
    again = tx(conn, q.claim_many, [("crm", T0, 10), ("warehouse", T0, 10)])
    assert again[0] == ([], T0 + q.LEASE_MS)  # nothing due before the leases run out
    assert [c.message_id for c in again[1][0]] == odd[2:]


def test_finish_batches_records_each_destination_s_outcomes_and_returns_their_sizes(conn):
    from destfnd.store.models import Invocation

    insert(conn, ["a", "b", "c"], destinations=("crm", "warehouse"), now=T0)
    crm, _ = tx(conn, q.claim, "crm", T0, 10)
    warehouse, _ = tx(conn, q.claim, "warehouse", T0, 10)
    requests = orjson.dumps([{"url": "https://x.test/é", "body": 'a "quoted" \n line'}])
    crm_items = [
        (
            [Finished(c.delivery_id, Status.DELIVERED, T0 + 1, attempt=1, ended_at=T0 + 1)],
            Invocation("crm", T0, 2.5, None, f"log {n} ✓", requests),
        )
        for n, c in enumerate(crm)
    ]
    warehouse_items = [
        (
            [
                Finished(warehouse[0].delivery_id, Status.RETRYING, T0 + 60_000, "Retry",
                         "HTTP 503", 1, T0 + 2),
                Finished(warehouse[1].delivery_id, Status.DISCARDED, T0 + 2, "Bad Request",
                         "HTTP 400", 1, T0 + 2),
                Finished(warehouse[2].delivery_id, Status.DROPPED, T0 + 2, None, None, 1, T0 + 2),
            ],
            Invocation("warehouse", T0, 7.0, "v1", "", b"[]"),
        ),
        ([], None),
    ]  # fmt: skip
    sizes = tx(conn, q.finish_batches, [crm_items, warehouse_items, []])
    row = q.RECORD_ROW_BYTES
    # Bytes as stored (UTF-8: "✓" takes 3), not characters.
    log_sizes = [len(f"log {n} ✓".encode()) + len(requests) + len("crm") + row for n in range(3)]
    warehouse_size = 2 + len("warehouse") + len("v1") + row
    assert sizes == [sum(log_sizes), warehouse_size, 0]
    assert retention.invocations_size(conn) == sum(log_sizes) + warehouse_size
    # Each unit's invocation is its own row, with its logs and requests as they were.
    recorded = rows(
        conn,
        "SELECT d.destination, d.status, i.logs, i.requests, i.duration_ms FROM deliveries d"
        " JOIN invocations i ON i.id = d.invocation_id ORDER BY d.id",
    )
    crm_rows = [r for r in recorded if r[0] == "crm"]
    assert [r[2] for r in crm_rows] == [f"log {n} ✓" for n in range(3)]
    assert {(r[1], r[3], r[4]) for r in crm_rows} == {("delivered", requests, 2.5)}
    assert isinstance(crm_rows[0][3], bytes)
    assert len({r[2] for r in recorded if r[0] == "warehouse"}) == 1  # one shared invocation
    w = [delivery(conn, c.delivery_id) for c in warehouse]
    assert [d["status"] for d in w] == ["retrying", "discarded", "dropped"]
    assert w[0]["next_at"] == T0 + 60_000 and w[0]["finished_at"] is None
    assert (w[1]["last_error_type"], w[1]["last_error"]) == ("Bad Request", "HTTP 400")
    assert all(d["leased"] == 0 for d in w)
    assert rows(conn, "SELECT status, error FROM attempts ORDER BY delivery_id") == [
        ("retrying", "HTTP 503"),
        ("discarded", "HTTP 400"),
        ("dropped", None),
    ]
    assert backlog.status_counts(conn)["crm"] == {"delivered": 3}
    # Invocation ids keep counting up after the ones given here.
    conn.execute(SQL["insert_invocation"], ("crm", T0, 1.0, None, "", b"[]", 2))
    ids = [i for (i,) in rows(conn, "SELECT id FROM invocations ORDER BY id")]
    assert ids == list(range(ids[0], ids[0] + 5))


async def test_writer_client_work_waits_for_at_most_one_group_of_other_work(db_path):
    """Urgent work (ingest: a client waits) queued beside other work goes in a group of its
    own every other group: under a delivery load that keeps the writer busy, a request waits
    for one group with other work in it, not for every group."""
    conn = open_db(db_path)
    ran: list[tuple[str, int]] = []  # (op, group), in the order the writer ran them
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def op(name: str, block_s: float = 0.0) -> Callable[[sqlite3.Connection, list], list]:
        def run(c: sqlite3.Connection, items: list) -> list:
            if block_s:
                loop.call_soon_threadsafe(started.set)
                import time

                time.sleep(block_s)  # the writer thread is busy with this group meanwhile
            ran.append((name, writer.groups))
            return items

        run.__name__ = name
        return run

    async with running_writer(conn) as writer:
        await writer.run(backlog.status_counts)
        busy = asyncio.create_task(writer.run_batched(op("busy", 0.2), 0))
        await started.wait()
        # Queued while the first group runs: delivery work, then a request, then more of each.
        waiting = [
            writer.run_batched(op("claim"), 1),
            writer.run_batched(op("ingest"), 2, urgent=True),
            writer.run_batched(op("finish"), 3),
        ]
        assert await asyncio.gather(busy, *waiting) == [0, 1, 2, 3]
    groups = {name: group for name, group in ran}
    # The request's group had nothing else; the other work went in the one after.
    assert groups["ingest"] < groups["claim"] == groups["finish"]
    assert groups["busy"] < groups["ingest"]


def test_claim_gives_back_any_payload_bytes_exactly_also_many_and_too_big_together(conn):
    """Payloads come back in hex (any bytes, NUL or not UTF-8, stored by an older or future
    writer), in chunks (more events than one statement takes), and a row at a time when
    SQLite cannot make them one string (events of many MB each)."""
    insert(conn, [f"m{i}" for i in range(300)], destinations=("crm",))
    odd = b'{"a":"\x00\xff\xfe"} \\u0000 \n'
    conn.execute("UPDATE events SET payload = ? WHERE message_id = 'm7'", (odd,))
    stored = dict(rows(conn, "SELECT message_id, payload FROM events"))
    claimed, _ = tx(conn, q.claim, "crm", T0, 300)
    assert len(claimed) == 300  # more than _EVENTS_TOGETHER
    assert {c.message_id: c.payload for c in claimed} == stored
    assert stored["m7"] == odd
    # Events too big to come back as one string: one at a time.
    insert(conn, ["big1", "big2", "big3"], destinations=("warehouse",))
    big = {f"big{i}": bytes([i]) * 20_000 for i in (1, 2, 3)}
    for message_id, payload in big.items():
        conn.execute("UPDATE events SET payload = ? WHERE message_id = ?", (payload, message_id))
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)  # each fits, the three in hex do not
    claimed, _ = tx(conn, q.claim, "warehouse", T0, 10)
    assert {c.message_id: c.payload for c in claimed} == big


def test_finish_keeps_text_with_a_nul_character_whole(conn):
    """Outcome and log text goes to SQLite in JSON, where json_extract stops at a NUL: such
    rows are bound one at a time instead."""
    from destfnd.store.models import Invocation

    insert(conn, ["a", "b"], destinations=("crm",))
    a, b = tx(conn, q.claim, "crm", T0, 10)[0]
    failed = Finished(a.delivery_id, Status.RETRYING, T0 + 60_000, "Retry", "err\x00tail", 1, T0)
    dropped = Finished(b.delivery_id, Status.DISCARDED, T0, "Bad Request", "x\x00y", 1, T0)
    logs = "before\x00after"
    tx(conn, q.finish, [failed, dropped], Invocation("crm", T0, 1.0, None, logs, b'["\\u0000"]'))
    assert [delivery(conn, c.delivery_id)["last_error"] for c in (a, b)] == [
        "err\x00tail",
        "x\x00y",
    ]
    assert rows(conn, "SELECT error FROM attempts ORDER BY delivery_id") == [
        ("err\x00tail",),
        ("x\x00y",),
    ]
    assert rows(conn, "SELECT logs, requests FROM invocations") == [(logs, b'["\\u0000"]')]


def test_claim_many_never_gives_one_delivery_twice_in_a_call(conn):
    insert(conn, ["a", "b", "c"], destinations=("crm",))
    (first, _), (second, _) = tx(conn, q.claim_many, [("crm", T0, 2), ("crm", T0, 10)])
    assert [c.message_id for c in first] == ["a", "b"]
    assert [c.message_id for c in second] == ["c"]


def test_operator_commands_walk_the_table_by_id_not_a_destinations_backlog(conn):
    """`move`, `discard` and `retry` take a chunk at a time by a range of ids, the table's own
    order: through the index on due deliveries, each chunk read and sorted all of the
    destination's backlog, so a million-delivery `discard` took minutes, holding the write
    lock the daemon needs. With events given, through the index on event ids."""
    insert(conn, [f"m{i}" for i in range(50)])
    params = {"destination": "crm", "status": "retrying", "stale": 0, "after": 0, "until": 10,
              "limit": 5, "now": T0}  # fmt: skip

    def plan(name: str, events: list[int] | None) -> str:
        query = "EXPLAIN QUERY PLAN " + SQL[name].format(**backlog._of_events(events))
        return " ".join(row[3] for row in conn.execute(query, params))

    for name in ("unfinished_ids", "retry_ids"):
        walk = plan(name, None)
        assert "INTEGER PRIMARY KEY" in walk and "TEMP B-TREE" not in walk, (name, walk)
        assert "deliveries_by_event" in plan(name, [1, 2]), name


def test_operator_commands_find_every_delivery_across_windows(tmp_path, monkeypatch):
    """A destination's waiting deliveries spread over ids far apart, chunks and windows much
    smaller than they: `discard`, `move` and `retry` find each one, those of other
    destinations and events are left alone, and those made after the start are not taken."""
    import argparse

    from destfnd import interventions
    from destfnd.config import load_config

    monkeypatch.setattr(interventions, "_CHUNK", 3)
    monkeypatch.setattr(interventions, "_WINDOW", 7)
    path = tmp_path / "db.sqlite3"
    conn = open_db(path)
    for i in range(40):  # crm's rows among warehouse's, with gaps wider than a window
        insert(conn, [f"w{i}-{j}" for j in range(5)], destinations=("warehouse",))
        insert(conn, [f"c{i}"], destinations=("crm",))
    config = tmp_path / "destfnd.toml"
    config.write_text(
        f'[storage]\npath = "{path}"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "warehouse"\ntype = "file"\npath = "out.ndjson"\n'
        '[[destinations]]\nname = "crm2"\ntype = "file"\npath = "out2.ndjson"\n'
    )
    cfg = load_config(str(config), resolve_secrets=False)

    def args(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"json": True, "message_id": None, **kw})

    pauses: list[float] = []
    monkeypatch.setattr(interventions.time, "sleep", pauses.append)
    interventions.move(cfg, args(source="crm", to="crm2"))
    assert backlog.status_counts(conn)["crm2"] == {"pending": 40}
    interventions.discard(cfg, args(destination="crm2"))
    assert backlog.status_counts(conn)["crm2"] == {"discarded": 40}
    assert backlog.status_counts(conn)["warehouse"] == {"pending": 200}
    # No daemon runs, and move and discard hold its lock: no daemon can start, no pause.
    assert pauses == []
    interventions.retry(cfg, args(status="discarded", destination=None))
    assert backlog.status_counts(conn)["crm2"] == {"retrying": 40}
    # retry holds no lock, so a daemon may start while it runs: it pauses between chunks.
    assert len(pauses) >= 40 // 3, pauses
    interventions.discard(cfg, args(destination="crm2", message_id="c17"))
    assert backlog.status_counts(conn)["crm2"] == {"retrying": 39, "discarded": 1}
    conn.close()


def test_not_ours_tells_destfnd_databases_from_other_applications(tmp_path):
    """Every schema destfnd has made is its own, and a file with no table yet is new; a file
    with other tables, or with destfnd's names but no schema version, is another's."""
    import contextlib

    from destfnd.store.db import _migrations, not_ours

    for version in range(1, _migrations()[-1][0] + 1):
        with contextlib.closing(database_at_schema(tmp_path / f"v{version}.db", version)) as conn:
            assert not_ours(conn) is None, version

    def made(name: str, *statements: str) -> str | None:
        with contextlib.closing(sqlite3.connect(tmp_path / name, isolation_level=None)) as conn:
            for statement in statements:
                conn.execute(statement)
            return not_ours(conn)

    assert made("empty.db") is None
    # Only SQLite's own tables left (ANALYZE, then the analyzed table dropped): still new.
    assert made("stat.db", "CREATE TABLE t (x)", "ANALYZE", "DROP TABLE t") is None
    assert "holds the tables customers, and no destfnd schema" in made(
        "crm.db", "CREATE TABLE customers (id)"
    )
    assert "holds the tables events," in made("half.db", "CREATE TABLE events (id)")
    look_alike = made("alike.db", "CREATE TABLE events (id)", "CREATE TABLE deliveries (id)")
    assert "holds the tables deliveries, events," in look_alike  # no user_version: not ours
    many = [f"CREATE TABLE t{i} (x)" for i in range(7)]
    assert "t0, t1, t2, t3, t4 and 2 more" in made("many.db", *many)


async def test_writer_keeps_a_groups_ingest_under_its_bytes_and_small_requests_first(db_path):
    """Requests of 8 MB of events each (a few KB of gzip) went in one group, however many:
    the commit took seconds, and a single event from another client waited behind them all.
    A group takes every small request and big ones in order while under GROUP_BYTES (the
    first always); the rest go in the next group, nothing lost or reordered among them."""
    from destfnd.store.writer import GROUP_BYTES

    conn = open_db(db_path)
    groups: list[list[str]] = []
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def ingest(c: sqlite3.Connection, items: list) -> list:
        groups.append(list(items))
        return items

    def block(c: sqlite3.Connection, items: list) -> list:
        loop.call_soon_threadsafe(started.set)
        import time

        time.sleep(0.2)  # the writer thread is busy meanwhile: the requests below queue up
        return items

    big = GROUP_BYTES // 2 + 1  # two do not fit in one group
    async with running_writer(conn) as writer:
        busy = asyncio.create_task(writer.run_batched(block, "busy", urgent=True))
        await started.wait()
        queued = [
            writer.run_batched(ingest, "big-1", urgent=True, size=big),
            writer.run_batched(ingest, "big-2", urgent=True, size=big),
            writer.run_batched(ingest, "small-1", urgent=True, size=300),
            writer.run_batched(ingest, "big-3", urgent=True, size=big),
            writer.run_batched(ingest, "small-2", urgent=True, size=300),
        ]
        done = await asyncio.gather(busy, *queued)
    assert done == ["busy", "big-1", "big-2", "small-1", "big-3", "small-2"]
    assert groups == [["big-1", "small-1", "small-2"], ["big-2"], ["big-3"]]


def test_writer_group_bytes_count_small_requests_too_and_keep_big_ones_in_order():
    """Many small requests made one huge group again (4,000 of 60 KB: 234 MB); a big one
    that fit the room left went ahead of an earlier one that did not."""
    from destfnd.store.writer import GROUP_BYTES, SMALL_BYTES, _Batched, _within_bytes

    def items(*sizes: int) -> list:
        return [(_Batched(len, i, size), None) for i, size in enumerate(sizes)]

    def ids(entries: list) -> list[int]:
        return [op.item for op, _ in entries]

    small = 60 * 1024
    taken, left = _within_bytes(items(*[small] * 4000))
    assert sum(op.size for op, _ in taken) <= GROUP_BYTES and len(taken) + len(left) == 4000
    assert ids(taken) == list(range(len(taken)))  # in order, the rest after
    mb = 1024 * 1024
    taken, left = _within_bytes(items(10 * mb, 10 * mb, 5 * mb, SMALL_BYTES))
    assert (ids(taken), ids(left)) == ([0, 3], [1, 2])
    taken, left = _within_bytes(items(20 * mb, 20 * mb))  # one big always goes
    assert (ids(taken), ids(left)) == ([0], [1])
