"""A destination whose code is the user's: a destination function, an insert function in
front of a function or a built-in destination, run in the sandbox's worker processes.

Turns worker replies into Reports; never runs user code itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import orjson
import structlog

from destfnd.config import (
    DestinationConfig,
    Secret,
    secrets_in,
)
from destfnd.dispatch import Deliverer, delivery_bound_s
from destfnd.errors import DestfndError
from destfnd.functions import record
from destfnd.outcome import (
    DELIVERED,
    ErrorType,
    Kind,
    Outcome,
    Report,
    retry,
)
from destfnd.redact import Redactor
from destfnd.sandbox.pool import CallTimedOut, NotStarted, Pool
from destfnd.sandbox.process import InitError, Spec, WorkerFailed
from destfnd.spec import EVENT_TYPES

log = structlog.get_logger("destfnd.functions")

# Calls a batch's split may make in one attempt (a batch of 500 too big for memory_limit by
# 8 times, split down to parts that fit: 14).
MAX_SPLIT_CALLS = 16


class FunctionLoadError(DestfndError):
    """A function file cannot be loaded, or its settings do not satisfy its SETTINGS: each
    problem with its dotted key path, as check-config lists them. `transient`: the function
    ran out of time loading, and may load the next time."""

    def __init__(self, problems: list[str], transient: bool = False) -> None:
        self.problems = problems
        self.transient = transient
        super().__init__("\n".join(problems))


def load_problem(exc: InitError, dest: DestinationConfig, where: str, redact: Redactor) -> str:
    """Why a destination's workers did not start, under the key of the file at fault."""
    insert = exc.stage == "insert" or dest.kind != "function"
    return f"{where}.{'insert_function' if insert else 'function'}: {redact(str(exc))}"


def plain_settings(value: object) -> object:
    """Settings as the function sees them: secrets resolved to their values."""
    if isinstance(value, Secret):
        return value.value
    if isinstance(value, dict):
        return {k: plain_settings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_settings(v) for v in value]
    return value


def spec_for(dest: DestinationConfig, hidden_env: tuple[str, ...] = ()) -> Spec:
    function = dest.function if dest.kind == "function" else None
    return Spec(
        hidden_env=hidden_env,
        name=dest.name,
        function=function,
        insert=dest.insert_function,
        settings=plain_settings(dest.settings),  # type: ignore[arg-type]
        secrets=tuple(secret.value for secret in secrets_in(dest.settings)),
        timeout_s=dest.timeout_s,
        memory_limit_bytes=dest.memory_limit_bytes,
        threads=dest.concurrency,
    )


def problems_of(ready: dict, where: str) -> list[str]:
    return [f"{where}.{p}" for p in ready.get("settings_problems", [])]


def _outcome(o: dict) -> Outcome:
    try:  # what a worker sends is checked: user code runs in that process
        if o["kind"] == "ok":
            return DELIVERED  # the common case, shared: a batch of 100 makes no 100 objects
        kind = Kind(o["kind"])
        error_type = ErrorType(o["error_type"]) if o.get("error_type") else None
        message = o.get("message")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"message {message!r}")
    except (KeyError, TypeError, ValueError) as exc:
        return retry(ErrorType.RETRY, f"the worker sent an outcome destfnd cannot read: {exc}")
    # retry_after_s as sent: decide_retry takes only a number of seconds from it.
    return Outcome(kind, error_type, message, o.get("retry_after_s"))


