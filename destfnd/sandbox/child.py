"""The worker process: `python -m destfnd.sandbox.child READ_FD WRITE_FD MEMORY_LIMIT`.

Serves many invocations at once on its own event loop, over the frame protocol on the two
inherited pipes. Its stdout/stderr are not the protocol: print() is captured per invocation.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import sys
import threading
from typing import Any

import orjson

from destfnd.functions import fetching as fetch_module
from destfnd.functions import record
from destfnd.redact import Redactor
from destfnd.sandbox import confine, protocol, returns, runtime, taxonomy
from destfnd.texts import sendable


class Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.function: Any = None
        self.insert: Any = None
        self.settings: dict = {}
        self.settings_json = b"{}"
        self.tasks: dict[int, asyncio.Task] = {}
        self.calls: dict[int, _CallState] = {}  # beside `tasks`: what their threads share
        self._gate_lock = threading.Lock()  # for every _CallState: threads take it too
        self.exit_after_reply: int | None = None  # the exit code, once the reply is sent
        self.stuck = False  # a timed-out plain `def` handler still runs on a thread
        self.timeout_s = 10.0  # the destination's `timeout`, from init

    def send(self, message: dict) -> None:
        self.writer.write(protocol.encode(message))

    async def serve(self) -> None:
        while True:
            try:
                message = await protocol.read_frame(self.reader)
            except MemoryError:  # a call too big to read within memory_limit (a large batch)
                os._exit(protocol.OUT_OF_MEMORY_EXIT)  # the daemon runs its batch again in halves
            if message is None:
                return  # the daemon closed the pipe: exit
            kind = message.get("t")
            if kind == "call":
                call_id = message["id"]
                self.calls[call_id] = _CallState()
                task = asyncio.create_task(self.call(message))
                self.tasks[call_id] = task
                task.add_done_callback(self._forget(call_id))
            elif kind == "cancel":
                self.cancel(message["id"])
            elif kind == "ping":
                self.send({"t": "pong", "id": message.get("id"), "stuck": self.stuck})
            elif kind == "init":
                self.init(message)
            await self.writer.drain()

    def init(self, message: dict) -> None:
        modules = []
        versions = {}
        stage = None
        try:
            fetch_module.DEFAULT_TIMEOUT_S = self.timeout_s = float(message.get("timeout_s") or 10)
            fetch_module.set_home_loop(asyncio.get_running_loop())
            for stage in ("insert", "function"):
                path = message.get(stage)
                if path:
                    code = message.get(f"{stage}_code")
                    source = base64.b64decode(code) if code is not None else None
                    module, versions[stage] = runtime.load_function(
                        path, f"destfnd_user_{stage}", source
                    )
                    setattr(self, stage, module)
                    modules.append((path, module))
        except runtime.LoadError as exc:
            self.send({"t": "init_error", "message": str(exc), "stage": stage})
            return
        self.settings = message.get("settings") or {}
        self.settings_json = orjson.dumps(self.settings)
        memory_limit = resource.getrlimit(resource.RLIMIT_AS)[0]  # memory_limit, if set
        unlimited = memory_limit == resource.RLIM_INFINITY
        runtime.set_threads(int(message.get("threads") or 8), 0 if unlimited else memory_limit)
        try:
            checked = runtime.check_settings(modules, self.settings)
            problems, secret_keys, warnings, declaring = checked
        except Exception as exc:  # a SETTINGS declaration no check foresaw
            why = f"SETTINGS cannot be checked: {type(exc).__name__}: {exc}"
            self.send({"t": "init_error", "message": why, "stage": stage})
            return
        record.redactor = Redactor(message.get("secrets") or ())
        record.redactor.add_settings(secret_keys, self.settings)
        self.send({
            "t": "ready",
            "pid": os.getpid(),
            "versions": versions,
            "handlers": _handlers(self.function),
            "insert_handlers": _handlers(self.insert),
            "near_misses": {stage: runtime.near_misses(m) for stage, m in
                            (("function", self.function), ("insert", self.insert)) if m},
            "settings_problems": problems,
            "declaration_problems": declaring,  # of them, the file's own
            "settings_warnings": warnings,
            "secret_settings": secret_keys,
        })  # fmt: skip

    def _forget(self, call_id: int) -> Any:
        def forget(_task: asyncio.Task) -> None:
            self.tasks.pop(call_id, None)
            self.calls.pop(call_id, None)  # (its threads keep their own reference)

        return forget

    def cancel(self, call_id: int) -> None:
        task, state = self.tasks.get(call_id), self.calls.get(call_id)
        if task is None or state is None:
            return
        with self._gate_lock:
            if state.on_thread:
                # A thread cannot be interrupted: the next pong says so; the daemon replaces us.
                self.stuck = True
            state.cancelled = True  # a handler that has yet to start on a thread: never runs
        task.cancel()

    async def call(self, message: dict) -> None:
        call_id = message["id"]
        rec = record.CallRecord()
        record.current.set(rec)
        stages = message.get("stages") or ["function"]
        events = message["events"]
        reply: dict[str, Any] = {"t": "result", "id": call_id}
        try:
            if message.get("batch"):
                outcomes, out_events = await self.run_batch(call_id, events, stages, rec)
            else:
                outcome, event = await self.run_one(call_id, events[0], stages, rec)
                outcomes, out_events = [outcome], [event]
        except asyncio.CancelledError:
            if rec.stage and not message.get("batch"):  # which of an insert function and
                reply["stage"] = rec.stage  # its function ran out of time (one event's call)
            outcomes = [{"kind": "retry", "error_type": "Timeout", "message": "cancelled"}]
            out_events = [None]
            outcomes *= len(events)
            out_events *= len(events)
        except Exception as exc:  # destfnd's own failure: answered, never left to time out
            message = f"the worker could not run the call: {type(exc).__name__}: {exc}"
            outcomes = [{"kind": "retry", "error_type": "Retry", "message": message}]
            out_events = [None]
            outcomes *= len(events)
            out_events *= len(events)
        for outcome in outcomes:  # an exception can hold megabytes, and secrets
            if isinstance(outcome.get("message"), str):  # (sendable first: it lengthens)
                outcome["message"] = record.clip_text(sendable(outcome["message"]))
        reply["outcomes"] = outcomes
        if "function" not in stages:
            reply["events"] = returns.as_written(out_events, reply["outcomes"])
        reply["logs"] = rec.text()
        reply["requests"] = rec.requests
        reply["request_count"] = rec.request_count
        if rec.out_of_memory:
            reply["out_of_memory"] = True
        if self.exit_after_reply is not None:
            reply["exiting"] = True
            reply["exit_code"] = self.exit_after_reply  # what it exits with, and why
        try:
            self.send(reply)
        except TypeError:  # what JSON cannot hold: a lone surrogate printed, a request's
            self.send(returns.without_unsendable(reply))  # header that is not text, ...
        await self.writer.drain()
        if self.exit_after_reply is not None:
            os._exit(self.exit_after_reply)  # the daemon replaces this worker

    def fresh_settings(self) -> dict:
        """The settings, a copy for each call: what one invocation changes in them (`settings
        ["url"] += "/v2"`) is not what the next one gets."""
        return orjson.loads(self.settings_json)

    def _gate(self, call_id: int) -> Any:
        """For `runtime.invoke`, on a handler's thread: whether the call may still run (not
        cancelled before its thread took it up), counted as on a thread until it returns.
        The state is the call's own object: still there when the call has been answered."""
        state = self.calls[call_id]

        def gate(entering: bool) -> bool:
            with self._gate_lock:
                if entering:
                    if state.cancelled:
                        return False
                    state.on_thread += 1
                else:
                    state.on_thread -= 1
                return True

        return gate

    async def run_one(self, call_id: int, event: Any, stages: list[str], rec) -> tuple[dict, Any]:
        if not returns.is_event(event):
            return taxonomy.outcome_of(ValueError("not a Segment event")), None
        name = f"on_{event['type']}"
        if "insert" in stages:
            handler = getattr(self.insert, name, None)
            if handler is None:
                return taxonomy.unsupported(f"the insert function has no {name} handler"), None
            message_id = event.get("messageId")  # before the handler may change the event
            rec.stage = "insert"
            try:
                result = await runtime.invoke(handler, event, self.fresh_settings(),
                                              gate=self._gate(call_id))  # fmt: skip
            except BaseException as exc:  # also SystemExit, KeyboardInterrupt...
                _reraise_cancel(exc)
                return returns.from_insert(self.failed(exc, rec), name), None
            if not returns.is_event(result):
                message = (
                    f"the insert function's {name} returned {returns.what(result)}, not an event: "
                    "return the event to pass it on, or raise DropEvent to drop it"
                )
                return taxonomy.bad_request(message), None
            event = returns.with_message_id(result, message_id)
            name = f"on_{event['type']}"  # its type may be another now
        if "function" not in stages:
            return taxonomy.ok(), event
        handler = getattr(self.function, name, None)
        if handler is None:
            return taxonomy.unsupported(f"the function has no {name} handler"), None
        rec.stage = "function"
        try:
            returned = await runtime.invoke(handler, event, self.fresh_settings(),
                                            gate=self._gate(call_id))  # fmt: skip
        except BaseException as exc:  # also SystemExit, KeyboardInterrupt...
            _reraise_cancel(exc)
            return self.failed(exc, rec), None
        if isinstance(returned, BaseException):  # as on_batch returns outcomes: a slip
            rec.log(
                f"destfnd: {name} returned {type(returned).__name__}(...) instead of raising "
                "it: a handler that returns has delivered the event\n"
            )
        return taxonomy.ok(), None

    async def run_batch(self, call_id: int, events: list, stages: list[str], rec):
        timed_out: list[bool] = []  # events that ran out of their share of the timeout
        try:
            return await self._run_batch(call_id, events, stages, rec, timed_out)
        finally:
            state = self.calls.get(call_id)
            with self._gate_lock:
                if timed_out and state is not None and state.on_thread:
                    # A plain `def` that ran out of its share still holds its thread: the
                    # worker exits after this reply and is replaced, as for a blocked call.
                    self.stuck = True
                    if self.exit_after_reply is None:  # (out of memory says more)
                        self.exit_after_reply = protocol.STUCK_EXIT

    async def _run_batch(
        self, call_id: int, events: list, stages: list[str], rec, timed_out: list[bool]
    ):
        outcomes: list[dict | None] = [None] * len(events)
        out_events: list[Any] = [None] * len(events)
        todo = list(range(len(events)))
        # Each event through its own handler gets a share of the call's time, as Segment
        # runs each alone: one that hangs times out alone, not its whole batch (which was
        # then retried together, the hanging one with it, until all expired). The call has a
        # `timeout` for each function in it (protocol.call_timeout_s): an insert handler
        # gets 0.9 of one, the function's handlers the rest but a tenth (for the reply).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + protocol.call_timeout_s(self.timeout_s, stages)
        deadline -= 0.1 * self.timeout_s
        if "insert" in stages:
            insert_batch = getattr(self.insert, "on_batch", None)
            until = loop.time() + 0.9 * self.timeout_s  # for each event's insert handler
            per_event = "function" in stages and getattr(self.function, "on_batch", None) is None
            if insert_batch is None and per_event:
                # Each event through its two handlers, one after the other, alone: its
                # function's handler starts once its own insert handler is done, not once
                # every event's is (a neighbour's slow one took this event's time).
                results = await asyncio.gather(*(
                    self._chain(call_id, events[i], (until, deadline), rec, timed_out)
                    for i in todo
                ))  # fmt: skip
                return [outcome for outcome, _ in results], out_events
            if insert_batch is not None:
                results = await self.run_insert_batch(call_id, insert_batch, events, rec)
            else:
                results = await asyncio.gather(*(
                    _within(self.run_one(call_id, events[i], ["insert"], rec), until, "insert",
                            timed_out)
                    for i in todo
                ))  # fmt: skip
            todo = []
            for i, (outcome, event) in enumerate(results):
                if outcome["kind"] == "ok":
                    out_events[i] = event
                    todo.append(i)
                else:
                    outcomes[i] = outcome
        if "function" not in stages:
            for i in todo:
                outcomes[i] = taxonomy.ok()
            return outcomes, out_events
        if not todo:  # the insert function passed none on: nothing is sent downstream
            return outcomes, out_events
        batch = [out_events[i] if "insert" in stages else events[i] for i in todo]
        on_batch = getattr(self.function, "on_batch", None)
        if on_batch is None:  # no on_batch: each event through its own handler
            results = await asyncio.gather(*(
                _within(self.run_one(call_id, e, ["function"], rec), deadline, "function",
                        timed_out)
                for e in batch
            ))  # fmt: skip
            for i, (outcome, _) in zip(todo, results, strict=True):
                outcomes[i] = outcome
            return outcomes, out_events
        n = len(batch)  # now: user code may empty the list it is given
        try:
            returned = await runtime.invoke(on_batch, batch, self.fresh_settings(),
                                            gate=self._gate(call_id))  # fmt: skip
        except BaseException as exc:  # also SystemExit, KeyboardInterrupt...
            _reraise_cancel(exc)
            failure = self.failed(exc, rec)
            for i in todo:
                outcomes[i] = failure
            return outcomes, out_events
        for i, outcome in zip(todo, returns.batch_outcomes(returned, n), strict=True):
            outcomes[i] = outcome
        return outcomes, out_events

    async def _chain(
        self, call_id: int, event: Any, ends: tuple[float, float], rec, timed_out: list[bool]
    ) -> tuple[dict, Any]:
        """One event of a batch through the insert function's handler, within `ends[0]`,
        then the function's, within `ends[1]` (loop times)."""
        insert = self.run_one(call_id, event, ["insert"], rec)
        outcome, passed = await _within(insert, ends[0], "insert", timed_out)
        if outcome["kind"] != "ok":
            return outcome, None
        return await _within(
            self.run_one(call_id, passed, ["function"], rec), ends[1], "function", timed_out
        )

    async def run_insert_batch(
        self, call_id: int, on_batch: Any, events: list, rec
    ) -> list[tuple[dict, Any]]:
        """The insert function's on_batch returns one item per event, in order (Segment pairs
        them by position): the event to pass on (changed or not), or an exception instance,
        DropEvent to drop it or an error for its outcome. Raising applies to every event."""
        n = len(events)
        message_ids = [e.get("messageId") for e in events]  # before the handler may change them
        try:
            returned = await runtime.invoke(on_batch, events, self.fresh_settings(),
                                            gate=self._gate(call_id))  # fmt: skip
        except BaseException as exc:  # also SystemExit, KeyboardInterrupt...
            _reraise_cancel(exc)
            return [(returns.from_insert(self.failed(exc, rec), "on_batch"), None)] * n
        return returns.insert_results(returned, message_ids)

    def failed(self, exc: BaseException, rec: record.CallRecord) -> dict:
        outcome = taxonomy.outcome_of(exc)
        if outcome.get("error_type") == "Bad Request":
            rec.log(runtime.user_traceback(exc))
        if isinstance(exc, MemoryError) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(MemoryError) is not None
        ):
            rec.out_of_memory = True
            self.exit_after_reply = protocol.OUT_OF_MEMORY_EXIT
        return outcome


