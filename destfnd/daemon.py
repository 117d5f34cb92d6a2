"""The composition root: open the store, start ingest and one dispatcher per destination in one
task group, handle signals, and shut down in order (ingest 503 -> dispatch drains -> SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog
from aiohttp import web

from destfnd import descriptors, sdnotify, upkeep
from destfnd.config import Config, config_secrets
from destfnd.deliverers import start_deliverers
from destfnd.dispatch import Deliverer, Dispatcher
from destfnd.errors import DestfndError
from destfnd.ingest import Ingest
from destfnd.listen import bind_error_text
from destfnd.redact import Redactor
from destfnd.startup import open_store
from destfnd.store import Dedupe, Writer
from destfnd.store.lock import DatabaseLock
from destfnd.upkeep import DatabaseWatch, Retention, save_wal

log = structlog.get_logger("destfnd.daemon")
T = TypeVar("T")

# aiohttp waits this long for requests still running once the listener closes.
_HTTP_SHUTDOWN_S = 5.0


class DaemonError(DestfndError):
    """The daemon cannot start."""


class Daemon:
    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self.dispatchers: dict[str, Dispatcher] = {}
        self.bound: tuple[str, int] | None = None  # listening (503 "starting" until ready)
        self.ready = False
        self._records_bytes = 0  # logs and requests recorded when the store opened
        self.retention: Retention | None = None  # once the store is open
        self._progress: sdnotify.StartProgress | None = None  # while the store opens
        self._http_open = False
        self.failure: str | None = None  # why the daemon stopped on its own (exit 1)
        self._watch: DatabaseWatch | None = None  # its files, once it is open
        self._files_limit = 0  # of open file descriptors, once raised
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
        self._files_limit = descriptors.raise_limit()
        lock = DatabaseLock(self.cfg.storage.path)
        self._found_empty = lock.found_empty
        try:
            await self._run()
        finally:
            lock.close()
        log.info("daemon_stopped")
        if self.failure is not None:
            raise DaemonError(self.failure)

    async def _start_store(self) -> tuple[sqlite3.Connection, Dedupe] | None:
        """`open_store` on a thread; None (logged) if a stop came before or meanwhile."""
        progress = self._progress = sdnotify.StartProgress()
        progress.stopping = self._stop.is_set()
        opening = asyncio.ensure_future(
            asyncio.to_thread(
                open_store, self.cfg, progress, found_empty=self._found_empty, clock=self._clock
            )
        )
        try:
            store = await asyncio.shield(opening)
        except asyncio.CancelledError:
            progress.stopping = True  # a thread cannot be cancelled: cut its SQLite work short
            with contextlib.suppress(BaseException):
                opened = await opening
                if opened is not None:
                    opened.conn.close()
            raise
        finally:
            self._progress = None
        if store is not None and self._stop.is_set():
            store.conn.close()
            store = None
            progress.status = "nothing: the store had opened"
        if store is None:
            # `interrupted`: the step a stop cut short (its statement rolled back).
            log.info("stopped_while_starting", interrupted=progress.status)
            return None
        self._watch = store.watch
        self._records_bytes = store.records_bytes
        return store.conn, store.dedupe

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
            retention = self.retention = Retention(
                cfg, writer, dedupe, self._now_ms, self._records_bytes
            )
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
                        redact=redactor, on_recorded=retention.recorded,
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
                if writer is not None and self._watch is not None and self._watch.wal_gone:
                    why = await save_wal(writer)
                    if why is not None:
                        self.failure = (
                            f"{self.failure}; but {why}: the events acknowledged since the "
                            "last checkpoint may be lost"
                        )
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
            assert self.retention is not None and self._watch is not None
            pruner = tg.create_task(self.retention.run(), name="prune")
            watcher = tg.create_task(self._watch_database(writer), name="watch-database")
            descriptors_watch = tg.create_task(upkeep.watch_descriptors(), name="watch-fds")
            watchdog_s = sdnotify.watchdog_interval_s()
            watchdog = None
            if watchdog_s is not None:
                watchdog = tg.create_task(upkeep.watchdog(writer, watchdog_s), name="watchdog")
            ingest.ready = self.ready = True
            log.info(
                "daemon_ready",
                listen=f"{self.bound[0]}:{self.bound[1]}",
                destinations=list(self.dispatchers),
                database=str(cfg.storage.path),
                open_files_limit=self._files_limit,
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
            descriptors_watch.cancel()
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

    async def _watch_database(self, writer: Writer) -> None:
        """A database file gone: stop at once (ingest answers 503), and exit 1."""
        assert self._watch is not None
        self.failure = await self._watch.run(writer)
        self.request_stop()

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