class FunctionDestination:
    """Deliverer for `function` destinations and for any destination with an insert function
    (then `downstream` is the built-in deliverer the surviving events go to)."""

    def __init__(
        self,
        dest: DestinationConfig,
        redactor: Redactor,
        downstream: Deliverer | None = None,
        *,
        where: str = "destination",
        hidden_env: tuple[str, ...] = (),
    ) -> None:
        self.dest = dest
        self.pool = Pool(spec_for(dest, hidden_env), size=dest.workers, redact=redactor)
        self._redactor = redactor
        self._downstream = downstream
        self._where = where
        self._stages = (["insert"] if dest.insert_function else []) + (
            ["function"] if dest.kind == "function" else []
        )
        self.version: str | None = None
        # What a delivery can take (the dispatcher's guard allows for it, and GUARD_SLACK_S), in
        # `timeout`s: a call (one for each function in it); its re-run alone after a crash
        # it shared, which may wait for the culprit's own re-run first (each with the 2 s a
        # timeout's ending may take; a split's calls start within the first timeout); then
        # the built-in destination's own request behind an insert function.
        self.timeouts = 3 * len(self._stages) + (downstream is not None)

    async def start(self) -> None:
        """Start the workers, then the built-in destination behind an insert function. If any
        of it fails or is cancelled (a stop while starting), the workers are closed: left
        running, they kept the daemon from exiting."""
        try:
            await self._start()
        except BaseException:
            await self.pool.close()
            raise

    async def _start(self) -> None:
        try:
            ready = await self.pool.start()
        except InitError as exc:
            problem = load_problem(exc, self.dest, self._where, self._redactor)
            raise FunctionLoadError([problem], transient=exc.transient) from None
        settings = plain_settings(self.dest.settings)
        self._redactor.add_settings(ready.get("secret_settings", []), settings)  # type: ignore[arg-type]
        for warning in warnings_of(ready, self.dest, self._where):  # as check-config prints
            # The text comes from the worker, which runs user code: redacted like its output.
            log.warning(
                "destination_warning", destination=self.dest.name, warning=self._redactor(warning)
            )
        problems = problems_of(ready, self._where)
        if problems:  # redacted as check-config redacts them: the text comes from the worker
            raise FunctionLoadError([self._redactor(p) for p in problems])
        versions = ready.get("versions", {})
        self.version = ",".join(f"{k}:{v}" for k, v in sorted(versions.items())) or None
        if self._downstream is not None:
            await self._downstream.start()

    async def close(self) -> None:
        try:
            await self.pool.close()
        finally:
            if self._downstream is not None:
                await self._downstream.close()

    async def deliver(self, payloads: list[bytes], batched: bool) -> Report:
        run = await self._run([orjson.Fragment(p) for p in payloads], batched)
        outcomes, logs, requests = run.outcomes, run.logs, run.requests
        if self._downstream is None:
            return Report(tuple(outcomes), logs, requests, self.version)
        # Insert function in front of a built-in destination: send on what it passed.
        passed = [i for i, o in enumerate(outcomes) if o.kind is Kind.OK]
        pause_s = None
        if passed:
            down = await self._downstream.deliver(
                [orjson.dumps(run.events[i]) for i in passed], batched
            )
            for i, outcome in zip(passed, down.outcomes, strict=True):
                outcomes[i] = outcome
            requests += down.requests
            pause_s = down.pause_s  # the webhook's server asked the destination to wait
        return Report(tuple(outcomes), logs, requests, self.version, pause_s)

    async def _run(self, events: list, batched: bool) -> _Run:
        """One invocation; a batch that crashes its worker, or runs out of memory, is split
        (`_split`)."""
        started = time.monotonic()
        # A call caught in another's crash runs again alone, ending before the dispatcher's
        # guard ends the attempt, and before the built-in destination's own request after
        # it (the guard cut it short as a Timeout, also one that never started).
        rerun_until = started + delivery_bound_s(self.dest.timeout_s, self) - 0.5
        if self._downstream is not None:
            rerun_until -= self.dest.timeout_s
        run = await self._call(events, batched, rerun_until=rerun_until)
        assert run is not None  # (only a call with start_by may not start)
        if run.crashed and len(events) > 1:
            # Calls start within the attempt's first `timeout`, so that each, and the
            # attempt, ends inside the dispatcher's guard (`timeouts`, and GUARD_SLACK_S).
            split = _Split(deadline=started + self.dest.timeout_s, calls=MAX_SPLIT_CALLS)
            return await self._split(events, run, split, memory=run.crashed == "memory")
        return run

    async def _split(self, events: list, run: _Run, split: _Split, memory: bool) -> _Run:
        """A batch whose worker died (a segfault, `os._exit`, the kernel's OOM killer) or
        that ran out of memory (`run`) runs again in halves, and a half that fails so again
        in halves, each alone on the quarantine worker (the one that crashes it crashes no
        other batch): the event that crashes the worker fails alone and the rest are
        delivered, and a batch too big for memory_limit goes in parts that fit. Unsplit, its
        batch-mates failed with it and were batched with it again at every retry until all
        expired.

        When both halves crash too, not for memory, the function crashes on nearly anything:
        they fail as they are (split down to single events, a batch of 100 would restart a
        worker 199 times). Unless the batch, or a part of it, ran out of memory: its parts
        are still near the limit, where a worker also dies in other ways (libuv aborts when
        an allocation fails), and are split on. Either way within `split`'s calls and time;
        what is left then keeps the outcome it had."""
        half = len(events) // 2
        parts = (events[:half], events[half:])
        runs = run.halves(half)
        for i, part in enumerate(parts):
            if split.allows():
                runs[i] = await self._call(part, True, start_by=split.deadline) or runs[i]
        memory = memory or any(r.crashed == "memory" for r in runs)
        if memory or not all(r.crashed for r in runs):
            runs = [
                await self._split(part, r, split, memory) if r.crashed and len(part) > 1 else r
                for part, r in zip(parts, runs, strict=True)
            ]
        # The call that failed first: what it printed and requested before it did.
        return _Run.join([_Run([], run.logs, run.requests, []), *runs])

    async def _call(
        self,
        events: list,
        batched: bool,
        start_by: float | None = None,
        rerun_until: float | None = None,
    ) -> _Run | None:
        """One call on the pool's workers (run again alone if caught in another's crash,
        ending by `rerun_until`); with `start_by`, alone on its quarantine worker if it can
        start by then (None if it cannot)."""
        n = len(events)
        try:
            if start_by is None:
                reply = await self.pool.call(
                    events, batch=batched, stages=self._stages, rerun_until=rerun_until
                )
            else:
                reply = await self.pool.call_alone(
                    events, batch=batched, stages=self._stages, start_by=start_by
                )
        except NotStarted:
            return None
        except CallTimedOut as exc:
            limit = self.dest.timeout_s
            within = f"within {limit:g}s"
            if self._stages == ["insert", "function"]:  # twice timeout, for the two together
                within = f"within {2 * limit:g}s (twice timeout)"
            if exc.cut_to_s is not None:  # a re-run, with what was left of the attempt
                left = math.floor(exc.cut_to_s * 10) / 10  # (0.96 of 1 s: not "1.0")
                within = (f"within the {left:.1f}s left of the attempt (run again "
                          "alone after its worker crashed or was blocked)")  # fmt: skip
            message = f"the function did not finish {within}"
            if self._stages == ["insert"]:  # in front of a webhook or a file
                message = f"the insert function did not finish {within}"
            if self._stages == ["insert", "function"]:
                message = f"the insert function and the function together did not finish {within}"
                running = (exc.reply or {}).get("stage")
                if running in ("insert", "function"):  # (the worker's word: checked)
                    which = "the insert function" if running == "insert" else "the function"
                    message += f"; {which} was still running"
            logs, requests = _record_of(exc.reply or {})  # what it printed and requested
            return _Run([retry(ErrorType.TIMEOUT, message)] * n, logs, requests, [None] * n)
        except WorkerFailed as exc:
            crashed = "memory" if exc.out_of_memory else "crash"
            return _Run([retry(ErrorType.RETRY, str(exc))] * n, "", (), [None] * n, crashed)
        logs, requests = _record_of(reply)
        found = reply.get("outcomes")
        events = reply.get("events")
        if "function" in self._stages:
            events = [None] * n  # (only an insert stage's reply has them)
        elif not isinstance(events, list) or len(events) != n:
            found = None  # what passed cannot be passed on
        if not isinstance(found, list) or len(found) != n:
            unreadable = retry(ErrorType.RETRY, "the worker sent a result destfnd cannot read")
            return _Run([unreadable] * n, logs, requests, [None] * n)
        outcomes = [_outcome(o) for o in found]
        if "function" not in self._stages:  # an insert stage's events go on downstream
            for i, outcome in enumerate(outcomes):
                if outcome.kind is Kind.OK and not isinstance(events[i], dict):
                    outcomes[i] = retry(ErrorType.RETRY, "the worker passed on no event to send")
        # Out of memory with nothing delivered (on_batch, or every event's handler): too big.
        memory = reply.get("out_of_memory") and all(o.kind is not Kind.OK for o in outcomes)
        return _Run(outcomes, logs, requests, events, "memory" if memory else None)


