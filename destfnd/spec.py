"""The Segment event spec: which messages are valid, and how an accepted one is enriched.

Pure functions over plain dicts; no I/O, no clock (callers pass the time they received it).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias", "delete")

# Path segment of /v1/<kind> -> event type; the short forms are analytics.js's.
ENDPOINT_TYPES = {
    "track": "track", "t": "track",
    "identify": "identify", "i": "identify",
    "page": "page", "p": "page",
    "screen": "screen", "s": "screen",
    "group": "group", "g": "group",
    "alias": "alias", "a": "alias",
}  # fmt: skip

_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_MAX_ID_CHARS = 1024

# Lenient ISO-8601: Segment's own examples send one-digit months ("2015-2-02T00:30:08.276Z").
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:[Tt ](\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*(Z|z|UTC|[+-]\d{2}(?::?\d{2})?)?"
)
# A timestamp is at most about 40 characters ("2015-12-10T04:08:31.123456789+01:00"): text
# longer than this is refused before the regex sees it, whose `\s*` would otherwise
# backtrack over a long run of spaces for seconds.
_TIMESTAMP_MAX = 64


class SpecError(ValueError):
    """A message does not follow the Segment spec."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 timestamp as leniently as Segment; naive times are UTC. ValueError if
    it is not one, or if it falls outside years 1-9999 once moved to UTC."""
    try:
        return _parse_timestamp(text)
    except OverflowError:
        raise ValueError(f"out of range (years 1-9999 in UTC): {text[:64]!r}") from None


def _parse_timestamp(text: str) -> datetime:
    if len(text) >= 20 and text[10] == "T":
        # The common, well-formed case, in C; the regex below takes everything else.
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if dt.tzinfo is UTC:  # "...Z": already UTC
                return dt
            if dt.tzinfo is None:
                return dt.replace(tzinfo=UTC)
            # fromisoformat takes any offset under a day, "+00:99" included: checked as the
            # parser below checks it (its value is fromisoformat's).
            sign = max(text.rfind("+"), text.rfind("-"))
            _offset(text[sign:], text)
            return dt.astimezone(UTC)
    stripped = text.strip()
    m = _TIMESTAMP.fullmatch(stripped) if len(stripped) <= _TIMESTAMP_MAX else None
    if m is None:
        raise ValueError(f"not an ISO-8601 timestamp: {text[:64]!r}")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        dt = datetime(
            int(year), int(month), int(day),
            int(hour or 0), int(minute or 0), int(second or 0), micro, tzinfo=UTC,
        )  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"not a valid date or time: {text[:64]!r} ({exc})") from None
    if zone and zone not in ("Z", "z", "UTC"):
        dt -= _offset(zone, text)
    return dt


def _offset(zone: str, text: str) -> timedelta:
    """A UTC offset as written (`+05:30`, `-0800`, `+05:30:15`, `+05`), checked as both
    parsers need it: hours below 24, minutes and seconds below 60."""
    digits = zone[1:].replace(":", "")
    parts = [digits[i : i + 2] for i in (0, 2, 4)]
    values = [int(v) if len(v) == 2 and v.isdigit() else 0 for v in parts]
    if values[0] > 23 or values[1] > 59 or values[2] > 59:
        raise ValueError(f"not a valid UTC offset: {zone!r} in {text[:64]!r}")
    sign = -1 if zone[0] == "-" else 1
    return sign * timedelta(hours=values[0], minutes=values[1], seconds=values[2])


def format_timestamp(dt: datetime) -> str:
    """The one representation destfnd writes: UTC, milliseconds, `Z`."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    return dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def format_ms(at_ms: int) -> str:
    return format_timestamp(datetime.fromtimestamp(at_ms / 1000, UTC))