class _CallState:
    """A call as its handlers' threads see it, under Worker._gate_lock."""

    __slots__ = ("cancelled", "on_thread")

    def __init__(self) -> None:
        self.cancelled = False
        self.on_thread = 0  # its plain `def` handlers running on a thread now


async def _within(run: Any, until: float, stage: str, timed_out: list[bool]) -> tuple[dict, Any]:
    """`run` (one event's `run_one`) unless it is still running at `until` (loop time): then
    that event alone times out (noted in `timed_out`)."""
    try:
        return await asyncio.wait_for(run, max(0.0, until - asyncio.get_running_loop().time()))
    except TimeoutError:
        timed_out.append(True)
        what = "the insert function" if stage == "insert" else "the function"
        message = f"{what} did not finish for this event within its share of the batch's timeout"
        return {"kind": "retry", "error_type": "Timeout", "message": message}, None


def _reraise_cancel(exc: BaseException) -> None:
    """A handler's exception of any kind is its outcome: KeyboardInterrupt, SystemExit or a
    class of its own derived from BaseException would otherwise end the call without a reply
    (reported as a timeout) or end the worker. CancelledError is not the handler's: it is how
    a timed-out invocation is stopped, so it goes on, unless nothing cancelled this call (the
    handler raised it, or let one of its own tasks' through): then it is the handler's."""
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
        raise exc


def _handlers(module: Any) -> list[str]:
    if module is None:
        return []
    return [h for h in runtime.HANDLER_NAMES if callable(getattr(module, h, None))]


async def _main(read_fd: int, write_fd: int) -> None:
    reader, writer = await protocol.open_pipes(read_fd, write_fd)
    worker = Worker(reader, writer)
    try:
        await worker.serve()
    finally:
        await fetch_module.close()


def main(argv: list[str]) -> None:
    read_fd, write_fd, memory_limit = int(argv[0]), int(argv[1]), int(argv[2])
    confine.setup(read_fd, write_fd, memory_limit, int(argv[3]) if len(argv) > 3 else -1)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(read_fd, write_fd))
    else:
        uvloop.run(_main(read_fd, write_fd))


if __name__ == "__main__":
    main(sys.argv[1:])