def _record_of(reply: dict) -> tuple[str, tuple[dict, ...]]:
    """The logs and recorded requests of a worker's reply, as far as they are what they
    should be: a worker runs user code, which can write to its pipe (a list for the logs
    failed every store write of the destination, and its deliveries stayed in flight)."""
    logs = reply.get("logs") or ""
    if not isinstance(logs, str):
        logs = "[the worker sent logs destfnd cannot read]\n"
    requests = reply.get("requests") or []
    if not isinstance(requests, list) or not all(map(_is_request, requests)):
        requests = []
        logs += "[the worker sent recorded requests destfnd cannot read]\n"
    requests = requests[: record.MAX_REQUESTS]
    count = reply.get("request_count", 0)
    if isinstance(count, int) and count > len(requests):
        logs += f"\n[{count - len(requests)} more requests not recorded]\n"
    return logs, tuple(requests)


def _is_request(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("method"), str)
        and isinstance(entry.get("url"), str)
    )


@dataclass(slots=True)
class _Run:
    """What one or more invocations for a unit of events came to: an outcome per event, the
    logs and requests recorded, the events as an insert function returned them (None where
    it returned none); `crashed`: why the call is worth running again in halves, if it is
    (the worker died: "crash"; it ran out of memory: "memory")."""

    outcomes: list[Outcome]
    logs: str
    requests: tuple[dict, ...]
    events: list
    crashed: str | None = None

    def halves(self, half: int) -> list[_Run]:
        """The run's outcomes for the two halves of its batch, as they stand until a half
        runs again (its record is not theirs: `_split` keeps it)."""
        return [
            _Run(self.outcomes[:half], "", (), self.events[:half], self.crashed),
            _Run(self.outcomes[half:], "", (), self.events[half:], self.crashed),
        ]

    @staticmethod
    def join(runs: list[_Run]) -> _Run:
        """One attempt's record of several calls, within the limits of one call's."""
        logs = "".join(run.logs for run in runs)
        requests, dropped = record.bounded([r for run in runs for r in run.requests])
        if dropped:
            logs += f"\n[{dropped} more requests not recorded]\n"
        if len(logs) > record.LOG_LIMIT:
            logs = logs[: record.LOG_LIMIT] + "\n[logs truncated]\n"
        return _Run(
            [o for run in runs for o in run.outcomes],
            logs,
            tuple(requests),
            [e for run in runs for e in run.events],
        )


