"""systemd notifications sent while the daemon starts: a slow start (the first after an
upgrade) extends TimeoutStartSec while SQLite makes progress. A real notify socket, real
SQLite files."""

from __future__ import annotations

import socket
import time

import orjson
import pytest
from support import config_text, database_at_schema, post, webhook

from destfnd.config import Config, load_config
from destfnd.daemon import Daemon
from destfnd.sdnotify import StartProgress
from destfnd.startup import open_store
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
    old = database_at_schema(path, 4)
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


class CountingClock:
    """A clock for StartProgress that counts its readings (one per progress call)."""

    def __init__(self, on_reading=None) -> None:
        self.readings = 0
        self.on_reading = on_reading

    def __call__(self) -> float:
        self.readings += 1
        if self.on_reading is not None:
            self.on_reading(self.readings)
        return float(self.readings)


# About 200k SQLite VM steps: a progress handler still installed would be called twice.
LONG_QUERY = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100000)"
    " SELECT count(*) FROM n"
)


def test_open_db_keeps_extending_the_start_timeout_through_a_long_migration(
    tmp_path, notify_socket
):
    path = tmp_path / "destfnd.sqlite3"
    _schema_4_database(path, 20_000)
    clock = CountingClock()
    progress = StartProgress(every_s=0, clock=clock)  # every progress call sends
    progress.status = "starting: migrating"
    conn = open_db(path, progress=progress.tick)
    try:
        newest = store_db._migrations()[-1][0]
        assert conn.execute("PRAGMA user_version").fetchone() == (newest,)
        assert progress.sent > 0
        assert set(received(notify_socket)) == {
            "EXTEND_TIMEOUT_USEC=30000000\nSTATUS=starting: migrating"
        }
        readings = clock.readings
        assert conn.execute(LONG_QUERY).fetchone() == (100_000,)
        assert clock.readings == readings  # the handler went with the migrations
    finally:
        conn.close()


def _config(tmp_path, path) -> Config:
    cfg_path = tmp_path / "destfnd.toml"
    cfg_path.write_text(config_text(path, webhook("hook", "http://127.0.0.1:9/in")))
    return load_config(cfg_path)


def _daemon(tmp_path, path) -> Daemon:
    return Daemon(_config(tmp_path, path))


def test_daemon_start_extends_while_reading_dedupe_keys(tmp_path, notify_socket):
    """All of a schema-4 database's events have their keys read at the first start (nothing
    flushed yet): the daemon's start ticks through migration 005 and through that read, then
    leaves no handler behind on the writer's connection."""
    path = tmp_path / "destfnd.sqlite3"
    _schema_4_database(path, 20_000)
    clock = CountingClock()
    progress = StartProgress(every_s=0, clock=clock)
    opened = open_store(_config(tmp_path, path), progress, found_empty=False, clock=time.time)
    assert opened is not None
    conn, dedupe = opened.conn, opened.dedupe
    try:
        (flushed,) = conn.execute("SELECT count(*) FROM message_ids").fetchone()
        assert len(dedupe.recent) + flushed == 20_000
        statuses = {m.partition("STATUS=")[2] for m in received(notify_socket)}
        assert "starting: opening and migrating the database" in statuses
        assert "starting: reading the messageIds of recent events (dedupe)" in statuses
        readings = clock.readings
        assert conn.execute(LONG_QUERY).fetchone() == (100_000,)
        assert clock.readings == readings
    finally:
        conn.close()


