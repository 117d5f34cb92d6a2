"""Segment's taxonomy inside a worker: what a handler's raise, or an on_batch status object
(`{"status": 500}`), means for the event. Pure: no I/O, no running of user code."""

from __future__ import annotations

import time

from destfnd.functions.errors import (
    DropEvent,
    EventNotSupported,
    InvalidEventPayload,
    RetryError,
    ValidationError,
)
from destfnd.outcome import parse_retry_after, retried_status, retry_after_hint
from destfnd.sandbox import runtime


def ok() -> dict:
    return {"kind": "ok"}


def outcome_of(exc: BaseException) -> dict:
    """Segment's taxonomy: what a raised exception means for the event."""
    if isinstance(exc, BaseExceptionGroup):
        return _group_outcome(exc)
    if isinstance(exc, RetryError):
        message = runtime.describe(exc)
        # A subclass may not have called RetryError.__init__; a Retry-After header's text
        # (seconds or an HTTP date) is taken as it is.
        hint = getattr(exc, "retry_after_s", None)
        after = parse_retry_after(hint, time.time()) if isinstance(hint, str) else (
            retry_after_hint(hint))  # fmt: skip
        if hint is not None and after is None:
            message += f" (retry_after_s={short_repr(hint)} is no number of seconds: ignored)"
        return {"kind": "retry", "error_type": "Retry", "message": message,
                "retry_after_s": after}  # fmt: skip
    if isinstance(exc, TimeoutError):
        return {"kind": "retry", "error_type": "Timeout", "message": runtime.describe(exc)}
    if isinstance(exc, InvalidEventPayload | ValidationError):
        return {
            "kind": "discard",
            "error_type": "Message Rejected",
            "message": runtime.describe(exc),
        }
    if isinstance(exc, EventNotSupported):
        return {"kind": "discard", "error_type": "Unsupported Event Type",
                "message": runtime.describe(exc)}  # fmt: skip
    if isinstance(exc, DropEvent):
        return {"kind": "drop", "message": str(exc)}
    if isinstance(exc, MemoryError):
        message = "MemoryError: the function ran out of memory (memory_limit)"
        return {"kind": "retry", "error_type": "Retry", "message": message}
    return bad_request(runtime.describe(exc))


def _group_outcome(group: BaseExceptionGroup) -> dict:
    """An exception group (a TaskGroup of fetches, say) has the outcome of what it holds: of
    its first error that is not retried, else of its first (retried: the event is not lost
    for a failure that may pass), with the longest wait any of them asks for."""
    leaves = _leaves(group)
    outcomes = [outcome_of(leaf) for leaf in leaves]
    final = next((o for o in outcomes if o["kind"] != "retry"), outcomes[0])
    waits = [o["retry_after_s"] for o in outcomes if o.get("retry_after_s") is not None]
    if final["kind"] == "retry" and waits:
        final["retry_after_s"] = max(waits)
    more = f" (and {len(leaves) - 1} more in its {type(group).__name__})" if len(leaves) > 1 else ""
    final["message"] += more
    return final


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def status_outcome(item: object) -> dict | None:
    """Segment's per-event outcome of `onBatch`, `{"status": 200}` or `{"status": 500,
    "errormessage": "..."}` (other keys, as Segment's Actions add, `errortype`, `sent`,
    `body`, are let be): a 2xx delivered, a 5xx, 408 or 429 retried, another status
    discarded (Bad Request). None: `item` is no such object (an event has a `type`)."""
    if not isinstance(item, dict) or "type" in item:
        return None
    status = item.get("status")
    if isinstance(status, float) and status.is_integer():
        status = int(status)  # 500.0: JSON's numbers, as a port may pass them on
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        return None
    if 200 <= status < 300:
        return ok()
    text = item.get("errormessage", item.get("errorMessage"))
    message = f"HTTP {status}" + (f": {text}" if isinstance(text, str) and text else "")
    if retried_status(status):
        return {"kind": "retry", "error_type": "Retry", "message": message}
    return bad_request(message)


def unsupported(what: str) -> dict:
    return {"kind": "discard", "error_type": "Unsupported Event Type", "message": what}


def bad_request(message: str) -> dict:
    return {"kind": "discard", "error_type": "Bad Request", "message": message}
