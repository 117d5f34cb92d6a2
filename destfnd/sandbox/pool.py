"""The daemon's side of the workers: spawn them (a fresh interpreter each, never a fork of the
daemon), send invocations with many in flight, enforce the timeout, and replace a worker that
dies, blocks or runs out of memory. User code never runs in the daemon process."""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from destfnd.logs import Throttle
from destfnd.sandbox import protocol

log = structlog.get_logger("destfnd.sandbox")

_PING_GRACE_S = 1.0  # a worker that cannot answer a ping this fast after a timeout is stuck
_START_TIMEOUT_S = 30.0  # importing a user's function (and its packages) may take a while
_OUTPUT_LINE_CHARS = 1000  # of stray worker output (not print(): that goes to the attempt)
# Lines of it logged per destination (its workers together): so many at once, then so many a
# second (and a count of the rest).
OUTPUT_LINES_BURST = 200
OUTPUT_LINES_PER_S = 20.0


class CallTimedOut(TimeoutError):
    """The invocation did not finish in time and was cancelled (every timeout of `Pool.call`
    is one). `reply`: what the worker sent for it once cancelled (its logs and requests so
    far), if it answered within a grace; None if it could not."""

    def __init__(self, reply: dict | None) -> None:
        super().__init__("the invocation timed out")
        self.reply = reply


class WorkerFailed(Exception):
    """The worker died or was killed while the invocation ran. `shared`: other invocations
    were running in the same worker, so this one may only have been caught in the crash;
    `out_of_memory`: it exited for want of memory (memory_limit)."""

    def __init__(self, message: str, shared: bool = False, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.shared = shared
        self.out_of_memory = out_of_memory


class NotStarted(Exception):
    """The invocation was not run: it could not start in time (`Pool.call_alone`)."""


class InitError(Exception):
    """The function could not be loaded in a worker; the message is for the user. `stage` is
    the file that failed ("insert" or "function"), when known; `transient`: it may load the
    next time (it ran out of time, rather than failed)."""

    def __init__(self, message: str, stage: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        self.transient = transient


def call_timeout_s(timeout_s: float, stages: list[str]) -> float:
    """What a call may take: a `timeout` for each function in it, for them together (Segment
    gives an insert function and the destination function behind it 5 s each; one call runs
    both here, and either may use what the other leaves)."""
    return timeout_s * (2 if "insert" in stages and "function" in stages else 1)


@dataclass(frozen=True, slots=True)
class Spec:
    """What a worker runs: the files, the settings, the limits."""

    name: str  # the destination, for logs
    function: Path | None
    insert: Path | None
    settings: dict
    timeout_s: float
    memory_limit_bytes: int
    hidden_env: tuple[str, ...] = ()  # environment variables the worker does not get
    # The secret values among `settings` (config secrets): the worker redacts them from what
    # it records before cutting it short. A function declares more with SETTINGS.
    secrets: tuple[str, ...] = ()
    threads: int = 8  # plain `def` handlers running at once: the destination's concurrency
    # A user id the worker switches to as it starts (its group too, no other groups), before
    # any function code runs: check-config run as root runs function files as nobody.
    run_as: int | None = None


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: dict = field(default_factory=dict)
    inflight: dict[int, asyncio.Future] = field(default_factory=dict)  # invocations
    pings: dict[int, asyncio.Future] = field(default_factory=dict)
    retired: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)
    output: asyncio.Task | None = None  # the one of `tasks` that reads its stdout
    on_exit: Callable[[Worker, str], None] | None = None
    group_killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict) -> None:
        self.writer.write(protocol.encode(message))

    def kill(self) -> None:
        """SIGKILL the worker and every process it started (its process group: a function's
        subprocesses included, which would otherwise outlive it), once. Called at the latest
        right after the worker has exited, for what it left behind: the group id stays taken
        while any of them lives, but once they are all gone it is free for another process,
        so it is never signalled later."""
        self.retired = True
        if self.group_killed:
            return
        self.group_killed = True
        _kill_group(self.proc.pid)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a worker leads (`start_new_session`: its id is the pid)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing of it is left (PermissionError: macOS, for a group of zombies)


