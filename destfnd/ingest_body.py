"""A Tracking API request's bytes: its body read within the limits and decompressed, its JSON
parsed, its Authorization header's write key; and `Rejected` with its JSON error answer.
Knows nothing of events, sources or the store.
"""

from __future__ import annotations

import asyncio
import base64
import re
import zlib
from typing import Any

import orjson
from aiohttp import web

from destfnd.config import REQUEST_ENVELOPE_BYTES, ServerConfig


class Rejected(Exception):
    """The request is refused with `status` and a JSON error body."""

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def error_response(status: int, error: str, detail: str = "") -> web.Response:
    """`{"success": false, "error", "detail"}`, with Segment's own `code` and `message` beside
    them: Segment's SDKs log those two (analytics-python logs "unknown" without them)."""
    body = {"success": False, "error": error}
    if detail:
        body["detail"] = detail
    body["code"] = error.lower().replace(" ", "_").replace("-", "_")
    body["message"] = f"{error}: {detail}" if detail else error
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def too_large(server: ServerConfig) -> Rejected:
    """The 413 for a body over `server.request_limit_bytes`."""
    request, event = server.max_request_bytes, server.max_event_bytes
    room = f"server.max_event_size {event} + {REQUEST_ENVELOPE_BYTES}"
    detail = (
        f"over {server.request_limit_bytes} bytes (server.max_request_size {request}, with"
        f" room for a batch's last event: {room})"
    )
    return Rejected(413, "request too large", detail)


# What `basic_user` makes of an `Authorization: Basic` header that does not hold base64 of
# "writekey:" (or of "writekey:password").
MALFORMED: Any = object()


async def read_body(request: web.Request, server: ServerConfig) -> bytes:
    """The body within `server`'s limits (raw size, time to arrive, decompressed size),
    decompressed if it is gzip."""
    limit = server.request_limit_bytes
    try:
        if request.content.is_eof():  # all of it has arrived (nearly always)
            raw = await request.read()
        else:
            declared = request.content_length
            if declared is not None and declared > limit:  # refused before it is sent
                raise too_large(server)
            # A client that sends it a trickle at a time holds a connection this long.
            async with asyncio.timeout(server.body_timeout_s):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(server) from None
    except TimeoutError:
        within = f"the body did not arrive within {server.body_timeout_s:g}s"
        raise Rejected(408, "request timeout", within) from None
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip"):  # (x-gzip: gzip's old name, RFC 9110 8.4.1.3)
        raise Rejected(415, "unsupported Content-Encoding", f"{encoding!r}; use gzip")
    return gunzip(raw, server.decompressed_limit_bytes)


def loads(raw: bytes) -> object:
    """The JSON of a body; a lone surrogate escape, or a byte that is not UTF-8, inside a
    string is taken as U+FFFD (below)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _loads_repaired(raw, exc)


# Each escape in a JSON text, left to right (so "\\\\" is one escape and the next character
# starts none): a valid surrogate pair (kept), a lone surrogate (1, replaced), anything else.
_ESCAPES = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})|\\.",
    re.DOTALL,
)


def _replace_lone(match: re.Match[bytes]) -> bytes:
    return b"\\ufffd" if match.group(1) else match.group(0)


def _loads_repaired(raw: bytes, error: orjson.JSONDecodeError) -> object:
    """A body orjson refused only for a lone surrogate escape (`"\\ud83d"` with no low half,
    as JSON.stringify writes a string cut in the middle of an emoji) or for bytes that are
    not UTF-8 in a string (Latin-1 text from a hand-made client), parsed with each of them
    replaced by U+FFFD, as Go's encoding/json (and so Segment's API) does: nothing else of
    the request is lost. Any other malformed body is refused with orjson's error on the
    repaired text, and the offset of the first byte that is not UTF-8 if there is one."""
    if "surrogate" not in str(error):  # orjson says "surrogates not allowed" for a bad byte too
        raise Rejected(400, "malformed JSON", str(error))
    bad: UnicodeDecodeError | None = None
    repaired = raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc
        # ASCII bytes (quotes, backslashes) are never taken into a replacement.
        repaired = raw.decode("utf-8", "replace").encode()
    try:
        return orjson.loads(_ESCAPES.sub(_replace_lone, repaired))
    except orjson.JSONDecodeError as exc:
        detail = str(exc)
        if bad is not None:  # (perhaps the cause: one outside a string, say)
            detail += f" (and the body is not UTF-8: byte {bad.start} is 0x{raw[bad.start]:02x})"
        raise Rejected(400, "malformed JSON", detail) from None


_GZIP_MEMBERS = 16


def gunzip(raw: bytes, cap: int) -> bytes:
    """A gzip body inflated, every member of it (RFC 1952 allows several, one after another;
    zero bytes after a member are padding, as for Python's gzip module), refused once it would
    be over `cap` bytes; trailing bytes that are no gzip member are an error rather than
    silently dropped. At most _GZIP_MEMBERS members: each one copies what follows it."""
    out = bytearray()
    rest = memoryview(raw)
    for _ in range(_GZIP_MEMBERS):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, cap + 1 - len(out))
            if len(out) > cap or inflater.unconsumed_tail:
                raise Rejected(413, "request too large", f"over {cap} bytes once decompressed")
            out += inflater.flush()
        except zlib.error as exc:
            if not out and rest[:2] != b"\x1f\x8b":  # no gzip magic: not compressed at all?
                detail = "Content-Encoding is gzip, but the body is not gzip data"
            else:
                detail = f"the gzip data is corrupt ({exc})"
            raise Rejected(400, "bad gzip body", detail) from None
        if not inflater.eof:
            raise Rejected(400, "bad gzip body", "truncated gzip stream")
        if len(out) > cap:
            raise Rejected(413, "request too large", f"over {cap} bytes once decompressed")
        rest = memoryview(inflater.unused_data.lstrip(b"\0"))  # zero padding is allowed
        if not rest:
            return bytes(out)
        if rest[:2] != b"\x1f\x8b":
            raise Rejected(400, "bad gzip body", f"{len(rest)} bytes after the gzip stream")
    raise Rejected(400, "bad gzip body", f"more than {_GZIP_MEMBERS} gzip members")


def basic_user(header: str | None) -> str | Any:
    """The user name of an HTTP Basic header (Segment's write key), None if there is no Basic
    header, `MALFORMED` if it holds no user name."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
        return MALFORMED
    return decoded.partition(":")[0] or MALFORMED
