"""The store at start: open and migrate the database, take back the last run's leases, say
which deliveries wait for a destination the config lacks, read the dedupe keys. Runs on a
thread before the daemon is ready; never starts delivery or ingest."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from destfnd import sdnotify
from destfnd.config import Config
from destfnd.store import Dedupe, StoreError, backlog, open_db, store_error
from destfnd.store import queue as q
from destfnd.store import retention as store_retention
from destfnd.store.db import PROGRESS_EVERY
from destfnd.upkeep import DatabaseWatch

log = structlog.get_logger("destfnd.daemon")

_SLOW_START_S = 5.0  # opening the store took this long: say so (and what systemd was told)

_WITHOUT_HINT = (
    "renamed? destfnd move --from {name} --to NEW_NAME; removed for good? destfnd discard "
    "--destination {name}; else they wait for it to come back under this name"
)


@dataclass(frozen=True, slots=True)
class Opened:
    conn: sqlite3.Connection
    dedupe: Dedupe
    watch: DatabaseWatch  # made as the file opened: what goes missing from then on is caught
    records_bytes: int  # logs and requests recorded, for retention's size limit


def open_store(
    cfg: Config,
    progress: sdnotify.StartProgress,
    *,
    found_empty: bool,
    clock: Callable[[], float],
) -> Opened | None:
    """Open and migrate the database, take back the leases of a previous run and read the
    dedupe keys not yet flushed. Runs on a thread while the event loop answers 503
    "starting". Under systemd a slow start (the first after an upgrade) keeps extending its
    start timeout while SQLite makes progress. A stop requested meanwhile
    (`progress.stopping`) stops it at SQLite's next progress call, rolling back the
    statement running: None is returned."""
    started = time.monotonic()
    progress.status = "starting: opening and migrating the database"
    path = Path(cfg.storage.path)
    if found_empty:
        # SQLite takes an empty file for a new database. One the daemon made is empty
        # only if it was killed as it made it: this is more likely one truncated (a
        # disk's or a file system's problem), or made by hand. Said, as the queue starts
        # empty on it.
        log.warning("database_file_empty", path=str(path))
    try:
        conn = open_db(
            cfg.storage.path, synchronous=cfg.storage.synchronous, progress=progress.tick
        )
    except StoreError:
        if progress.stopping:
            return None
        raise
    watch = DatabaseWatch(cfg.storage.path, clock)  # at once (see Opened)
    try:
        conn.set_progress_handler(progress.tick, PROGRESS_EVERY)
        progress.status = "starting: taking back the leases of the last run"
        recovered = q.recover(conn, int(clock() * 1000))
        if recovered:
            log.info("leases_recovered", deliveries=recovered)
        records_bytes = store_retention.invocations_size(conn)
        _say_unserved(conn, cfg)
        progress.status = "starting: reading the messageIds of recent events (dedupe)"
        dedupe = Dedupe.load(conn)
        conn.set_progress_handler(None, 0)  # the writer's statements are not start-up
    except BaseException as exc:
        conn.close()
        if not isinstance(exc, sqlite3.Error):
            raise
        if progress.stopping:
            return None
        raise store_error(f"{cfg.storage.path}: cannot start on it", exc, path) from exc
    took = time.monotonic() - started
    if took >= _SLOW_START_S or progress.sent:
        log.info("slow_start", seconds=round(took, 1), timeout_extended=progress.sent)
    return Opened(conn, dedupe, watch, records_bytes)


def _say_unserved(conn: sqlite3.Connection, cfg: Config) -> None:
    """A warning for each destination with deliveries waiting that this config does not
    deliver: renamed or removed (they wait for it to come back), or disabled."""
    enabled = {d.name: d.enabled for d in cfg.destinations}
    for name, waiting in sorted(backlog.waiting_counts(conn).items()):
        if name not in enabled:
            hint = _WITHOUT_HINT.format(name=name)
            log.warning("deliveries_without_destination", destination=name,
                        unfinished=waiting, hint=hint)  # fmt: skip
        elif not enabled[name]:
            hint = "enabled = true delivers them"
            log.warning("deliveries_of_disabled_destination", destination=name,
                        unfinished=waiting, hint=hint)  # fmt: skip