def _check_id(event: dict, key: str, path: str) -> bool:
    """Validate an optional identifier; numbers are coerced to strings as Segment's SDKs do."""
    value = event.get(key)
    if value is None:
        return False
    if value.__class__ is str:  # the common case, without the calls below
        if not value or value.isspace():
            return False
        if len(value) > _MAX_ID_CHARS:
            raise SpecError(f"{path}{key}", f"longer than {_MAX_ID_CHARS} characters")
        return True
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SpecError(f"{path}{key}", "must be a string")
    if not isinstance(value, str):
        value = str(value)
        event[key] = value
    if not value.strip():
        return False
    if len(value) > _MAX_ID_CHARS:
        raise SpecError(f"{path}{key}", f"longer than {_MAX_ID_CHARS} characters")
    return True


def validate(event: object, path: str = "") -> dict:
    """Check one message against the spec and return it; raises SpecError naming the field.

    `path` prefixes field names in errors, e.g. "batch[3]." for the fourth message of a batch.
    Numeric ids are coerced to strings in place.
    """
    check(event, path)
    return event  # type: ignore[return-value]


Times = tuple[datetime | None, datetime | None]  # (timestamp, sentAt) as parsed by check()


def check(event: object, path: str = "") -> Times:
    """`validate`, returning the parsed `timestamp` and `sentAt` for `enrich`."""
    if not isinstance(event, dict):
        raise SpecError(path.rstrip(".") or "body", "must be a JSON object")
    etype = event.get("type")
    if etype.__class__ is not str:
        raise SpecError(f"{path}type", "required: one of " + ", ".join(sorted(EVENT_TYPES)))
    if etype not in EVENT_TYPES:
        raise SpecError(
            f"{path}type", f"unknown type {etype[:40]!r}; one of " + ", ".join(sorted(EVENT_TYPES))
        )
    has_user = _check_id(event, "userId", path)
    has_anon = _check_id(event, "anonymousId", path)
    if etype == "alias":
        if not has_user:
            raise SpecError(f"{path}userId", "required for alias")
        if not _check_id(event, "previousId", path):
            raise SpecError(f"{path}previousId", "required for alias")
    elif etype == "delete":
        if not has_user:
            raise SpecError(f"{path}userId", "required for delete")
    elif not (has_user or has_anon):
        raise SpecError(f"{path}userId", "userId or anonymousId is required")
    if etype == "track":
        name = event.get("event")
        if not isinstance(name, str) or not name.strip():
            raise SpecError(f"{path}event", "required for track: a non-empty string")
    if etype == "group" and not _check_id(event, "groupId", path):
        raise SpecError(f"{path}groupId", "required for group")
    for key in _OBJECT_FIELDS:
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            if value != []:
                raise SpecError(f"{path}{key}", "must be an object")
            event[key] = {}  # PHP's json_encode writes an empty array so (analytics-php)
    if etype in ("page", "screen"):
        for key in ("name", "category"):
            value = event.get(key)
            if value is not None and not isinstance(value, str):
                raise SpecError(f"{path}{key}", "must be a string")
    if "messageId" in event and not _check_id(event, "messageId", path):
        # Blank ("", " "): filled by enrich as if absent, rather than all deduplicated as one.
        del event["messageId"]
    return _parse_optional_time(event, "timestamp", path), _parse_optional_time(
        event, "sentAt", path
    )


def _parse_optional_time(event: dict, key: str, path: str) -> datetime | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(f"{path}{key}", "must be an ISO-8601 string")
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise SpecError(f"{path}{key}", str(exc)) from None


def enrich(
    event: dict,
    received_at: datetime,
    *,
    new_message_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    times: Times | None = None,
    received_text: str | None = None,
    path: str = "",
) -> dict:
    """Fill `messageId`, set `receivedAt`, correct `timestamp` for client clock skew.

    As Segment: with `sentAt`, timestamp = receivedAt - (sentAt - originalTimestamp), and the
    client's own `timestamp` is kept as `originalTimestamp`. Call after `validate`.
    """
    event.pop("writeKey", None)
    if not event.get("messageId"):
        event["messageId"] = new_message_id()
    event["receivedAt"] = received_text or format_timestamp(received_at)
    if times is None:
        times = (
            _parse_optional_time(event, "timestamp", ""),
            _parse_optional_time(event, "sentAt", ""),
        )
    original, sent_at = times
    if sent_at is not None:  # written as every time destfnd writes, used or not
        event["sentAt"] = _canonical(event["sentAt"], sent_at)
    if original is None:
        event["timestamp"] = event["receivedAt"]
        return event
    event["originalTimestamp"] = text = _canonical(event["timestamp"], original)
    if sent_at is None:  # no clock to correct for: the timestamp stands
        event["timestamp"] = text
        return event
    try:
        event["timestamp"] = format_timestamp(received_at - (sent_at - original))
    except OverflowError:
        raise SpecError(
            f"{path}sentAt", "too far from timestamp to correct for clock skew"
        ) from None
    return event


