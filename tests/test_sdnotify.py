"""systemd notifications sent while the daemon starts: a slow start (the first after an
upgrade) extends TimeoutStartSec while SQLite makes progress. A real notify socket, real
SQLite files."""

from __future__ import annotations

import socket
import sqlite3

import orjson
import pytest
from support import config_text, webhook

from destfnd.config import load_config
from destfnd.daemon import Daemon
from destfnd.sdnotify import StartProgress
from destfnd.store import db as store_db
from destfnd.store import open_db

T0 = 1_700_000_000_000


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(65536).decode())
        except BlockingIOError:
            return messages


def test_start_progress_extends_at_most_once_per_interval(notify_socket):
    now = [100.0]
    progress = StartProgress(every_s=5.0, extend_s=30.0, clock=lambda: now[0])
    progress.status = "starting: migrating"
    for t in (100.0, 101.0, 104.9):  # a start that is quick sends nothing
        now[0] = t
        assert progress.tick() == 0
    assert received(notify_socket) == []
    now[0] = 105.0
    progress.tick()
    now[0] = 109.0
    progress.tick()
    assert received(notify_socket) == ["EXTEND_TIMEOUT_USEC=30000000\nSTATUS=starting: migrating"]
    now[0] = 110.0
    progress.tick()
    assert len(received(notify_socket)) == 1
    assert progress.sent == 2


def test_start_progress_without_systemd_sends_nothing_and_never_raises(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    progress = StartProgress(every_s=0)
    assert progress.tick() == 0
    assert progress.sent == 0

    readings = iter([0.0])  # the start time; then the clock breaks

    def breaking_clock() -> float:
        return next(readings)  # StopIteration from the second reading on

    progress = StartProgress(every_s=0, clock=breaking_clock)
    assert progress.tick() == 0  # as a SQLite progress handler, raising would abort the start


def _schema_4_database(path, deliveries: int) -> None:
    """A database as destfnd left it before migration 005 (the deliveries_by_event index)."""
    old = sqlite3.connect(path, isolation_level=None)
    for number, script in store_db._migrations():
        if number <= 4:
            for statement in store_db._statements(script):
                old.execute(statement)
    old.execute("PRAGMA user_version = 4")
    old.execute("BEGIN")
    old.executemany(
        "INSERT INTO events (id, source, message_id, received_at, refs, payload)"
        " VALUES (?, 'web', ?, ?, 1, ?)",
        ((i, f"m{i}", T0, orjson.dumps({"messageId": f"m{i}"})) for i in range(1, deliveries + 1)),
    )
    old.execute(
        "INSERT INTO deliveries (event_id, destination, status, created_at, next_at)"
        " SELECT id, 'hook', 'delivered', received_at, received_at FROM events"
    )
    old.execute("COMMIT")
    old.close()


def test_a_long_migration_keeps_extending_the_start_timeout(tmp_path, notify_socket):
    path = tmp_path / "destfnd.sqlite3"
    _schema_4_database(path, 20_000)
    progress = StartProgress(every_s=0)  # every progress call sends: the migration's are seen
    progress.status = "starting: migrating"
    conn = open_db(path, progress=progress.tick)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (5,)
        sent = progress.sent
        assert sent > 0
        assert set(received(notify_socket)) == {
            "EXTEND_TIMEOUT_USEC=30000000\nSTATUS=starting: migrating"
        }
        conn.execute("SELECT count(*) FROM deliveries WHERE destination != 'x'").fetchone()
        assert progress.sent == sent  # the handler is gone once the migrations are done
    finally:
        conn.close()


def test_the_daemon_start_extends_while_reading_dedupe_keys(tmp_path, notify_socket):
    """All of a schema-4 database's events have their keys read at the first start (nothing
    flushed yet): the daemon's start ticks through migration 005 and through that read, then
    leaves no handler behind on the writer's connection."""
    path = tmp_path / "destfnd.sqlite3"
    _schema_4_database(path, 20_000)
    cfg_path = tmp_path / "destfnd.toml"
    cfg_path.write_text(config_text(path, webhook("hook", "http://127.0.0.1:9/in")))
    daemon = Daemon(load_config(cfg_path))
    progress = StartProgress(every_s=0)
    conn, dedupe = daemon._open_store(progress)
    try:
        assert (
            len(dedupe.recent) + conn.execute("SELECT count(*) FROM message_ids").fetchone()[0]
            == 20_000
        )
        statuses = {m.partition("STATUS=")[2] for m in received(notify_socket)}
        assert "starting: opening and migrating the database" in statuses
        assert "starting: reading the messageIds of recent events (dedupe)" in statuses
        sent = progress.sent
        conn.execute("SELECT count(*) FROM events WHERE source != 'x'").fetchone()
        assert progress.sent == sent
    finally:
        conn.close()
