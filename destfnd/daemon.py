"""The composition root: open the store, start ingest and one dispatcher per destination in one
task group, handle signals, and shut down in order (ingest 503 -> dispatch drains -> SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import os
import signal
import sqlite3
import stat
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import web

from destfnd import sdnotify
from destfnd.config import Config, config_secrets
from destfnd.deliverers import start_deliverers
from destfnd.dispatch import Deliverer, Dispatcher
from destfnd.errors import DestfndError
from destfnd.ingest import Ingest
from destfnd.listen import bind_error_text
from destfnd.paths import irregular_companion, open_checked
from destfnd.redact import Redactor
from destfnd.store import Dedupe, StoreError, Writer, open_db, store_error
from destfnd.store import queue as q
from destfnd.store.db import PROGRESS_EVERY
from destfnd.store.dedupe import KEY_MIN, sweep_keys, sweep_rows

log = structlog.get_logger("destfnd.daemon")
T = TypeVar("T")

_PRUNE_EVERY_S = 60.0
_PRUNE_CHUNK = 2000  # rows per transaction, so pruning never holds the writer for long
_KEY_SWEEP_SLICE = 20_000  # dedupe keys looked at per transaction: a few ms of the writer
# aiohttp waits this long for requests still running once the listener closes.
_HTTP_SHUTDOWN_S = 5.0
_SLOW_START_S = 5.0  # opening the store took this long: say so (and what systemd was told)


class DaemonError(DestfndError):
    """The daemon cannot start."""


_WITHOUT_HINT = (
    "renamed? destfnd move --from {name} --to NEW_NAME; removed for good? destfnd discard "
    "--destination {name}; else they wait for it to come back under this name"
)
_WATCH_FILE_S = 1.0  # (and the clock)
_CLOCK_NOTE = (
    "retry schedules and max_age are on the wall clock: stepped forward, deliveries are "
    "older by the step and retries due early (see README, 'The clock')"
)


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


# How long a stop after the WAL was deleted tries to move what it holds into the database
# file while other connections are in the way (within systemd's TimeoutStopSec=45s).
_SAVE_WAL_S = 15.0


class DatabaseLock:
    """Exclusive locks held for the daemon's lifetime, taken before SQLite opens the file: two
    daemons on one database would deliver everything twice, and through two names of one
    file (hard links) each would keep a WAL of its own and corrupt it. One lock beside the
    file (symbolic links resolved), one on the file itself (an inode has one, whatever the
    name). flock, not SQLite's POSIX locks, which the two do not disturb; the file's own
    descriptor stays open until SQLite has closed it (closing any descriptor of a file drops
    the process's POSIX locks on it)."""

    def __init__(self, path: Path) -> None:
        beside = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            real = Path(os.path.realpath(path))
            beside = real.parent / f"{real.name}.lock"
            # Not through a link: one the daemon's user (or a function, running as that user)
            # put there would have a command run as root create a file where it leads.
            self._beside: int | None = _open_lock(beside, real)
        except OSError as exc:
            why = exc.strerror
            if beside is not None and os.path.islink(beside):
                why = f"{beside} is a symbolic link (remove it)"
            raise StoreError(f"{path}: cannot create the database's lock file: {why}") from None
        self._file: int | None = None
        # An empty file that was there (not one made here): see `_open_store`.
        self.found_empty = False
        try:
            self._take(self._beside, path)
            existed = real.is_file()
            try:  # an empty file is a new database to SQLite
                self._file = _open_regular(real, os.O_RDONLY)
            except OSError as exc:
                raise StoreError(f"{path}: cannot open the database: {exc.strerror}") from None
            self.found_empty = existed and os.fstat(self._file).st_size == 0
            self._take(self._file, path)
            companion = irregular_companion(real, ("-wal", "-shm"))  # a FIFO fails each commit
            if companion is not None:
                raise StoreError(
                    f"{path}: cannot open the database: {companion} is not a regular file"
                )
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _take(fd: int, path: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DaemonError(f"{path}: another destfnd is already serving this database") from None

    def close(self) -> None:
        if self._beside is not None:
            os.close(self._beside)
            self._beside = None
        if self._file is not None:
            os.close(self._file)
            self._file = None


def _open_lock(lock: Path, real: Path) -> int:
    """The lock file beside the database `real`, never through a link: made now if it is not
    there (and, run as root, given the database's owner), else used as it is."""
    try:
        fd = _open_regular(lock, os.O_WRONLY | os.O_EXCL | os.O_NOFOLLOW)
    except FileExistsError:  # there already, whoever owns it
        return _open_regular(lock, os.O_WRONLY | os.O_NOFOLLOW)
    if os.geteuid() == 0:
        try:
            _owned_as_database(fd, real)
        except OSError:
            os.close(fd)
            raise
    return fd


def _owned_as_database(fd: int, real: Path) -> None:
    """The lock file `fd`, which this process has just created, owned as the database (or
    its folder, before there is one): a command run as root must not leave a lock the
    daemon's user cannot open (it would not start again), as SQLite gives its -wal and -shm
    files the database's owner. Only a file made here: one that was there may be another
    file's other name (a hard link), which this would give away."""
    try:
        owner = os.stat(real)
    except FileNotFoundError:
        owner = os.stat(real.parent)
    os.fchown(fd, owner.st_uid, owner.st_gid)


def _open_regular(path: Path, mode: int) -> int:
    """`path`, created if need be, opened only if it is a regular file (`open_checked`)."""
    return open_checked(path, mode | os.O_CREAT, _regular_only)


def _regular_only(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")


class Daemon:
    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self.dispatchers: dict[str, Dispatcher] = {}
        self.bound: tuple[str, int] | None = None  # listening (503 "starting" until ready)
        self.ready = False
        self.records_bytes = 0  # logs and requests recorded, against storage.records_max_size
        # max_age (ms) -> the invocation id up to which records were pruned by it.
        self._records_scanned: dict[int, int] = {}
        self._progress: sdnotify.StartProgress | None = None  # while the store opens
        self._http_open = False
        self.failure: str | None = None  # why the daemon stopped on its own (exit 1)
        # The database's files and their identities, taken once it is open.
        self._db_files: list[tuple[Path, tuple[int, int] | None]] = []
        self._wal_gone = False  # its -wal or -shm file was deleted while it ran
        self._found_empty = False  # the database file was there, and empty

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """First call: drain gracefully. Second call: stop now (leases are still released)."""
        if self._stop.is_set():
            log.warning("stop_hurried")
            self._hurry.set()
        self._stop.set()
        if self._progress is not None:  # the store is still opening: stop that
            self._progress.stopping = True

    async def run(self) -> None:
        lock = DatabaseLock(self.cfg.storage.path)
        self._found_empty = lock.found_empty
        try:
            await self._run()
        finally:
            lock.close()
        log.info("daemon_stopped")
        if self.failure is not None:
            raise DaemonError(self.failure)

    def _open_store(
        self, progress: sdnotify.StartProgress
    ) -> tuple[sqlite3.Connection, Dedupe] | None:
        """Open and migrate the database, take back the leases of a previous run and read the
        dedupe keys not yet flushed. Runs on a thread while the event loop answers 503
        "starting". Under systemd a slow start (the first after an upgrade) keeps extending its
        start timeout while SQLite makes progress. A stop requested meanwhile
        (`progress.stopping`) stops it at SQLite's next progress call, rolling back the
        statement running: None is returned."""
        cfg = self.cfg
        started = time.monotonic()
        progress.status = "starting: opening and migrating the database"
        path = Path(cfg.storage.path)
        if self._found_empty:
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
        # At once: what goes missing from here on is caught by _watch_file.
        self._db_files = [(f, _identity(f)) for f in _database_files(cfg.storage.path)]
        try:
            conn.set_progress_handler(progress.tick, PROGRESS_EVERY)
            progress.status = "starting: taking back the leases of the last run"
            recovered = q.recover(conn, self._now_ms())
            if recovered:
                log.info("leases_recovered", deliveries=recovered)
            self.records_bytes = q.invocations_size(conn)
            enabled = {d.name: d.enabled for d in self.cfg.destinations}
            for name, counts in sorted(q.status_counts(conn).items()):
                waiting = counts.get("pending", 0) + counts.get("retrying", 0)
                if not waiting:
                    continue
                if name not in enabled:
                    # Renamed or removed from the config: they wait for it to come back.
                    hint = _WITHOUT_HINT.format(name=name)
                    log.warning("deliveries_without_destination", destination=name,
                                unfinished=waiting, hint=hint)  # fmt: skip
                elif not enabled[name]:
                    hint = "enabled = true delivers them"
                    log.warning("deliveries_of_disabled_destination", destination=name,
                                unfinished=waiting, hint=hint)  # fmt: skip
            progress.status = "starting: reading the messageIds of recent events (dedupe)"
            dedupe = Dedupe.load(conn)
            conn.set_progress_handler(None, 0)  # the writer's statements are not start-up
        except BaseException as exc:
            conn.close()
            if not isinstance(exc, sqlite3.Error):
                raise
            if progress.stopping:
                return None
            raise store_error(f"{cfg.storage.path}: cannot start on it", exc) from exc
        took = time.monotonic() - started
        if took >= _SLOW_START_S or progress.sent:
            log.info("slow_start", seconds=round(took, 1), timeout_extended=progress.sent)
        return conn, dedupe

    async def _start_store(self) -> tuple[sqlite3.Connection, Dedupe] | None:
        """`_open_store` on a thread; None (logged) if a stop came before or meanwhile."""
        progress = self._progress = sdnotify.StartProgress()
        progress.stopping = self._stop.is_set()
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_store, progress))
        try:
            store = await asyncio.shield(opening)
        except asyncio.CancelledError:
            progress.stopping = True  # a thread cannot be cancelled: cut its SQLite work short
            with contextlib.suppress(BaseException):
                opened = await opening
                if opened is not None:
                    opened[0].close()
            raise
        finally:
            self._progress = None
        if store is not None and self._stop.is_set():
            store[0].close()
            store = None
            progress.status = "nothing: the store had opened"
        if store is None:
            # `interrupted`: the step a stop cut short (its statement rolled back).
            log.info("stopped_while_starting", interrupted=progress.status)
        return store

    def _on_commit(self, destinations: tuple[str, ...]) -> None:
        for name in destinations:
            self.dispatchers[name].wake()

    async def _run(self) -> None:
        cfg = self.cfg
        # Listening first: while the store opens, /healthz and ingest answer 503 "starting".
        ingest = Ingest(cfg, self._on_commit, clock=self._clock)
        runner = web.AppRunner(
            ingest.app(),
            access_log=None,
            auto_decompress=False,  # ingest inflates itself, with a cap on the size
            handle_signals=False,
            shutdown_timeout=_HTTP_SHUTDOWN_S,
            keepalive_timeout=cfg.server.keepalive_timeout_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.server.host, cfg.server.port, backlog=1024)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise DaemonError(bind_error_text(cfg.server.host, cfg.server.port, exc)) from None
        self.bound = _bound_address(runner)
        log.info("daemon_listening", listen=f"{self.bound[0]}:{self.bound[1]}")
        writer: Writer | None = None
        self._http_open = True
        try:
            store = await self._start_store()
            if store is None:
                return
            conn, dedupe = store
            writer = Writer(conn, dedupe)
            redactor = Redactor(config_secrets(cfg))
            # Function workers can take seconds to load (up to their 30 s limit): a stop
            # meanwhile abandons them rather than waiting, or failing the start (exit 3).
            deliverers = await self._unless_stopped(_start_extending(cfg, redactor, self._stop))
            if deliverers is None or self._stop.is_set():
                for deliverer in (deliverers or {}).values():
                    await deliverer.close()
                log.info("stopped_while_starting", interrupted="starting the destinations")
                return
            for dest in cfg.destinations:
                if dest.name in deliverers:
                    self.dispatchers[dest.name] = Dispatcher(
                        dest, writer, deliverers[dest.name], clock=self._now_ms,
                        redact=redactor, on_recorded=self._recorded,
                        summary_every_s=cfg.logging.summary_interval_s,
                        log_successes=cfg.logging.level == "debug",
                    )  # fmt: skip
            ingest.attach(writer, dedupe)
            _tune_gc()
            await self._serve(ingest, runner, writer, dedupe)
        finally:
            try:
                if self._http_open:
                    await runner.cleanup()
                if writer is not None and self._wal_gone:
                    await self._save_wal(writer)
            finally:
                if writer is not None:
                    writer.shutdown()

    async def _unless_stopped(self, start: Coroutine[Any, Any, T]) -> T | None:
        """`start`'s result, or None if a stop was requested first: then `start` is
        cancelled and awaited (it leaves nothing running), and what it was doing abandoned.
        (A result that was ready at that moment is returned: the caller closes it.)"""
        task = asyncio.ensure_future(start)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this task is cancelled: so is the start, and waited for
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            stop.cancel()
        cut = not task.done()
        if cut:
            task.cancel()
            # Cancelled here (not by us), this raises, and gather cancels `task` as it goes.
            await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return None
        error = task.exception()
        if error is None:
            return task.result()
        if cut and isinstance(error, DestfndError):  # it failed as it was cut short
            log.info("start_abandoned", error=str(error))
            return None
        raise error  # it had failed on its own (a bad function file: exit 3, stop or not)

    async def _serve(
        self, ingest: Ingest, runner: web.AppRunner, writer: Writer, dedupe: Dedupe
    ) -> None:
        """Ready until stopped, then drain in order: deliveries, the listener (requests still
        running commit first), the writer. The caller closes what an error left open."""
        cfg = self.cfg
        assert self.bound is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.serve(), name="writer")
            tasks = [
                tg.create_task(d.run(), name=f"dispatch:{name}")
                for name, d in self.dispatchers.items()
            ]
            pruner = tg.create_task(self._prune_loop(writer, dedupe), name="prune")
            watcher = tg.create_task(self._watch_file(writer), name="watch-database")
            watchdog_s = sdnotify.watchdog_interval_s()
            watchdog = None
            if watchdog_s is not None:
                watchdog = tg.create_task(self._watchdog(writer, watchdog_s), name="watchdog")
            ingest.ready = self.ready = True
            log.info(
                "daemon_ready",
                listen=f"{self.bound[0]}:{self.bound[1]}",
                destinations=list(self.dispatchers),
                database=str(cfg.storage.path),
            )
            sdnotify.notify("READY=1", "STATUS=accepting events")
            await self._stop.wait()

            sdnotify.notify("STOPPING=1", "STATUS=draining")
            if watchdog is not None:
                # systemd stops watching once stopping (TimeoutStopSec rules), but a late
                # WATCHDOG=1 would arm it again.
                watchdog.cancel()
            log.info("daemon_draining", grace_s=cfg.server.drain_timeout_s)
            ingest.draining = True
            for d in self.dispatchers.values():
                d.stop()
            await self._drain(tasks)
            pruner.cancel()
            watcher.cancel()
            # Requests still running commit before the writer closes.
            self._http_open = False
            await runner.cleanup()
            writer.close()

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        """Give in-flight deliveries the grace period, then cancel (their leases go back)."""
        if not tasks:
            return
        hurry = asyncio.create_task(self._hurry.wait(), name="hurry")
        try:
            await _wait_all_or(tasks, hurry, self.cfg.server.drain_timeout_s)
        finally:
            hurry.cancel()
        late = [t for t in tasks if not t.done()]
        if late:
            # A second signal ends the drain early: say that, not that the timeout passed.
            event = "drain_cut_short" if self._hurry.is_set() else "drain_timeout"
            log.warning(event, destinations=len(late))
            for t in late:
                t.cancel()
            await asyncio.wait(late)

    def _recorded(self, size: int) -> None:
        self.records_bytes += size

    async def _prune_records(self, writer: Writer, finished_before: int) -> int:
        """Attempt records go with their deliveries' retention, and sooner when they take more
        than `records_max_size`: the oldest first. A record is at most its destination's
        `max_age` older than the delivery finish that keeps it."""
        ages = {d.name: int(d.retry.max_age_s * 1000) for d in self.cfg.destinations}
        longest = max(ages.values(), default=0)
        # First every destination's (and those no longer configured) by the longest max_age.
        deleted_total = 0
        while True:
            deleted, freed = await writer.run(
                q.prune_invocations, finished_before - longest,
                self.cfg.storage.records_max_bytes, self.records_bytes, _PRUNE_CHUNK,
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
                    q.prune_invocations_of, names, finished_before - age, after, _PRUNE_CHUNK
                )
                self.records_bytes -= freed
                deleted_total += deleted
                self._records_scanned[age] = after
        return deleted_total

    async def _sweep_keys(self, writer: Writer, before: int, cursor: int, rows: int) -> int:
        """Forget dedupe keys out of the window: `rows` keys of the key space this pass, in
        slices of a few ms, resumed at `cursor`. Returns where the next pass starts."""
        while rows > 0:
            _, after = await writer.run(sweep_keys, before, cursor, _KEY_SWEEP_SLICE)
            rows -= _KEY_SWEEP_SLICE
            if after is None:
                return KEY_MIN
            cursor = after
        return cursor

    async def _prune_loop(self, writer: Writer, dedupe: Dedupe) -> None:
        storage = self.cfg.storage
        key_cursor, keys_flushed = KEY_MIN, 0
        while True:
            now = self._now_ms()
            finished_before = now - int(storage.retention_s * 1000)
            try:
                records = await self._prune_records(writer, finished_before)
                if records:
                    log.info("records_pruned", invocations=records, kept_bytes=self.records_bytes)
                total = 0
                while True:
                    deleted = await writer.run(q.prune, finished_before, _PRUNE_CHUNK)
                    total += deleted
                    if deleted < _PRUNE_CHUNK:
                        break
                if total:
                    log.info("pruned", deliveries=total)
                # Dedupe keys out of the window can never match again.
                keys_before = now - int(self.cfg.server.dedupe_window_s * 1000)
                flushed = dedupe.flushed_keys
                rows = sweep_rows(flushed - keys_flushed)
                key_cursor = await self._sweep_keys(writer, keys_before, key_cursor, rows)
                keys_flushed = flushed  # only once swept: a failed pass is made up next time
            except StoreError as exc:
                # Even a delete needs room in the WAL: with the disk full, try next time.
                log.warning("prune_failed", error=str(exc))
            await asyncio.sleep(_PRUNE_EVERY_S)

    async def _watch_file(self, writer: Writer) -> None:
        """The database file deleted or replaced under the running daemon (`rm -rf var/`):
        SQLite would go on committing to the unlinked file, and everything since would be
        gone at the next start. Stop at once (ingest answers 503) and exit 1. The same for
        its -wal and -shm files (`rm var/*-wal`): what the unlinked WAL holds since the last
        checkpoint would be lost at the next start, but SQLite still has it open, and
        `_save_wal` moves it into the file as the daemon stops. Also a step of the wall
        clock (`_clock_stepped`), at the same pace."""
        database = self._db_files[0][0]
        clock = ClockSteps(self._clock)
        while True:
            await asyncio.sleep(_WATCH_FILE_S)
            stepped_s = clock.check()
            if stepped_s is not None:
                await self._clock_stepped(writer, stepped_s)
            for file, identity in self._db_files:
                if _identity(file) == identity:
                    continue
                if file == database:
                    self.failure = (
                        f"{file}: the database file was deleted or replaced while the daemon "
                        "ran; what it held (every unfinished delivery) went with it"
                    )
                else:
                    self._wal_gone = True
                    self.failure = (
                        f"{file}: deleted or replaced while the daemon ran; the daemon stopped "
                        "to move what the WAL held into the database file: keep SQLite's "
                        "files out of cleanup jobs"
                    )
                log.error("database_file_gone", database=str(database), file=str(file))
                self.request_stop()
                return

    async def _clock_stepped(self, writer: Writer, step_s: float) -> None:
        """Said in the log; stepped back, the retries waiting are brought forward by the
        step (they waited an hour more after a one-hour step back). Not forward: a step
        forward makes them due early anyway, and the schedules of a previous run, which may
        have had the right time, would be pushed out by the step."""
        shifted = None
        if step_s < 0:
            try:
                shifted = await writer.run(q.shift_retries, int(step_s * 1000), self._now_ms())
            except StoreError as exc:
                log.warning("clock_step_not_applied", error=str(exc))
        log.warning("clock_stepped", by_s=round(step_s, 1), retries_brought_forward=shifted,
                    note=_CLOCK_NOTE)  # fmt: skip

    async def _save_wal(self, writer: Writer) -> None:
        """After the -wal or -shm was deleted: the WAL SQLite still has open holds every
        commit since the last checkpoint, and a restart would not find it. SQLite's own
        checkpoint at close happens only if no other connection is open (a `destfnd stats`,
        a backup, a shell), so checkpoint it here, until done or _SAVE_WAL_S have passed."""
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
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        log.error("wal_not_saved", frames=frames, moved=moved, error=error)
        why = error or (
            "other connections to the database kept SQLite from moving all of it "
            f"({moved} of {frames} pages)"
        )
        self.failure = (
            f"{self.failure}; but {why}: the events acknowledged since the last checkpoint "
            "may be lost"
        )

    async def _watchdog(self, writer: Writer, every_s: float) -> None:
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

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


