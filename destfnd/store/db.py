"""Opening the SQLite file: pragmas, migrations by PRAGMA user_version, named queries."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from destfnd.errors import DestfndError


class StoreError(DestfndError):
    """The SQLite store failed."""


class StoreUnavailable(StoreError):
    """The database cannot be used now, for a reason that passes: trying again later may
    succeed (exit 1, which the systemd unit restarts, rather than 4, which it does not)."""


class StoreBusy(StoreUnavailable):
    """Another process held a lock on the database past the busy timeout."""


class StoreFull(StoreUnavailable):
    """The disk holding the database is full."""


BUSY_HINT = " (another process holds a lock on it; trying again later may succeed)"
_ROOM_BYTES = 1 << 20  # less free space than this, and SQLite's I/O errors are a full disk


def store_error(text: str, exc: sqlite3.Error, path: Path | None = None) -> StoreError:
    """`text: exc` as a StoreError; a StoreBusy if the database was locked, a StoreFull if
    it failed for want of room on the disk holding `path` (SQLite says "disk I/O error" when
    it cannot make its -shm file there)."""
    code = getattr(exc, "sqlite_errorcode", None)  # extended: SQLITE_BUSY_RECOVERY is 261
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreBusy(f"{text}: {exc}{BUSY_HINT}")
    if code is not None and code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        room = _room(path)
        if room is not None:
            return StoreFull(
                f"{text}: {exc}: the disk holding it is full ({room}): make room and try "
                "again (exit 1, which the systemd unit restarts)"
            )
    if code is not None and code & 0xFF in _ACCESS_CODES:
        return StoreError(f"{text}: {exc}{_access_hint(path)}")
    return StoreError(f"{text}: {exc}")


# SQLite's words for these ("attempt to write a readonly database", "unable to open database
# file") do not say that it is this user's permissions, nor on what.
_ACCESS_CODES = (sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN)


def _access_hint(path: Path | None) -> str:
    """What this user may not do to the database's file or folder, if that is it (the folder
    first: read-only commands need it writable too, for SQLite's -shm file)."""
    if path is None:
        return ""
    real = Path(os.path.realpath(path))  # SQLite keeps -wal and -shm beside the target
    folder = real.parent
    who = f"this user (uid {os.geteuid()})"

    def may(item: Path, mode: int) -> bool:
        return os.access(item, mode, effective_ids=os.access in os.supports_effective_ids)

    if not may(folder, os.X_OK):
        return f" ({folder} cannot be entered by {who})"
    if real.exists() and not may(real, os.R_OK):
        return f" ({real} is not readable by {who})"
    if not may(folder, os.W_OK):
        return (f" ({folder} is not writable by {who}; SQLite makes the database's -wal and "
                "-shm files there)")  # fmt: skip
    if real.exists() and not may(real, os.W_OK):
        return f" ({real} is not writable by {who})"
    return ""


def _room(path: Path | None) -> str | None:
    """How little room is left where `path` is, if that is too little for SQLite: else None."""
    if path is None:
        return None
    try:
        st = os.statvfs(Path(os.path.abspath(path)).parent)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < _ROOM_BYTES:
        return f"{free:,} bytes free"
    if st.f_files and st.f_favail == 0:  # no inode left: no file can be made
        return "no inode free"
    return None


def _load_queries() -> dict[str, str]:
    text = resources.files("destfnd.store").joinpath("sql/queries.sql").read_text()
    queries = {}
    for block in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = body.strip()
    return queries


SQL = _load_queries()
_IN_CHUNK = 500  # placeholders per IN (...) list, well under SQLite's variable limit
# SQLite VM steps between two calls of a progress handler (1-2 ms of SQLite's work).
PROGRESS_EVERY = 100_000