async def test_daemon_answers_503_starting_and_a_sigterm_abandons_a_slow_start(
    make_daemon, tmp_path, session
):
    """The real `destfnd serve` on a database whose first start is slow (migration 005 and
    every event's dedupe key to read): it listens at once, /healthz and ingest answer 503
    "starting"; SIGTERM then abandons the start (the statement running rolls back) and the
    daemon exits 0 without ever being ready."""
    path = tmp_path / "destfnd.sqlite3"
    _schema_4_database(path, 400_000)
    daemon = make_daemon(config_text(path, webhook("hook", "http://127.0.0.1:9/in")))
    await daemon.start(until="daemon_listening")
    async with session.get(f"{daemon.url}/healthz") as resp:
        assert (resp.status, await resp.json()) == (503, {"status": "starting"})
    status, body = await post(session, f"{daemon.url}/v1/track", {"userId": "u", "event": "e"})
    assert status == 503 and body["error"] == "unavailable"
    assert await daemon.terminate(timeout_s=20) == 0
    records = {r["event"]: r for r in daemon.log_records()}
    assert "daemon_ready" not in records
    # Cut short inside SQLite's work (a migration or the dedupe read), not after it.
    assert records["stopped_while_starting"]["interrupted"].startswith("starting: ")


async def test_a_stop_abandons_what_is_starting_and_only_that(tmp_path):
    """Daemon._unless_stopped, which the start of the destinations runs under: a stop cancels
    the start and waits for it to clean up; a start that ends first keeps its result or its
    own error (a bad function file is exit 3, stop or not); a cancelled caller cancels it too."""
    import asyncio

    from destfnd.errors import DestfndError

    daemon = _daemon(tmp_path, tmp_path / "db.sqlite3")
    cleaned: list[str] = []

    async def starting(name: str, seconds: float, error: bool = False) -> str:
        try:
            await asyncio.sleep(seconds)
            if error:
                raise DestfndError(f"{name} failed")
            return name
        finally:
            await asyncio.sleep(0.05)  # cleaning up takes a while (closing workers)
            cleaned.append(name)

    assert await daemon._unless_stopped(starting("quick", 0)) == "quick"
    with pytest.raises(DestfndError, match="bad failed"):
        await daemon._unless_stopped(starting("bad", 0, error=True))

    (tmp_path / "3").mkdir()
    daemon3 = _daemon(tmp_path / "3", tmp_path / "3" / "db.sqlite3")

    async def failing_as_the_stop_comes() -> str:
        daemon3.request_stop()  # in the same loop turn as its own failure
        raise DestfndError("own failure")

    with pytest.raises(DestfndError, match="own failure"):  # not taken for a cut-short start
        await daemon3._unless_stopped(failing_as_the_stop_comes())

    slow = asyncio.create_task(daemon._unless_stopped(starting("slow", 60)))
    await asyncio.sleep(0.05)
    daemon.request_stop()
    assert await asyncio.wait_for(slow, 5) is None
    assert cleaned[-1] == "slow"  # its cleanup ran before the stop went on

    (tmp_path / "2").mkdir()
    daemon2 = _daemon(tmp_path / "2", tmp_path / "2" / "db.sqlite3")
    outer = asyncio.create_task(daemon2._unless_stopped(starting("outer", 60)))
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert cleaned[-1] == "outer"


def test_serve_extends_while_functions_load_and_a_load_out_of_time_exits_1(tmp_path, notify_socket):
    """Each worker may take 30 s to load its function: serve extends systemd's start timeout
    meanwhile (it did only while SQLite worked, so TimeoutStartSec=30s killed a start destfnd
    allowed). A load that runs out of time may succeed the next time (a cold cache after a
    reboot): exit 1, which the unit restarts, not 3, which it does not."""
    import subprocess
    import sys

    (tmp_path / "slow.py").write_text("import time\ntime.sleep(40)\ndef on_track(e, s): pass\n")
    config = tmp_path / "destfnd.toml"
    config.write_text(
        config_text(tmp_path / "db", '[[destinations]]\nname = "slow"\nfunction = "slow.py"\n')
    )
    result = subprocess.run(
        [sys.executable, "-m", "destfnd", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "a destination cannot start" in result.stderr
    assert "destinations[0].function: the function did not load within 30s" in result.stderr
    messages = received(notify_socket)
    extended = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=30000000\n")]
    assert len(extended) >= 4, messages  # every 5 s of the 30
    assert all(m.endswith("STATUS=starting: loading the functions") for m in extended)
    assert not [m for m in messages if "READY=1" in m]
