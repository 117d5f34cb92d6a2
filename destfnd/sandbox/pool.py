"""The daemon's side of the workers: a pool of worker processes (process.py) per destination;
send invocations with many in flight, enforce the timeout, and replace a worker that dies,
blocks or runs out of memory. User code never runs in the daemon process."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import structlog

from destfnd.sandbox import protocol
from destfnd.sandbox.process import (
    InitError,
    OutputLimits,
    Spec,
    Worker,
    WorkerFailed,
    read_code,
    spawn,
    stop,
)

log = structlog.get_logger("destfnd.sandbox")

_PING_GRACE_S = 1.0  # a worker that cannot answer a ping this fast after a timeout is stuck
# After a call's time is up: its cancellation's answer, or a ping, and the reply (or a kill).
_AFTER_TIMEOUT_S = 2 * _PING_GRACE_S
_MIN_RERUN_S = 0.5  # a re-run with less time than this left is not started


class CallTimedOut(TimeoutError):
    """The invocation did not finish in time and was cancelled (every timeout of `Pool.call`
    is one). `reply`: what the worker sent for it once cancelled (its logs and requests so
    far), if it answered within a grace; None if it could not. `cut_to_s`: the time it had,
    when less than its timeout (a re-run with what was left of the attempt)."""

    def __init__(self, reply: dict | None, cut_to_s: float | None = None) -> None:
        super().__init__("the invocation timed out")
        self.reply = reply
        self.cut_to_s = cut_to_s


class NotStarted(Exception):
    """The invocation was not run: it could not start in time (`Pool.call_alone`)."""


class Pool:
    """`size` workers for one destination, each with many invocations in flight."""

    def __init__(self, spec: Spec, size: int = 1, redact: Callable[[str], str] = str) -> None:
        self.spec = spec
        self._redact = redact  # for the workers' stray output
        self.size = size
        self.workers: list[Worker] = []
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._replacing = 0
        self._closed = False
        self._quarantine: Worker | None = None
        self._tasks: set[asyncio.Task] = set()  # respawns in progress
        self._retired: list[Worker] = []
        self._quarantine_lock = asyncio.Lock()
        self.last_init_error: str | None = None
        self._log = log.bind(destination=spec.name)
        self._code: dict[str, str] = {}  # read at start()
        self._output = OutputLimits()  # of stray output, for all its workers

    async def start(self) -> dict:
        """Start the workers; returns the first one's `ready` (versions, settings problems)."""
        self._code = read_code(self.spec)
        for _ in range(self.size):
            self.workers.append(await spawn(self.spec, self._replace, self._code, self._redact,
                                            self._output))  # fmt: skip
        return self.workers[0].ready

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers, self.workers = self.workers + self._retired, []
        self._retired = []
        if self._quarantine is not None:
            workers.append(self._quarantine)
        for worker in workers:
            worker.retired = True
            worker.writer.close()  # EOF: the worker exits on its own
        try:
            # All at once: one after another, a stop took 2 s per busy worker.
            await asyncio.gather(*(stop(worker) for worker in workers))
        finally:  # cut short (a second Ctrl-C): leave no worker behind
            for worker in workers:
                worker.kill()

    async def call(
        self, events: list, *, batch: bool, stages: list[str], rerun_until: float | None = None
    ) -> dict:
        """Run one invocation; raises TimeoutError or WorkerFailed (both retryable).

        An invocation caught in the crash of a worker it shared with others runs once more,
        alone, on a quarantine worker: the crash was most likely another's and should not cost
        this event an attempt, while the one that crashed it crashes the quarantine too. With
        `rerun_until` (time.monotonic()) the re-run ends by then (see `call_alone`); if it
        cannot start in time (the quarantine busy with the others), the crash is its outcome.
        """
        try:
            if rerun_until is None:
                worker = await self._pick()
            else:  # (all being replaced: a start may take up to _START_TIMEOUT_S)
                timeout_s = protocol.call_timeout_s(self.spec.timeout_s, stages)
                wait_s = rerun_until - timeout_s - _AFTER_TIMEOUT_S - time.monotonic()
                try:
                    async with asyncio.timeout(max(wait_s, 0)):
                        worker = await self._pick()
                except TimeoutError:
                    raise WorkerFailed(
                        f"no worker was free within {max(wait_s, 0):.1f}s: all were being replaced"
                    ) from None
            return await self._call_on(worker, events, batch, stages)
        except WorkerFailed as exc:
            if not exc.shared:
                raise
            failed = exc
        try:
            return await self.call_alone(events, batch=batch, stages=stages, until=rerun_until)
        except NotStarted:
            message = (
                f"{failed}; run again alone, it could not start in time: the quarantine worker "
                "was busy with others, or starting"
            )
            raise WorkerFailed(message, out_of_memory=failed.out_of_memory) from None

    async def call_alone(
        self,
        events: list,
        *,
        batch: bool,
        stages: list[str],
        start_by: float | None = None,
        until: float | None = None,
    ) -> dict:
        """Run one invocation alone, on the quarantine worker: what crashes it crashes no
        other invocation (for a re-run after a crash). One at a time: a crash there is that
        call's own. Raises NotStarted if it cannot start by `start_by` (time.monotonic())
        for the others waiting there. With `until`, it ends by then: it has what is left
        of its timeout, less what a timeout's ending takes, and is not started with less
        than _MIN_RERUN_S."""
        if until is not None:
            latest = until - _AFTER_TIMEOUT_S - _MIN_RERUN_S
            start_by = latest if start_by is None else min(start_by, latest)
        if start_by is not None and time.monotonic() >= start_by:
            raise NotStarted
        lock = self._quarantine_lock
        try:
            # The wait for the worker, and for a new one to load, count against `start_by`.
            async with asyncio.timeout(None if start_by is None else start_by - time.monotonic()):
                await lock.acquire()
                try:
                    worker = await self._quarantine_worker()
                except BaseException:
                    lock.release()
                    raise
        except TimeoutError:
            raise NotStarted from None
        limit_s = None if until is None else until - time.monotonic() - _AFTER_TIMEOUT_S
        if limit_s is not None and limit_s < _MIN_RERUN_S:  # (the loop stalled meanwhile)
            lock.release()
            raise NotStarted
        try:
            return await self._call_on(worker, events, batch, stages, limit_s)
        except asyncio.CancelledError:
            # Cancelled (a stop, the dispatcher's guard) while the worker runs it: the worker
            # is stopped with it, or the next call there would share it with this one.
            worker.kill()
            worker.retired = True
            raise
        finally:
            lock.release()

    async def _quarantine_worker(self) -> Worker:
        if self._quarantine is None or self._quarantine.retired:
            try:
                self._quarantine = await spawn(
                    self.spec, code=self._code, redact=self._redact, output=self._output
                )
            except InitError as exc:
                raise WorkerFailed(f"the function cannot be loaded: {exc}") from None
        return self._quarantine

    async def _call_on(
        self,
        worker: Worker,
        events: list,
        batch: bool,
        stages: list[str],
        limit_s: float | None = None,
    ) -> dict:
        """One invocation on `worker`, within its timeout, or `limit_s` if that is less."""
        timeout_s = protocol.call_timeout_s(self.spec.timeout_s, stages)
        cut_to_s = limit_s if limit_s is not None and limit_s < timeout_s else None
        if worker.retired or worker.writer.is_closing():
            # It is exiting (it died, or said so in a reply) since it was picked: this
            # invocation never ran. Its on_exit replaces it, with its exit code in the reason.
            raise WorkerFailed("the worker process was exiting", shared=True)
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        worker.inflight[call_id] = future
        try:
            worker.send({"t": "call", "id": call_id, "events": events, "batch": batch,
                         "stages": stages})  # fmt: skip
            async with asyncio.timeout(timeout_s if cut_to_s is None else cut_to_s):
                # Shielded: on timeout the future stays, to take the cancelled call's reply.
                return await asyncio.shield(future)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                return future.result()  # it finished as the deadline fired: not a timeout
            shared = len(worker.inflight) > 1  # now, before the others time out too
            state = await self._state_after_timeout(worker, call_id)
            if state == "exiting":
                failed = future.exception() if future.done() and not future.cancelled() else None
                if isinstance(failed, WorkerFailed) and failed.shared:
                    # Killed while this one waited for its ping: blocked by another (whose
                    # timeout came first and said so), or crashed with others in it. It runs
                    # again in quarantine, as those still waiting in it do.
                    raise failed from None
                # It crashed (another invocation, say) or said it exits: its on_exit replaces
                # it, with the reason, and the others running in it learn of it then.
                raise CallTimedOut(None, cut_to_s) from None
            late = None
            if state == "healthy" or (state == "stuck" and not shared):
                # A slow invocation, cancelled: the worker answers for it with what it
                # printed and requested so far (and which stage ran). Also when the handler
                # still holds a thread (a plain def), the loop being free to answer.
                try:
                    async with asyncio.timeout(_PING_GRACE_S):
                        late = await asyncio.shield(future)
                except (TimeoutError, WorkerFailed):
                    late = None
                if state == "healthy":
                    raise CallTimedOut(late, cut_to_s) from None
            # The worker's loop is blocked or a thread is stuck: every invocation in it waits.
            # The others did not block it: each runs again in quarantine, at no attempt's cost
            # (once the worker is killed, the one left alone would look like its culprit).
            for other_id, other in worker.inflight.items():
                if other_id != call_id and not other.done():
                    other.set_exception(WorkerFailed(
                        "the worker was blocked by another invocation", shared=True))  # fmt: skip
            self._replace(worker, "blocked: a timed-out invocation did not let go")
            if shared:
                raise WorkerFailed("the worker was blocked, maybe by another invocation",
                                   shared=True) from None  # fmt: skip
            raise CallTimedOut(late, cut_to_s) from None  # (blocked: it could not answer)
        except WorkerFailed as exc:
            self._replace(worker, str(exc))
            raise
        finally:
            worker.inflight.pop(call_id, None)
            if future.done():
                if not future.cancelled():
                    future.exception()  # retrieved: a late WorkerFailed is not news
            else:
                future.cancel()

    async def _state_after_timeout(self, worker: Worker, call_id: int) -> str:
        """Cancel the invocation, then ping: "healthy", "blocked" (its loop cannot answer),
        "stuck" (it answers, but runs a handler on a thread that cannot be interrupted), or
        "exiting" (it died meanwhile, or said it exits after a reply: not blocked, which it
        was logged as)."""
        if worker.retired:
            return "exiting"
        worker.send({"t": "cancel", "id": call_id})
        ping_id = next(self._ids)
        pong = asyncio.get_running_loop().create_future()
        worker.pings[ping_id] = pong
        worker.send({"t": "ping", "id": ping_id})
        try:
            async with asyncio.timeout(_PING_GRACE_S):
                reply = await pong
        except WorkerFailed:
            return "exiting"
        except TimeoutError:
            return "exiting" if worker.retired else "blocked"
        finally:
            worker.pings.pop(ping_id, None)
        return "stuck" if reply.get("stuck") else "healthy"

    def _replace(self, worker: Worker, reason: str) -> None:
        """Take `worker` out (killing it if alive) and start another in its place."""
        if self._closed or worker not in self.workers:
            worker.kill()  # e.g. the quarantine worker: started again when next needed
            if not self._closed and worker is self._quarantine:
                self._log.warning("quarantine_worker_ended", pid=worker.pid, reason=reason)
            return
        self.workers.remove(worker)
        worker.kill()
        self._log.warning("worker_replaced", pid=worker.pid, reason=reason)
        self._replacing += 1
        task = asyncio.create_task(self._respawn(worker), name=f"respawn:{self.spec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Kept until its reader tasks end (they do once the process is gone): awaited at close.
        self._retired = [w for w in self._retired if not all(t.done() for t in w.tasks)]
        self._retired.append(worker)

    async def _respawn(self, old: Worker) -> None:
        delay = 0.05
        try:
            while not self._closed:
                try:
                    new = await spawn(
                        self.spec, self._replace, self._code, self._redact, self._output
                    )
                except (InitError, OSError) as exc:
                    self.last_init_error = str(exc)
                    self._log.error("worker_start_failed", error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)  # a function that fails to load: back off
                    continue
                if self._closed:
                    new.kill()
                    return
                self.workers.append(new)
                self.last_init_error = None
                self._log.info("worker_started", pid=new.pid, replaced=old.pid)
                return
        finally:
            self._replacing -= 1
            self._changed.set()

    async def _pick(self) -> Worker:
        """The live worker with the fewest invocations in flight; waits while all are being
        replaced."""
        while True:
            live = [w for w in self.workers if not w.retired]
            if live:
                return min(live, key=lambda w: len(w.inflight))
            if self._closed:
                raise WorkerFailed("the destination is shutting down")
            if self.last_init_error:
                raise WorkerFailed(f"the function cannot be loaded: {self.last_init_error}")
            self._changed.clear()
            await self._changed.wait()