def select_in(conn: sqlite3.Connection, query: str, ids: Sequence[Any]) -> Iterator[tuple]:
    """The rows of `query`, a SELECT whose `{ids}` is an IN list, for all of `ids` (in chunks)."""
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        yield from conn.execute(query.format(ids=",".join("?" * len(chunk))), chunk)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """`BEGIN IMMEDIATE ... COMMIT`; on any error a ROLLBACK (if the transaction is still open:
    SQLite may have ended it itself) and the error goes on."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("destfnd.store").joinpath("sql").iterdir():
        m = re.match(r"(\d+)_.*\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), entry.read_text()))
    return sorted(found)


def open_db(
    path: Path,
    *,
    synchronous: str = "FULL",
    readonly: bool = False,
    progress: Callable[[], int] | None = None,
    update: bool = False,
    min_schema: int = 0,
) -> sqlite3.Connection:
    """Open (creating and migrating unless `readonly`) the database at `path`. `update`: for
    a command's small write beside a running daemon, read-write but neither created nor
    migrated (the daemon's schema must be this destfnd's). `min_schema`: the oldest schema
    version a read-only command can read.

    Autocommit mode: transactions are explicit (`BEGIN IMMEDIATE ... COMMIT`) in the writer.
    `progress` is called every so often while migrations run (a SQLite progress handler).
    """
    conn = None
    try:
        if readonly or update:
            # Empty: made by a daemon that stopped before SQLite wrote to it (it takes a lock
            # on the file first).
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            except OSError as exc:  # a folder on the way this user cannot search
                raise StoreError(f"{path}: cannot read the database: {exc.strerror}") from None
            if size == 0:
                raise StoreError(f"{path}: no database yet (has the daemon ever started?)")
            mode = "rw" if update else "ro"
            # As a URI, escaped: a "#", "?" or "%" in the path would end or change it.
            uri = f"{Path(os.path.abspath(path)).as_uri()}?mode={mode}"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Readers and the writer wait this long for each other's locks instead of failing.
        conn.execute("PRAGMA busy_timeout = 5000")
        _check_ours(conn, path)
        if readonly or update:
            if update or min_schema:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                newest = _migrations()[-1][0]
                if version != newest if update else version < min_schema:
                    raise StoreError(
                        f"{path}: the database is at schema version {version}, this destfnd's "
                        f"is {newest}: start the daemon of this version first (it migrates it)"
                    )
            return conn
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: the WAL is fsynced at every commit, so a 200 means the event is on disk.
        conn.execute(f"PRAGMA synchronous = {'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        if progress is not None:
            conn.set_progress_handler(progress, PROGRESS_EVERY)
        _migrate(conn)
        conn.set_progress_handler(None, 0)
        return conn
    except BaseException as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, sqlite3.Error):
            raise store_error(f"{path}: cannot open the database", exc, path) from exc
        raise


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """A StoreError unless the file is destfnd's database, or a new one: a storage.path
    mistyped to another application's SQLite file had destfnd's tables added to it and its
    journal mode changed to WAL, without a word."""
    why = not_ours(conn)
    if why is not None:
        raise StoreError(f"{path}: {why}: is storage.path another application's database?")


def not_ours(conn: sqlite3.Connection) -> str | None:
    """Why the database on `conn` is not destfnd's; None if it is, or holds no table yet.
    Every destfnd database has its `events` and `deliveries` and a `user_version` from 1
    (each migration sets it in the transaction that makes its tables)."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    tables = sorted(name for (name,) in rows if not name.startswith("sqlite_"))
    if not tables:
        return None
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version >= 1 and {"events", "deliveries"} <= set(tables):
        return None
    shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
    return f"not a destfnd database (it holds the tables {shown}, and no destfnd schema)"


def _migrate(conn: sqlite3.Connection) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    migrations = _migrations()
    newest = migrations[-1][0] if migrations else 0
    if version > newest:
        raise StoreError(
            f"the database is at schema version {version}, newer than this destfnd ({newest})"
        )
    pending = [(number, script) for number, script in migrations if number > version]
    if not pending:
        return
    # All in one transaction: a migration that fails leaves the file as it was, which the
    # destfnd that made it still opens (one by one, a failure at the third left a schema
    # that neither it nor this one could open).
    with transaction(conn):
        for number, script in pending:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def _statements(script: str) -> list[str]:
    # executescript would COMMIT on its own; split so the migration stays one transaction.
    statements, current = [], []
    for line in script.splitlines():
        current.append(line)
        if sqlite3.complete_statement("\n".join(current)):
            statements.append("\n".join(current))
            current = []
    return statements
