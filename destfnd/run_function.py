"""`destfnd run-function`: the editor's Run button. Runs a function file once, in a worker
process as the daemon would, and prints the outcome, logs, requests and (insert) the event."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import orjson

from destfnd import spec as segment_spec
from destfnd.config import (
    ENRICH_ALLOWANCE_BYTES,
    RetryPolicy,
    ServerConfig,
    env_names,
    secrets_in,
)
from destfnd.errors import DestfndError
from destfnd.logs import printable
from destfnd.outcome import MAX_RETRY_AFTER_S, ErrorType, clip_error
from destfnd.redact import Redactor, redact_tree
from destfnd.sandbox.pool import CallTimedOut, Pool
from destfnd.sandbox.process import InitError, Spec, WorkerFailed

_DEFAULT_MAX_AGE_S = RetryPolicy().max_age_s
_EVENT_LIMIT = ServerConfig()  # ingest's default limits
_STATUS = {"ok": "delivered", "retry": "retrying", "discard": "discarded", "drop": "dropped"}


class RunError(DestfndError):
    """The function could not be run (bad file, event or settings)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    ok: bool  # every event delivered, passed on (insert) or dropped on purpose
    report: dict  # what --json prints


def read_events(source: str | None, stdin_is_tty: bool) -> tuple[list[dict], bool]:
    """The events to run on and whether it is a batch (a JSON array)."""
    if source is None:
        if stdin_is_tty:
            raise RunError("give the event with --event FILE (or --event - to read stdin)")
        source = "-"
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise RunError(f"{source}: cannot read the event: {exc.strerror}") from None
    name = "stdin" if source == "-" else source
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RunError(f"{name}: not JSON: {exc}") from None
    batch = isinstance(data, list)
    events = data if batch else [data]
    if not events:
        raise RunError(f"{name}: an empty array has no event to run on")
    for index, event in enumerate(events):
        where = f"{name}[{index}]" if batch else name
        if not isinstance(event, dict):
            raise RunError(f"{where}: an event must be a JSON object")
        kind = event.get("type")
        if not isinstance(kind, str):
            if isinstance(event.get("batch"), list):
                raise RunError(f"{where}: a /v1/batch body: give its \"batch\" array (a JSON "
                               "array runs as a batch, as with [destinations.batch])")  # fmt: skip
            raise RunError(f'{where}: the event needs a "type" (track, identify, page, ...)')
        if kind not in segment_spec.EVENT_TYPES:  # no handler could take it
            types = ", ".join(segment_spec.EVENT_TYPES)
            raise RunError(f"{where}: type {kind!r} is none of Segment's ({types})")
    return events, batch


class Settings(NamedTuple):
    values: dict  # as the function gets them
    secrets: list[str]  # the secret values read, to be redacted
    hidden_env: tuple[str, ...]  # the variables read from, kept from the worker (as serve)


