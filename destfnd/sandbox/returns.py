"""What a handler's return value means, in the worker: on_batch's outcomes, the insert
function's events, and a reply made sendable. Pure: no I/O, no running of user code.
"""

from __future__ import annotations

from typing import Any

import orjson

from destfnd.sandbox import runtime, taxonomy
from destfnd.texts import sendable, sendable_tree


def batch_outcomes(returned: Any, n: int) -> list[dict]:
    """on_batch's return: None (all ok) or one outcome per event (None/"ok", an error, or
    Segment's `{"status": 500, "errormessage": "..."}`)."""
    if returned is None:
        return [taxonomy.ok()] * n
    if not isinstance(returned, list | tuple) or len(returned) != n:
        got = f"a list of {len(returned)}" if isinstance(returned, list | tuple) else (
            type(returned).__name__)  # fmt: skip
        message = f"on_batch returned {got}; return None or a list of {n} outcomes"
        return [taxonomy.bad_request(message)] * n
    outcomes = []
    for index, item in enumerate(returned):
        if item is None or item == "ok" or item is True:
            outcomes.append(taxonomy.ok())
        elif isinstance(item, BaseException):
            outcomes.append(taxonomy.outcome_of(item))
        elif (outcome := taxonomy.status_outcome(item)) is not None:
            outcomes.append(outcome)
        else:
            shown = taxonomy.short_repr(item)
            message = (f"on_batch outcome [{index}] is {shown}: use None, 'ok', an error"
                       ' or {"status": 500, "errormessage": "..."}')  # fmt: skip
            outcomes.append(taxonomy.bad_request(message))
    return outcomes


def insert_results(returned: Any, message_ids: list[Any]) -> list[tuple[dict, Any]]:
    """The insert function's on_batch return, one item per event in order (Segment pairs
    them by position): the event to pass on (changed or not), or an exception instance,
    DropEvent to drop it or an error for its outcome. `message_ids`: the events' own."""
    n = len(message_ids)
    if not isinstance(returned, list | tuple) or len(returned) != n:
        message = (
            f"the insert function's on_batch returned {what(returned)}: return a list of"
            f" {n}, one per event in order: the event, or an error such as DropEvent"
        )
        return [(taxonomy.bad_request(message), None)] * n
    results: list[tuple[dict, Any]] = []
    for index, item in enumerate(returned):
        if isinstance(item, BaseException):
            results.append((from_insert(taxonomy.outcome_of(item), "on_batch"), None))
        elif is_event(item):
            results.append((taxonomy.ok(), with_message_id(item, message_ids[index])))
        else:
            message = (f"the insert function's on_batch item [{index}] is {what(item)},"
                       " not an event or an error")  # fmt: skip
            results.append((taxonomy.bad_request(message), None))
    return results


def with_message_id(event: dict, message_id: Any) -> dict:
    """An event an insert function built anew keeps the messageId receivers dedupe on."""
    if "messageId" not in event and message_id is not None:
        event["messageId"] = message_id
    return event


def is_event(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") in runtime.EVENT_TYPES


def from_insert(outcome: dict, handler: str) -> dict:
    """An error the insert function raised, saying so: in front of a function (or a
    webhook), "Unsupported Event Type: EventNotSupported: internal" could be either's. A
    drop is the insert function's by nature: its reason is left as it is."""
    if outcome.get("kind") != "drop" and outcome.get("message") is not None:
        outcome = {**outcome, "message": f"the insert function's {handler}: {outcome['message']}"}
    return outcome


def what(value: Any) -> str:
    """A handler's return value as an error message names it."""
    if value is None:
        return "nothing (None)"
    if isinstance(value, dict):
        return f"a dict whose type is {value.get('type')!r}"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return type(value).__name__


# An event an insert function passes on, at most (ingest takes 32 KB, server.max_event_size,
# and an insert function may enrich it): one of many MB was a bug, and it went to the
# daemon and downstream all the same, in frames of up to 256 MB.
MAX_RESULT_EVENT_BYTES = 1024 * 1024


def as_written(events: list, outcomes: list[dict]) -> list:
    """An insert function's events as the JSON the reply carries, each written on its own:
    one JSON cannot hold (a set in it), or over MAX_RESULT_EVENT_BYTES, is that event's Bad
    Request alone, and none is nested deeper for sitting in the reply (one as deep as ingest
    takes failed every event of the call, retried until they expired)."""
    written: list = []
    for index, event in enumerate(events):
        if event is None:
            written.append(None)
            continue
        try:
            data = orjson.dumps(event)
        except TypeError as exc:
            why = str(exc)
            if "Recursion" in why:  # orjson writes at most 254 levels
                why = "nested more than 254 levels deep"
            what = "the insert function's result is not JSON"
            outcomes[index] = taxonomy.bad_request(f"{what}: {why}")
            written.append(None)
            continue
        if len(data) > MAX_RESULT_EVENT_BYTES:
            message = (f"the insert function's result is {len(data):,} bytes as JSON; at most "
                       f"{MAX_RESULT_EVENT_BYTES:,}")  # fmt: skip
            outcomes[index] = taxonomy.bad_request(message)
            written.append(None)
            continue
        written.append(orjson.Fragment(data))
    return written


def without_unsendable(reply: dict) -> dict:
    """`reply` made sendable: lone surrogates in logs and recorded requests written as
    `sendable` writes them (error messages are already: child.py's Worker.call; an insert
    function's events were written by `as_written`, each on its own)."""
    reply["logs"] = sendable(reply.get("logs", ""))
    try:
        orjson.dumps(reply.get("requests"))
    except TypeError:
        reply["requests"] = sendable_tree(reply.get("requests"))
        try:
            orjson.dumps(reply["requests"])
        except TypeError as exc:  # not for want of UTF-8: left out, and said so
            reply["requests"] = []
            reply["logs"] += f"[the recorded requests could not be sent: {exc}]\n"
    try:
        orjson.dumps(reply)
    except TypeError as exc:  # still: answer, so the call does not wait for its timeout
        message = f"the worker could not send the result: {exc}"
        failed = {"kind": "retry", "error_type": "Retry", "message": message}
        n = len(reply["outcomes"])
        slim = {k: reply[k] for k in ("t", "id", "exiting") if k in reply}
        slim.update(outcomes=[failed] * n, logs="", requests=[])
        if "events" in reply:  # the insert stage's reply has them, one per event
            slim["events"] = [None] * n
        reply = slim
    return reply