async def _wait_all_or(tasks: list[asyncio.Task], hurry: asyncio.Task, timeout_s: float) -> None:
    """Wait until every task is done, `hurry` is done, or the timeout passes."""
    pending = set(tasks)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pending and not hurry.done():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        done, _ = await asyncio.wait([*pending, hurry], timeout=left,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        pending -= done


# Parsing a batch allocates a few containers per event, so the default gen-0 threshold (700)
# ran the cyclic collector several times per request, and each older-generation pass walked
# every module, config and library object loaded at start: measured, about a sixth of batch
# ingest's throughput. Those start-up objects are frozen out of collection, and collections
# run less often; cycles made while serving are still collected.
_GC_THRESHOLD = (10_000, 10, 10)


def _nothing(conn: object) -> None:
    """An empty write transaction: proof that the writer thread still commits."""


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLD)


async def _start_extending(
    cfg: Config, redactor: Redactor, stop: asyncio.Event
) -> dict[str, Deliverer]:
    """`start_deliverers`, extending systemd's start timeout while it runs: each worker may
    take up to 30 s to load its function, one after another (a limit of destfnd's own, so a
    load that hangs still ends). Not once a stop is asked for: systemd would extend its stop
    timeout instead."""
    progress = sdnotify.StartProgress()
    progress.status = "starting: loading the functions"

    async def tick() -> None:
        while not stop.is_set():
            progress.tick()
            await asyncio.sleep(1)

    ticking = asyncio.create_task(tick(), name="start-progress")
    try:
        return await start_deliverers(cfg, redactor)
    finally:
        ticking.cancel()


def _bound_address(runner: web.AppRunner) -> tuple[str, int]:
    for server in runner.sites:
        sock = server._server.sockets[0] if server._server else None  # type: ignore[attr-defined]
        if sock is not None:
            host, port = sock.getsockname()[:2]
            return host, port
    return ("", 0)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM, SIGINT and SIGHUP only set the stop event; a second one means stop now.

    SIGHUP stops too, gracefully: it is a closed terminal or someone's try at a reload, and
    destfnd has no reload (a restart is how changed config and function files are loaded, and
    it loses nothing). Left to its default, SIGHUP killed the daemon without a log line."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, _on_signal, daemon, sig)


def _on_signal(daemon: Daemon, sig: signal.Signals) -> None:
    # Stop first: after a hangup the terminal is gone and the log line may not get out.
    if sig is signal.SIGHUP and daemon.stop_requested:
        return  # a terminal's hangup comes twice (shell, then kernel): not "stop now"
    daemon.request_stop()
    if sig is signal.SIGHUP:
        note = "no reload: stopping; start again to load changes"
        log.info("signal_received", signal=sig.name, note=note)
    else:
        log.info("signal_received", signal=sig.name)