@dataclass(slots=True)
class _Split:
    """What a batch's split may still take: calls, and time until `deadline`."""

    deadline: float  # time.monotonic()
    calls: int

    def allows(self) -> bool:
        if self.calls <= 0 or time.monotonic() >= self.deadline:
            return False
        self.calls -= 1
        return True


def warnings_of(ready: dict, dest: DestinationConfig, where: str) -> list[str]:
    """What a loaded destination's workers reported that is allowed but likely a mistake
    (dotted paths): settings its `SETTINGS` does not declare, handler names one letter off,
    handlers that will never run. `check-config` prints them; `serve` logs them."""
    warnings = [f"{where}.{w}" for w in ready.get("settings_warnings", [])]
    for stage, misses in (ready.get("near_misses") or {}).items():
        key = "insert_function" if stage == "insert" else "function"
        warnings.extend(f"{where}.{key}: {miss}" for miss in misses)
    if dest.insert_function is not None:
        have = set(ready.get("insert_handlers", []))
        missing = [f"on_{t}" for t in EVENT_TYPES if f"on_{t}" not in have]
        if "on_batch" in have and dest.batch is None:
            warnings.append(
                f"{where}.insert_function: on_batch runs only with [destinations.batch];"
                " without it each event goes to its own handler"
            )
        if missing and not ("on_batch" in have and dest.batch is not None):
            warnings.append(
                f"{where}.insert_function: no {', '.join(missing)}: events of those types "
                "will be discarded as Unsupported Event Type"
            )
    if dest.kind == "function":
        have = set(ready.get("handlers", []))
        if have == {"on_batch"} and dest.batch is None:
            warnings.append(
                f"{where}.function: it has only on_batch, which runs only with "
                "[destinations.batch]; without it every event will be discarded as "
                "Unsupported Event Type"
            )
        elif "on_batch" in have and dest.batch is None:
            # In Segment, defining onBatch is what turns batching on: a ported function
            # would quietly send one request per event.
            warnings.append(
                f"{where}.function: on_batch runs only with [destinations.batch] (in Segment,"
                " defining onBatch turns batching on); without it each event goes to its own"
                " handler"
            )
    return warnings
