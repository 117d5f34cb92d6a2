"""The running daemon's upkeep of its store: retention (deliveries, attempt records, dedupe
keys), the watch over the database's files and the wall clock, and systemd's watchdog. Each
runs as a task of the daemon's; none of them touches ingest or dispatch."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from destfnd import descriptors, sdnotify
from destfnd.config import Config
from destfnd.store import Dedupe, StoreError, Writer
from destfnd.store import queue as q
from destfnd.store import retention as store_retention
from destfnd.store.dedupe import KEY_MIN, sweep_keys, sweep_rows

log = structlog.get_logger("destfnd.daemon")

_PRUNE_EVERY_S = 60.0
_PRUNE_CHUNK = 2000  # rows per transaction, so pruning never holds the writer for long
_KEY_SWEEP_SLICE = 20_000  # dedupe keys looked at per transaction: a few ms of the writer
_WATCH_FILE_S = 1.0  # (and the clock)
_CLOCK_NOTE = (
    "retry schedules and max_age are on the wall clock: stepped forward, deliveries are "
    "older by the step and retries due early (see README, 'The clock')"
)
_DESCRIPTORS_EVERY_S = 5.0
_DESCRIPTORS_SAID_EVERY_S = 60.0  # while they stay low
# How long a stop after the WAL was deleted tries to move what it holds into the database
# file while other connections are in the way (within systemd's TimeoutStopSec=45s).
_SAVE_WAL_S = 15.0


class Retention:
    """Every minute: finished deliveries (and their events) past `retention`, attempt records
    past it or over `records_max_size`, dedupe keys out of `dedupe_window`. Holds the count of
    recorded bytes that the budget is kept against (dispatchers add to it: `recorded`)."""

    def __init__(
        self,
        cfg: Config,
        writer: Writer,
        dedupe: Dedupe,
        now_ms: Callable[[], int],
        records_bytes: int,
    ) -> None:
        self._cfg, self._writer, self._dedupe, self._now_ms = cfg, writer, dedupe, now_ms
        self.records_bytes = records_bytes  # logs and requests recorded
        # max_age (ms) -> the invocation id up to which records were pruned by it.
        self._records_scanned: dict[int, int] = {}

    def recorded(self, size: int) -> None:
        self.records_bytes += size

    async def run(self) -> None:
        storage = self._cfg.storage
        writer = self._writer
        key_cursor, keys_flushed = KEY_MIN, 0
        while True:
            now = self._now_ms()
            finished_before = now - int(storage.retention_s * 1000)
            try:
                records = await self._prune_records(finished_before)
                if records:
                    log.info("records_pruned", invocations=records, kept_bytes=self.records_bytes)
                total = 0
                while True:
                    deleted = await writer.run(store_retention.prune, finished_before, _PRUNE_CHUNK)
                    total += deleted
                    if deleted < _PRUNE_CHUNK:
                        break
                if total:
                    log.info("pruned", deliveries=total)
                # Dedupe keys out of the window can never match again.
                keys_before = now - int(self._cfg.server.dedupe_window_s * 1000)
                flushed = self._dedupe.flushed_keys
                rows = sweep_rows(flushed - keys_flushed)
                key_cursor = await self._sweep_keys(keys_before, key_cursor, rows)
                keys_flushed = flushed  # only once swept: a failed pass is made up next time
            except StoreError as exc:
                # Even a delete needs room in the WAL: with the disk full, try next time.
                log.warning("prune_failed", error=str(exc))
            await asyncio.sleep(_PRUNE_EVERY_S)

    async def _prune_records(self, finished_before: int) -> int:
        """Attempt records go with their deliveries' retention, and sooner when they take more
        than `records_max_size`: the oldest first. A record is at most its destination's
        `max_age` older than the delivery finish that keeps it."""
        writer = self._writer
        ages = {d.name: int(d.retry.max_age_s * 1000) for d in self._cfg.destinations}
        longest = max(ages.values(), default=0)
        # First every destination's (and those no longer configured) by the longest max_age.
        deleted_total = 0
        while True:
            deleted, freed = await writer.run(
                store_retention.prune_invocations, finished_before - longest,
                self._cfg.storage.records_max_bytes, self.records_bytes, _PRUNE_CHUNK,
            )  # fmt: skip
            self.records_bytes -= freed
            deleted_total += deleted
            if deleted < _PRUNE_CHUNK:
                break
        # Then those of destinations with a shorter max_age, from among the others' records.
        # Each scan goes on where the last one ended, so a record is looked at once per age.
        for age in sorted(set(ages.values()) - {longest}):
            names = frozenset(name for name, a in ages.items() if a <= age)
            after, more = self._records_scanned.get(age, 0), True
            while more:
                deleted, freed, after, more = await writer.run(
                    store_retention.prune_invocations_of,
                    names,
                    finished_before - age,
                    after,
                    _PRUNE_CHUNK,
                )
                self.records_bytes -= freed
                deleted_total += deleted
                self._records_scanned[age] = after
        return deleted_total

    async def _sweep_keys(self, before: int, cursor: int, rows: int) -> int:
        """Forget dedupe keys out of the window: `rows` keys of the key space this pass, in
        slices of a few ms, resumed at `cursor`. Returns where the next pass starts."""
        while rows > 0:
            _, after = await self._writer.run(sweep_keys, before, cursor, _KEY_SWEEP_SLICE)
            rows -= _KEY_SWEEP_SLICE
            if after is None:
                return KEY_MIN
            cursor = after
        return cursor


class ClockSteps:
    """Steps of the wall clock (`settimeofday`, NTP correcting a large offset at once), seen
    against the boot clock, which counts time suspended too: a resumed machine is no step."""

    STEP_S = 2.0  # less is NTP slewing, or the loop being late

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        boot: Callable[[], float] = lambda: time.clock_gettime(time.CLOCK_BOOTTIME),
    ) -> None:
        self._wall, self._boot = wall, boot
        self._offset = wall() - boot()

    def check(self) -> float | None:
        """The step since the last check, in seconds (back: negative); None if none."""
        offset = self._wall() - self._boot()
        step, self._offset = offset - self._offset, offset
        return step if abs(step) >= self.STEP_S else None


class DatabaseWatch:
    """The database file deleted or replaced under the running daemon (`rm -rf var/`):
    SQLite would go on committing to the unlinked file, and everything since would be gone
    at the next start. The same for its -wal and -shm files (`rm var/*-wal`): what the
    unlinked WAL holds since the last checkpoint would be lost at the next start, but SQLite
    still has it open, and `save_wal` moves it into the file as the daemon stops. Also a
    step of the wall clock, at the same pace. Made as soon as SQLite has opened the file:
    what goes missing from then on is caught."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self._files = [(f, _identity(f)) for f in _database_files(path)]
        self._clock = clock
        self.wal_gone = False  # its -wal or -shm file was deleted while the daemon ran

    async def run(self, writer: Writer) -> str:
        """Returns, once a file is gone, why the daemon must stop (exit 1)."""
        database = self._files[0][0]
        clock = ClockSteps(self._clock)
        while True:
            await asyncio.sleep(_WATCH_FILE_S)
            stepped_s = clock.check()
            if stepped_s is not None:
                await self._clock_stepped(writer, stepped_s)
            for file, identity in self._files:
                if _identity(file) == identity:
                    continue
                log.error("database_file_gone", database=str(database), file=str(file))
                if file == database:
                    return (
                        f"{file}: the database file was deleted or replaced while the daemon "
                        "ran; what it held (every unfinished delivery) went with it"
                    )
                self.wal_gone = True
                return (
                    f"{file}: deleted or replaced while the daemon ran; the daemon stopped "
                    "to move what the WAL held into the database file: keep SQLite's "
                    "files out of cleanup jobs"
                )

    async def _clock_stepped(self, writer: Writer, step_s: float) -> None:
        """Said in the log; stepped back, the retries waiting are brought forward by the
        step (they waited an hour more after a one-hour step back). Not forward: a step
        forward makes them due early anyway, and the schedules of a previous run, which may
        have had the right time, would be pushed out by the step."""
        shifted = None
        if step_s < 0:
            try:
                now_ms = int(self._clock() * 1000)
                shifted = await writer.run(q.shift_retries, int(step_s * 1000), now_ms)
            except StoreError as exc:
                log.warning("clock_step_not_applied", error=str(exc))
        log.warning("clock_stepped", by_s=round(step_s, 1), retries_brought_forward=shifted,
                    note=_CLOCK_NOTE)  # fmt: skip


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _database_files(path: Path) -> list[Path]:
    """The database file and the two SQLite keeps beside it in WAL mode, which exist from
    the moment the database is open until the last connection to it closes (beside the file
    a symbolic link names: SQLite resolves it)."""
    real = Path(os.path.realpath(path))
    return [path, real.with_name(real.name + "-wal"), real.with_name(real.name + "-shm")]


