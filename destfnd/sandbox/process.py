"""One worker process, seen from the daemon: spawn it (a fresh interpreter, never a fork of
the daemon) and load the function in it, read its replies and its stray output, tell why it
exited, stop it with what it started. The pool (pool.py) decides what runs where."""

from __future__ import annotations

import asyncio
import base64
import functools
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

# A worker whose pipe to the daemon closed has this long to exit (as at a stop), then is killed.
_EXIT_AFTER_EOF_S = 2.0
_RAN_ON = (
    f"closed its pipe to the daemon but did not exit within {_EXIT_AFTER_EOF_S:g}s (a "
    "thread the function started kept it running?), and was killed"
)
_START_TIMEOUT_S = 30.0  # importing a user's function (and its packages) may take a while
_OUTPUT_LINE_CHARS = 1000  # of stray worker output (not print(): that goes to the attempt)
# Lines of it logged per destination (its workers together): so many at once, then so many a
# second (and a count of the rest).
OUTPUT_LINES_BURST = 200
OUTPUT_LINES_PER_S = 20.0
# And read at most so many bytes of it, then so many a second: beyond, the worker's writes
# wait for the pipe (a thread printing in a loop kept the daemon reading at 50-97% of a core:
# now 1% for 64 KiB writes, about 7% for short lines, each read then taking a few).
OUTPUT_BYTES_BURST = 16 << 20
OUTPUT_BYTES_PER_S = 1 << 20


