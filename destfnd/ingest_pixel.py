"""Segment's Tracking Pixel API (`GET /v1/pixel/<type>`, for an `<img>` in an email or an AMP
page): the query made into the body a POST would carry, and the 1x1 GIF answer. Knows
nothing of sources, events or the store.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from aiohttp import web

from destfnd.ingest_body import Rejected, loads

PIXEL_TYPES = ("identify", "group", "alias", "page", "screen", "track")
# A transparent 1x1 GIF, the answer to every pixel request.
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_HEADERS = {
    "Content-Type": "image/gif",
    # Each open of an email is its own request: no copy kept by a browser or a proxy.
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "0",
}
ERROR_HEADER = "X-Destfnd-Error"
_ERROR_HEADER_CHARS = 500


def pixel_body(query: Iterable[tuple[str, str]]) -> dict:
    """The event of a pixel request's query, as Segment documents it: `data` holding its JSON
    in base64 (either alphabet, padding optional) or as it is, and the event's fields as
    parameters, nested in dot notation (`properties.subject=...`, as AMP sends them).
    Parameters are read in order, a later one replacing an earlier; `data`'s fields win
    over them. The values of parameters are strings."""
    body: dict = {}
    data: list[str] = []
    for key, value in query:
        if key == "data":
            if value:  # ("data=": nothing)
                data.append(value)
        elif key:  # ("&=x": nothing to name it by)
            _set(body, key, value)
    if len(data) > 1:
        raise Rejected(400, "invalid request", "data: given more than once")
    if data:
        _merge(body, _decode(data[0]))
    return body


def _decode(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        raw = text.encode()
    else:
        # A query reads a "+" of base64 as a space; the URL-safe alphabet is the same digits.
        digits = text.replace(" ", "+").replace("-", "+").replace("_", "/").rstrip("=")
        try:
            raw = base64.b64decode(digits + "=" * (-len(digits) % 4), validate=True)
        except (binascii.Error, ValueError):
            detail = "data: neither base64 nor JSON (encode the event's JSON in base64)"
            raise Rejected(400, "invalid request", detail) from None
    try:
        value = loads(raw)
    except Rejected as exc:
        raise Rejected(400, exc.error, f"data: {exc.detail}") from None
    if not isinstance(value, dict):
        raise Rejected(400, "invalid request", f"data: a JSON {type(value).__name__}, not object")
    return value


def _set(body: dict, key: str, value: str) -> None:
    names = key.split(".")
    if not all(names):
        raise Rejected(400, "invalid request", f"parameter {key[:100]!r}: an empty name in it")
    into = body
    for depth, name in enumerate(names[:-1]):
        inner = into.setdefault(name, {})
        if not isinstance(inner, dict):
            taken = ".".join(names[: depth + 1])
            detail = f"parameter {key[:100]!r}: {taken[:100]} is a value already, not an object"
            raise Rejected(400, "invalid request", detail)
        into = inner
    if isinstance(into.get(names[-1]), dict):
        detail = f"parameter {key[:100]!r}: its fields are given already"
        raise Rejected(400, "invalid request", detail)
    into[names[-1]] = value


def _merge(into: dict, data: dict) -> None:
    """`data`'s fields over `into`'s, object into object, as deep as both go (a loop: `data`
    may be nested deeper than Python's recursion limit)."""
    pending = [(into, data)]
    while pending:
        target, source = pending.pop()
        for key, value in source.items():
            inner = target.get(key)
            if isinstance(value, dict) and isinstance(inner, dict):
                pending.append((inner, value))
            else:
                target[key] = value


def pixel_answer(refused: Rejected | None = None, skipped: str | None = None) -> web.Response:
    """The GIF, with status 200 as Segment's answer even to a request it refuses, a 503 too
    (an image would show broken otherwise, and nothing sends it again); why it was refused
    goes in a header, for a person trying the URL with curl."""
    headers = dict(_HEADERS)
    why = skipped and f"skipped: {skipped}"
    if refused is not None:
        detail = f": {refused.detail}" if refused.detail else ""
        why = f"{refused.status} {refused.error}{detail}"
    if why:
        printable = why.encode("ascii", "backslashreplace").decode()
        printable = "".join(c if " " <= c <= "~" else " " for c in printable)
        headers[ERROR_HEADER] = printable[:_ERROR_HEADER_CHARS]
    return web.Response(body=GIF, headers=headers)