def fill_ip(event: dict, ip: str) -> None:
    """Set `context.ip` unless the event has one (Segment's servers leave a set one alone, so
    "0.0.0.0" opts out; null and "" count as none). Call after `validate`: `context` is then
    an object or absent."""
    context = event.get("context")
    if context is None:
        event["context"] = {"ip": ip}
    elif context.get("ip") in (None, ""):
        context["ip"] = ip


def routed(routes: Sequence[tuple[str, str]], integrations: object) -> tuple[str, ...] | None:
    """The names of the destinations an event's `integrations` object leaves on, of `routes`
    ((name, its key in `integrations`) pairs), read as Segment's analytics.js reads it
    (isDisabledIntegration): a key set to false is off, one set to anything else (true, or
    an object of options) on, and one not there is off if "All" is false. Keys are
    case-sensitive. None if it turns none off, as for nearly every event (most send none,
    or {})."""
    if not integrations or not isinstance(integrations, dict):
        return None
    all_off = integrations.get("All") is False
    on = tuple(
        name for name, key in routes
        if (integrations[key] is not False if key in integrations else not all_off)
    )  # fmt: skip
    return None if len(on) == len(routes) else on


def _canonical(text: str, parsed: datetime) -> str:
    """`text` if already in destfnd's format (most SDKs send it), else `parsed` formatted."""
    if (
        len(text) == 24
        and text[-1] == "Z"
        and text[10] == "T"
        and text[19] == "."
        and text.isascii()  # the parser also takes other scripts' digits: those get rewritten
    ):
        return text
    return format_timestamp(parsed)


def expand(body: object, endpoint_type: str | None, lenient: bool = False) -> list[Any]:
    """The messages of one request body, batch-level fields merged in, not yet validated.

    `endpoint_type` is the type implied by /v1/<type>, or None for /v1/batch. `lenient`: a
    batch member that is no object is passed on as it is (for `check` to refuse alone).
    """
    if not isinstance(body, dict):
        raise SpecError("body", "must be a JSON object")
    if endpoint_type is not None:
        event = body  # the body is ours (just parsed): enriched in place
        event.pop("writeKey", None)
        given = event.get("type")
        if given is not None and given != endpoint_type:
            raise SpecError("type", f"{given!r} sent to the {endpoint_type} endpoint")
        event["type"] = endpoint_type
        return [event]
    batch = body.get("batch")
    if not isinstance(batch, list):
        raise SpecError("batch", "required: an array of messages")
    shared = {key: body[key] for key in ("context", "integrations") if key in body}
    for key, value in shared.items():
        if value == []:  # PHP's empty array, as in a message
            shared[key] = {}
        elif value is not None and not isinstance(value, dict):
            raise SpecError(key, "must be an object")
    sent_at = body.get("sentAt")
    events = []
    for index, event in enumerate(batch):
        if not isinstance(event, dict):
            if not lenient:
                raise SpecError(f"batch[{index}]", "must be a JSON object")
            events.append(event)
            continue
        event.pop("writeKey", None)
        for key, value in shared.items():
            if isinstance(value, dict):
                own = event.get(key)
                # The message's own keys win over the batch's; its own that is no object
                # ([], "", 0) is refused by `check`, as it would be alone.
                if own is None or own == []:  # ([]: PHP's empty object)
                    event[key] = dict(value)
                elif isinstance(own, dict):
                    event[key] = {**value, **own}
        if sent_at is not None and "sentAt" not in event:
            event["sentAt"] = sent_at
        events.append(event)
    return events