class WorkerFailed(Exception):
    """The worker died or was killed while the invocation ran. `shared`: other invocations
    were running in the same worker, so this one may only have been caught in the crash;
    `out_of_memory`: it exited for want of memory (memory_limit)."""

    def __init__(self, message: str, shared: bool = False, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.shared = shared
        self.out_of_memory = out_of_memory


class InitError(Exception):
    """The function could not be loaded in a worker; the message is for the user. `stage` is
    the file that failed ("insert" or "function"), when known; `transient`: it may load the
    next time (it ran out of time, rather than failed)."""

    def __init__(self, message: str, stage: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        self.transient = transient


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
    said_exit_code: object = None  # the code a reply said it would exit with, after it

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
    output: OutputLimits | None = None,  # of its stray output: the pool's, shared
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
    except BaseException:  # (cancelled too: a quarantine re-run's time ran out) no fd left
        os.close(to_child_w)
        os.close(from_child_r)
        raise
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
        if reply is None:  # its pipe closed: it is ending on its own (os._exit, a crash)
            try:
                async with asyncio.timeout(1):
                    await _exited(proc)
            except TimeoutError:
                pass
        gone = proc.returncode  # before the kill: how it ended, if it ended on its own
        worker.kill()
        await _reap(proc)  # reaped while the loop runs
        try:
            async with asyncio.timeout(2):  # what it printed (all of it is in the pipe by now)
                output = (await proc.stdout.read(64_000)).decode(errors="replace").strip()
        except TimeoutError:
            output = ""
        if reply is not None and reply.get("t") == "init_error":
            raise InitError(reply["message"], reply.get("stage"))
        files = " and ".join(str(p) for p in (spec.insert, spec.function) if p)
        how = _exit_reason(gone) if gone is not None else "exited"
        said = output[-500:] or "no output"
        raise InitError(f"the worker process {how} while loading {files}: {said}")
    worker.ready = reply
    worker.on_exit = on_exit
    output = asyncio.create_task(
        _read_output(worker, spec.name, redact, output or OutputLimits()),
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
                worker.said_exit_code = message.get("exit_code")
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
        ran_on = False
        try:
            try:
                # Its loop has ended: it exits, unless a thread the function started (not a
                # daemon thread) keeps the process alive, answering nothing: not waited for.
                async with asyncio.timeout(_EXIT_AFTER_EOF_S):
                    code = await _exited(worker.proc)
            except TimeoutError:
                ran_on = True
                worker.kill()
                code = await _exited(worker.proc)
        finally:  # also when cancelled while waiting (an event loop shutting down)
            worker.kill()  # what it started and left running
        # (A stuck thread's exit only when the worker said so: a handler may os._exit(75).)
        stuck = code == protocol.STUCK_EXIT and worker.said_exit_code == code
        reason = _RAN_ON if ran_on else _exit_reason(code, stuck)
        calls = [f for f in worker.inflight.values() if not f.done()]
        # After an out-of-memory exit the culprit nearly always has its answer: the rest are
        # victims (a call too big to read has none: it runs again in quarantine, and fails).
        # After a stuck one's, always.
        memory = code == protocol.OUT_OF_MEMORY_EXIT
        shared = len(calls) > 1 or memory or stuck
        for future in calls:
            future.set_exception(WorkerFailed(f"the worker process {reason}", shared, memory))
        for future in worker.pings.values():
            if not future.done():
                future.set_exception(WorkerFailed(f"the worker process {reason}"))
        if worker.on_exit is not None:
            worker.on_exit(worker, f"the worker process {reason}")


@dataclass
class OutputLimits:
    """How much of its workers' stray output a pool logs and reads: shared by its workers, so
    that one replaced (a worker that floods and crashes) gets no burst of its own."""

    # A thread writing in a loop made a million lines in 8 s, the daemon's CPU all theirs.
    lines: Throttle = field(
        default_factory=lambda: Throttle(per_s=OUTPUT_LINES_PER_S, burst=OUTPUT_LINES_BURST)
    )
    _allowance: float = OUTPUT_BYTES_BURST  # bytes that may be read at once
    _at: float = field(default_factory=time.monotonic)

    def read(self, size: int) -> float:
        """`size` bytes read: the seconds to wait before reading more (a token bucket of
        OUTPUT_BYTES_BURST, refilled at OUTPUT_BYTES_PER_S; a wait is taken out of the next
        refill)."""
        now = time.monotonic()
        refilled = self._allowance + (now - self._at) * OUTPUT_BYTES_PER_S
        self._allowance, self._at = min(OUTPUT_BYTES_BURST, refilled) - size, now
        return max(0.0, -self._allowance / OUTPUT_BYTES_PER_S)


async def _read_output(
    worker: Worker, name: str, redact: Callable[[str], str], limits: OutputLimits
) -> None:
    """What the worker writes outside an invocation's captured output (a thread's prints, a
    subprocess, C code), a log line each, secrets redacted, at most at `limits.lines`'
    rate; read in chunks, so a line of any length is taken (its first _OUTPUT_LINE_CHARS
    logged). A flood is read at `limits`' rate of bytes: the worker's writes wait
    meanwhile. (`limits` are the pool's: a worker replaced gets no burst of its own.)"""
    throttle = limits.lines

    def emit(line: bytes) -> None:
        more = throttle.fields()
        if more is None:
            return
        text = line[: _OUTPUT_LINE_CHARS * 4].decode(errors="replace").rstrip()
        log.info("worker_output", destination=name, pid=worker.pid,
                 line=redact(text)[:_OUTPUT_LINE_CHARS], **more)  # fmt: skip

    try:
        await _read_lines(worker, emit, limits)
    finally:  # (also when cancelled: a stop that could not wait)
        if throttle.held:
            log.info("worker_output", destination=name, pid=worker.pid, line="",
                     not_logged=throttle.held)  # fmt: skip
            throttle.held = 0


async def _read_lines(worker: Worker, emit: Callable, limits: OutputLimits) -> None:
    assert worker.proc.stdout is not None
    throttle = limits.lines
    pending = b""
    skipping = False  # the rest of a line whose start was logged
    while chunk := await worker.proc.stdout.read(65536):
        if wait_s := limits.read(len(chunk)):
            await asyncio.sleep(wait_s)
        data = pending + chunk
        # Only the lines the throttle lets through now are split off; the rest of the chunk's
        # are counted. Splitting every line of a flood took most of the daemon's CPU: ingest
        # answered 10-30 times slower while a function's thread wrote short lines in a loop.
        room = throttle.room()
        *lines, rest = data.split(b"\n", room) if room else (data,)
        for line in lines:
            if not skipping:
                emit(line)
            skipping = False
        end = rest.rfind(b"\n")
        pending = rest[end + 1 :]
        if end >= 0:
            held = rest.count(b"\n", 0, end + 1)
            throttle.held += held - (1 if skipping else 0)  # a logged line's end: no line
            skipping = False
        if len(pending) > 65536:  # a line without an end yet: its start now, the rest dropped
            if not skipping:
                emit(pending)
            pending, skipping = b"", True
    if pending and not skipping:
        emit(pending)


def _exit_reason(code: int | None, stuck: bool = False) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == protocol.OUT_OF_MEMORY_EXIT:
        return "ran out of memory (memory_limit) and exited"
    if stuck:
        return "exited: a plain def handler still ran past its timeout on a thread"
    return f"exited with code {code}"


async def stop(worker: Worker) -> None:
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