def parse_settings(text: str | None) -> Settings:
    """The settings of `--settings`, with `{"env": "NAME"}` and `{"file": "PATH"}` values
    read as the config reads secrets (so a key need not be typed on the command line)."""
    if not text:
        return Settings({}, [], ())
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RunError(f"--settings: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise RunError('--settings: must be a JSON object, e.g. \'{"apiKey": "..."}\'')
    from destfnd.config_reader import Reader
    from destfnd.function_destination import plain_settings

    try:
        here = Path.cwd()  # where a {"file": ...} setting is found from
    except OSError as exc:  # it was said to be "cannot write the output"
        raise RunError(
            f"--settings: the current folder cannot be found ({exc.strerror}): it was deleted?"
            " cd to one that exists"
        ) from None
    reader = Reader(here, os.environ)
    settings = reader.settings(raw, "--settings")
    if reader.problems:
        raise RunError("; ".join(reader.problems))
    secrets = secrets_in(settings)
    values = [s.value for s in secrets]
    return Settings(plain_settings(settings), values, env_names(secrets))  # type: ignore[arg-type]


def check_file(file: Path) -> None:
    """The function file is there: said before the event is read (from stdin, by default)."""
    if not file.is_file():
        raise RunError(f"{file}: {'not a file' if file.exists() else 'file not found'}")


async def run(
    file: Path, events: list[dict], batch: bool, settings: dict, *, insert: bool,
    timeout_s: float, memory_limit_bytes: int, secrets: list[str] | None = None,
    hidden_env: tuple[str, ...] = (),
) -> RunResult:  # fmt: skip
    check_file(file)
    written: list[bytes] = []  # each event as the worker gets it
    for index, event in enumerate(events):
        try:
            data = orjson.dumps(event)  # what goes to the worker: orjson writes 254 levels
        except TypeError:
            where = f"event [{index}]" if batch else "the event"
            raise RunError(f"{where} is nested more than 254 levels deep") from None
        written.append(data)
        try:  # a copy: check turns numeric ids into strings, as ingest does
            checked = orjson.loads(data)
            path = f"[{index}]." if batch else ""
            times = segment_spec.check(checked, path)
            # As ingest would pass it on: messageId filled, receivedAt set, timestamp
            # corrected (which can fail too: a clock skew out of range).
            events[index] = segment_spec.enrich(checked, datetime.now(UTC), times=times, path=path)
        except segment_spec.SpecError as exc:
            print(f"warning: ingest would refuse this event: {exc}", file=sys.stderr)
            continue
        written[index] = orjson.dumps(events[index])
        size = len(written[index])
        if size > _EVENT_LIMIT.max_event_bytes + ENRICH_ALLOWANCE_BYTES:  # as ingest's 413
            where = f"event [{index}]" if batch else "the event"
            print(
                f"warning: ingest would refuse this event: {where} is {size} bytes with "
                f"destfnd's fields; at most {_EVENT_LIMIT.max_event_bytes} + "
                f"{ENRICH_ALLOWANCE_BYTES} by default (server.max_event_size)",
                file=sys.stderr,
            )
    spec = Spec(
        hidden_env=hidden_env,
        name=file.name,
        function=None if insert else file.resolve(),
        insert=file.resolve() if insert else None,
        settings=settings,
        secrets=tuple(secrets or ()),
        timeout_s=timeout_s,
        memory_limit_bytes=memory_limit_bytes,
    )
    # The secrets --settings read, and the function's secret settings once it has said which.
    redact = Redactor(secrets or ())
    pool = Pool(spec, redact=redact)
    try:
        ready = await pool.start()
    except InitError as exc:
        raise RunError(str(exc)) from None
    try:
        for warning in ready.get("settings_warnings", []):
            print(f"warning: --{warning}", file=sys.stderr)
        for misses in (ready.get("near_misses") or {}).values():  # as check-config warns
            for miss in misses:
                print(f"warning: {file}: {miss}", file=sys.stderr)
        problems = ready.get("settings_problems", [])
        if ready.get("declaration_problems"):  # the file's SETTINGS, not --settings: unusable
            raise RunError("; ".join(ready["declaration_problems"]))
        redact.add_settings(ready.get("secret_settings", []), settings)
        try:
            if problems:  # Segment's editor runs nothing and says Invalid Settings
                message = "; ".join(f"--{p}" for p in problems)
                invalid = {"kind": "discard", "error_type": ErrorType.INVALID_SETTINGS.value,
                           "message": message}  # fmt: skip
                reply = {"outcomes": [invalid] * len(events)}
            else:
                stages = ["insert" if insert else "function"]
                # As the daemon sends them: as JSON already written, so that the call's frame
                # adds no levels to an event as deep as ingest takes (a traceback, else).
                sent = [orjson.Fragment(data) for data in written]
                reply = await pool.call(sent, batch=batch, stages=stages)
        except CallTimedOut as exc:
            message = f"did not finish within {timeout_s:g}s"
            late = exc.reply or {}  # what it printed and requested until then
            reply = {"outcomes": [{"kind": "retry", "error_type": "Timeout", "message": message}]
                     * len(events), "logs": late.get("logs") or "",
                     "requests": late.get("requests") or []}  # fmt: skip
        except WorkerFailed as exc:
            reply = {"outcomes": [{"kind": "retry", "error_type": "Retry", "message": str(exc)}]
                     * len(events)}  # fmt: skip
    finally:
        await pool.close()
    version = ready.get("versions", {}).get("insert" if insert else "function")
    report = {
        "version": version,
        "outcomes": [
            {"status": _STATUS[o["kind"]], "error_type": o.get("error_type"),
             # As serve stores and shows it: an exception can hold megabytes.
             "message": clip_error(redact(o["message"])) if o.get("message") else None,
             "retry_after_s": o.get("retry_after_s")}
            for o in reply["outcomes"]
        ],
        "logs": redact(reply.get("logs") or ""),
        "requests": redact_tree(redact, reply.get("requests") or []),
        "requests_made": reply.get("request_count", len(reply.get("requests") or [])),
    }  # fmt: skip
    if insert:
        out = reply.get("events") or [None] * len(events)
        report["events"] = redact_tree(redact, out)
    ok = all(o["kind"] in ("ok", "drop") for o in reply["outcomes"])
    return RunResult(ok, report)


def request_lines(req: dict, indent: str) -> list[str]:
    """One recorded outgoing request as the commands print it (run-function, deliveries)."""
    answer = printable(req.get("status", req.get("error", "?")))
    method, url = printable(req.get("method", "?")), printable(req.get("url", "?"))
    lines = [f"{indent}{method} {url} -> {answer} ({printable(req.get('duration_ms'))} ms)"]
    if req.get("redirected_to"):
        lines.append(f"{indent}  redirected to: {printable(req['redirected_to'])}")
    for key in ("request_body", "response_body"):
        if req.get(key):
            lines.append(f"{indent}  {key.replace('_', ' ')}: {printable(req[key])}")
    if req.get("response_body_error"):  # the status stands; its body did not come whole
        lines.append(f"{indent}  response body: {printable(req['response_body_error'])}")
    return lines


def _wait_text(seconds: float) -> str:
    """`90` -> "1m 30s", `99999` -> "1d 3h 46m 39s"; "years" for what a date far ahead asks."""
    if seconds >= MAX_RETRY_AFTER_S:
        return "years"
    if seconds < 59.5:
        return f"{round(seconds, 3) + 0.0:g}s"  # (+ 0.0: no "-0s")
    parts, left = [], round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


def render(result: RunResult, batch: bool, insert: bool) -> str:
    r = result.report
    lines = []
    for index, o in enumerate(r["outcomes"]):
        prefix = f"[{index}] " if batch else ""
        status = "passed on" if insert and o["status"] == "delivered" else o["status"]
        text = f"{prefix}outcome: {status}"
        if o["error_type"]:
            text += f" ({o['error_type']}): {printable(o['message'])}"
        elif o["message"]:
            text += f": {printable(o['message'])}"
        after = o.get("retry_after_s")
        if after is not None:
            text += f" (asks to wait {_wait_text(after)}"
            if round(after) >= _DEFAULT_MAX_AGE_S:  # serve's decide_retry expires it
                text += ": past the default max_age of 4h, serve would expire the delivery"
            text += ")"
        lines.append(text)
    lines.append(f"version: {r['version']}")
    lines.append("logs:" + ("" if r["logs"] else " (none)"))
    lines += [f"  {printable(line)}" for line in r["logs"].rstrip("\n").splitlines()]
    made, recorded = r["requests_made"], len(r["requests"])
    if made > recorded:
        lines.append(f"requests: {made}, the first {recorded} recorded")
    else:
        lines.append(f"requests: {recorded or '(none)'}")
    for req in r["requests"]:
        lines += request_lines(req, "  ")
    if insert:
        for index, event in enumerate(r["events"]):
            prefix = f"[{index}] " if batch else ""
            if event is not None:
                pretty = orjson.dumps(event, option=orjson.OPT_INDENT_2).decode()
                lines.append(f"{prefix}event:\n{pretty}")
    return "\n".join(lines)