async def _exited(proc: asyncio.subprocess.Process, every_s: float = 0.02) -> int:
    """The worker's exit code, once it has exited. Not `proc.wait()`: on Python 3.11's own
    event loop that also waits for every process still holding the worker's stdout, such as
    one a function started, which only the group kill that follows this ends."""
    while proc.returncode is None:
        await asyncio.sleep(every_s)
    return proc.returncode


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for a killed worker to be reaped; for at most 2 s of its stdout held open by a
    process that left its group."""
    await _exited(proc)
    try:
        async with asyncio.timeout(2):
            await proc.wait()
    except TimeoutError:
        pass


def read_code(spec: Spec) -> dict[str, str]:
    """The function files' contents (base64), read once: every worker a pool starts, the
    replacements too, runs what was there when it started, whatever the file holds later."""
    code = {}
    for stage, path in (("function", spec.function), ("insert", spec.insert)):
        if path is not None:
            try:
                code[f"{stage}_code"] = base64.b64encode(Path(path).read_bytes()).decode()
            except OSError as exc:
                raise InitError(f"{path}: cannot read: {exc.strerror}", stage) from None
    return code


@functools.cache
def _found_through_cwd() -> str | None:
    """The folder this process found destfnd in, if that was its current folder (`python -m
    destfnd` in a source checkout): workers start with -P, without it on their sys.path, so
    they are given that folder alone, and run the same destfnd as the daemon. Once: the
    folder may be deleted meanwhile (an old release's, say), which is no reason to fail."""
    import destfnd

    if sys.flags.safe_path or not sys.path:
        return None
    try:
        first = Path(sys.path[0] or os.getcwd()).resolve()
        home = Path(destfnd.__file__).resolve().parent.parent
    except OSError:  # the current folder is gone
        return None
    return str(home) if home == first else None


async def spawn(
    spec: Spec,
    on_exit: Callable[[Worker, str], None] | None = None,
    code: dict[str, str] | None = None,
    redact: Callable[[str], str] = str,  # str: the text as it is (as dispatch does)
    output: Throttle | None = None,  # of its stray output's lines: the pool's, shared
) -> Worker:
    """Start a worker and load the function in it (`code`: from read_code, else the files as
    they are now); raises InitError with a one-line reason."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if k not in spec.hidden_env}
    env.update(MALLOC_ARENA_MAX="2", PYTHONUNBUFFERED="1")
    if (home := _found_through_cwd()) is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (home, env.get("PYTHONPATH"))))
    try:
        proc = await asyncio.create_subprocess_exec(
            # -P: not the current folder first on sys.path, as -m would put it: a `uvloop.py`
            # there would run in every worker, as whoever ran check-config or run-function.
            sys.executable, "-P", "-m", "destfnd.sandbox.child",
            str(to_child_r), str(from_child_w), str(spec.memory_limit_bytes),
            str(-1 if spec.run_as is None else spec.run_as),
            pass_fds=(to_child_r, from_child_w),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # Its own session and process group: a terminal's Ctrl-C or hangup does not reach
            # it (the daemon decides when it stops), and `kill` takes its subprocesses with it.
            start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(to_child_r)
        os.close(from_child_w)
    try:
        reader, writer = await protocol.open_pipes(from_child_r, to_child_w)
    except BaseException:  # cancelled before there is a Worker to kill: no process left
        _kill_group(proc.pid)  # not reaped yet: the group id is still its
        await asyncio.shield(_reap(proc))
        raise
    worker = Worker(proc, writer)
    worker.send({
        "t": "init",
        "function": str(spec.function) if spec.function else None,
        "insert": str(spec.insert) if spec.insert else None,
        "settings": spec.settings,
        "secrets": list(spec.secrets),
        "timeout_s": spec.timeout_s,
        "threads": spec.threads,
        **(code or {}),
    })  # fmt: skip
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            reply = await protocol.read_frame(reader)
    except TimeoutError:
        worker.kill()
        await _reap(proc)
        raise InitError(
            f"the function did not load within {_START_TIMEOUT_S:g}s: does code at its module "
            "level (an import, a network call, a loop) block?",
            transient=True,
        ) from None
    except protocol.ProtocolError as exc:
        worker.kill()
        await _reap(proc)
        raise InitError(f"the worker did not start: {exc}") from None
    except BaseException:  # cancelled (e.g. shutting down): leave no process behind
        worker.kill()
        await asyncio.shield(_reap(proc))
        raise
    if reply is None or reply.get("t") != "ready":
        worker.kill()
        await _reap(proc)  # reaped while the loop runs
        try:
            async with asyncio.timeout(2):  # what it printed (all of it is in the pipe by now)
                output = (await proc.stdout.read(64_000)).decode(errors="replace").strip()
        except TimeoutError:
            output = ""
        if reply is not None and reply.get("t") == "init_error":
            raise InitError(reply["message"], reply.get("stage"))
        raise InitError(f"the worker exited while loading: {output[-500:] or 'no output'}")
    worker.ready = reply
    worker.on_exit = on_exit
    output = asyncio.create_task(
        _read_output(worker, spec.name, redact, output or _output_throttle()),
        name=f"worker-output:{proc.pid}",
    )
    worker.output = output
    worker.tasks = [
        asyncio.create_task(_read_replies(worker, reader), name=f"worker-replies:{proc.pid}"),
        output,
        asyncio.create_task(_end_replies_at_exit(proc, reader), name=f"worker-exit:{proc.pid}"),
    ]
    return worker


async def _end_replies_at_exit(
    proc: asyncio.subprocess.Process, reader: asyncio.StreamReader
) -> None:
    """A worker that has exited sends no more replies, even if its pipe is still open in a
    process it started that did not close it (a fork in C code, say): a second or two after
    the exit, its replies are ended as if the pipe had closed (nearly always it has). The
    second after the exit is left to what it wrote before exiting, to be read first."""
    await _exited(proc, every_s=1.0)
    await asyncio.sleep(1.0)
    reader.feed_eof()


async def _read_replies(worker: Worker, reader: asyncio.StreamReader) -> None:
    try:
        while True:
            message = await protocol.read_frame(reader)
            if message is None:
                break
            kind = message.get("t")
            waiting = worker.pings if kind == "pong" else worker.inflight
            future = waiting.get(message.get("id"))
            if message.get("exiting"):
                worker.retired = True  # it exits after this reply: send it nothing more
            if future is None or future.done():
                continue  # a reply after its timeout: already recorded
            if kind in ("result", "pong"):
                future.set_result(message)
    except protocol.ProtocolError as exc:
        log.error("worker_protocol_error", pid=worker.pid, error=str(exc))
        worker.kill()
    finally:
        worker.retired = True
        try:
            code = await _exited(worker.proc)
        finally:  # also when cancelled while waiting (an event loop shutting down)
            worker.kill()  # what it started and left running
        reason = _exit_reason(code)
        calls = [f for f in worker.inflight.values() if not f.done()]
        # After an out-of-memory exit the culprit nearly always has its answer: the rest are
        # victims (a call too big to read has none: it runs again in quarantine, and fails).
        memory = code == protocol.OUT_OF_MEMORY_EXIT
        shared = len(calls) > 1 or memory
        for future in calls:
            future.set_exception(WorkerFailed(f"the worker process {reason}", shared, memory))
        for future in worker.pings.values():
            if not future.done():
                future.set_exception(WorkerFailed(f"the worker process {reason}"))
        if worker.on_exit is not None:
            worker.on_exit(worker, f"the worker process {reason}")


def _output_throttle() -> Throttle:
    # A thread writing in a loop made a million lines in 8 s, the daemon's CPU all theirs.
    return Throttle(per_s=OUTPUT_LINES_PER_S, burst=OUTPUT_LINES_BURST)


async def _read_output(
    worker: Worker, name: str, redact: Callable[[str], str], throttle: Throttle
) -> None:
    """What the worker writes outside an invocation's captured output (a thread's prints, a
    subprocess, C code), a log line each, secrets redacted, at most at `throttle`'s rate
    (the pool's: a worker replaced gets no burst of its own); read in chunks, so a line of
    any length is taken (its first _OUTPUT_LINE_CHARS logged) and the worker never blocks
    on it."""
    assert worker.proc.stdout is not None
    pending = b""
    skipping = False  # the rest of a line whose start was logged

    def emit(line: bytes) -> None:
        more = throttle.fields()
        if more is None:
            return
        text = line[: _OUTPUT_LINE_CHARS * 4].decode(errors="replace").rstrip()
        log.info("worker_output", destination=name, pid=worker.pid,
                 line=redact(text)[:_OUTPUT_LINE_CHARS], **more)  # fmt: skip

    while chunk := await worker.proc.stdout.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not skipping:
                emit(line)
            skipping = False
        if len(pending) > 65536:  # a line without an end yet: its start now, the rest dropped
            if not skipping:
                emit(pending)
            pending, skipping = b"", True
    if pending and not skipping:
        emit(pending)
    if throttle.held:
        log.info("worker_output", destination=name, pid=worker.pid, line="",
                 not_logged=throttle.held)  # fmt: skip
        throttle.held = 0


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == protocol.OUT_OF_MEMORY_EXIT:
        return "ran out of memory (memory_limit) and exited"
    return f"exited with code {code}"


async def _stop(worker: Worker) -> None:
    """A worker whose pipe was closed: given 2 s to exit, then killed with what it started."""
    try:
        async with asyncio.timeout(2):
            await _exited(worker.proc)
    except TimeoutError:
        pass
    worker.kill()  # the processes it started (and itself, if it did not exit)
    await _reap(worker.proc)
    # Its output read to the end (what it printed last; the processes it started held it
    # open until the kill): with the pipe still open, the event loop closed first (run-
    # function) and the transport's cleanup then printed "Event loop is closed".
    if worker.output is not None:
        await asyncio.wait({worker.output}, timeout=1)
    for task in worker.tasks:
        task.cancel()
    await asyncio.gather(*worker.tasks, return_exceptions=True)


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
        self._output = _output_throttle()  # lines of stray output, for all its workers

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
            await asyncio.gather(*(_stop(worker) for worker in workers))
        finally:  # cut short (a second Ctrl-C): leave no worker behind
            for worker in workers:
                worker.kill()

    async def call(self, events: list, *, batch: bool, stages: list[str]) -> dict:
        """Run one invocation; raises TimeoutError or WorkerFailed (both retryable).

        An invocation caught in the crash of a worker it shared with others runs once more,
        alone, on a quarantine worker: the crash was most likely another's and should not cost
        this event an attempt, while the one that crashed it crashes the quarantine too.
        """
        try:
            return await self._call_on(await self._pick(), events, batch, stages)
        except WorkerFailed as exc:
            if not exc.shared:
                raise
        return await self.call_alone(events, batch=batch, stages=stages)

    async def call_alone(
        self, events: list, *, batch: bool, stages: list[str], start_by: float | None = None
    ) -> dict:
        """Run one invocation alone, on the quarantine worker: what crashes it crashes no
        other invocation (for a re-run after a crash). One at a time: a crash there is that
        call's own. Raises NotStarted if it cannot start by `start_by` (time.monotonic())
        for the others waiting there."""
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
        try:
            return await self._call_on(worker, events, batch, stages)
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

    async def _call_on(self, worker: Worker, events: list, batch: bool, stages: list[str]) -> dict:
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
            async with asyncio.timeout(call_timeout_s(self.spec.timeout_s, stages)):
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
                raise CallTimedOut(None) from None
            if state == "healthy":
                # A slow invocation, cancelled; the worker is fine and answers for it with
                # what it printed and requested so far.
                try:
                    async with asyncio.timeout(_PING_GRACE_S):
                        late = await asyncio.shield(future)
                except (TimeoutError, WorkerFailed):
                    late = None
                raise CallTimedOut(late) from None
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
            raise CallTimedOut(None) from None  # blocked: it could not answer for the call
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
        """Cancel the invocation, then ping: "healthy", or "blocked" (its loop cannot answer,
        or it runs the invocation on a thread that cannot be interrupted), or "exiting" (it
        died meanwhile, or said it exits after a reply: not blocked, which it was logged as)."""
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
        return "blocked" if reply.get("stuck") else "healthy"

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