async def save_wal(writer: Writer) -> str | None:
    """After the -wal or -shm was deleted: the WAL SQLite still has open holds every commit
    since the last checkpoint, and a restart would not find it. SQLite's own checkpoint at
    close happens only if no other connection is open (a `destfnd stats`, a backup, a
    shell), so checkpoint it here, until done or _SAVE_WAL_S have passed. Returns None once
    saved, else why not."""
    deadline = time.monotonic() + _SAVE_WAL_S
    while True:
        try:
            busy, frames, moved = await asyncio.to_thread(writer.checkpoint)
        except sqlite3.Error as exc:
            busy, frames, moved = 1, -1, -1
            error = str(exc)
        else:
            error = None
        if not busy and moved == frames:
            log.info("wal_saved", frames=frames)
            return None
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
    log.error("wal_not_saved", frames=frames, moved=moved, error=error)
    return error or (
        "other connections to the database kept SQLite from moving all of it "
        f"({moved} of {frames} pages)"
    )


async def watchdog(writer: Writer, every_s: float) -> None:
    """WATCHDOG=1 every half WatchdogSec while the event loop runs and the SQLite writer
    commits: a wedged writer (or loop) stops the pings, and systemd restarts the daemon.
    A commit may take up to 1.5 intervals and still ping within WatchdogSec."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await asyncio.wait_for(writer.run(_nothing), every_s * 1.5)
        except TimeoutError:
            log.warning("watchdog_writer_slow", waited_s=every_s * 1.5)
            continue  # no ping: systemd decides once WatchdogSec has passed
        except StoreError as exc:
            log.warning("watchdog_commit_failed", error=str(exc))
        else:
            sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(max(0.0, every_s - (loop.time() - started)))


async def watch_descriptors() -> None:
    """Said while the file descriptors run out (90% of the limit open): new connections
    are then accepted and closed at once, unlogged, by the event loop, and SQLite's error
    for a commit that cannot open a file names no cause."""
    said_at = -_DESCRIPTORS_SAID_EVERY_S
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(_DESCRIPTORS_EVERY_S)
        used = descriptors.running_out()
        if used is not None and loop.time() - said_at >= _DESCRIPTORS_SAID_EVERY_S:
            said_at = loop.time()
            log.warning("file_descriptors_low", open=used[0], limit=used[1],
                        hint="raise LimitNOFILE= in the unit, or ulimit -n")  # fmt: skip


def _nothing(conn: object) -> None:
    """An empty write transaction: proof that the writer thread still commits."""
