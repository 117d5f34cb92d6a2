"""Which source a Tracking API request is from: its write key in an `Authorization: Basic`
header, else as `writeKey` in its body; with the 401 that says what is wrong. Knows nothing
of events or the store."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from destfnd.ingest_body import MALFORMED, Rejected, basic_user

_MISSING = object()
_MALFORMED_DETAIL = (
    "the Authorization header is not HTTP Basic with the write key as user name "
    "(base64 of 'WRITE_KEY:')"
)
_NOT_BASIC_DETAIL = (
    "the Authorization header is not HTTP Basic (send 'Basic ' + base64 of 'WRITE_KEY:'), "
    "and the body has no writeKey"
)
_AUTH_CACHE_SIZE = 1024
# A body without an Authorization header bigger than this is parsed only if a "writeKey" of
# one of the sources is in its text (among its first few): parsing costs about 25 ms a MB,
# and 2 KB of gzip inflate to 2 MB, so anyone could otherwise keep the event loop busy
# without a key. Smaller bodies are parsed first, for the exact error.
_SCAN_BODY_KEY_OVER = 64 * 1024
_BODY_KEYS_TRIED = 16  # "writeKey"s looked at, whatever follows each: the work is bounded


class WriteKeys:
    def __init__(self, sources: dict[str, str]) -> None:
        self._sources = sources  # write key -> source name
        # A "writeKey" member with a string no longer than the longest key as JSON may write
        # it (each character escaped at worst: 12 for one outside the BMP): each try is
        # bounded by that, not by the body.
        longest = max((12 * len(key) for key in sources), default=0)
        self._body_key = re.compile(
            rb'"writeKey"\s{0,64}:\s{0,64}("(?:[^"\\]|\\.){0,%d}")' % longest
        )
        self._cache: dict[str, Any] = {}  # header -> str, None or MALFORMED

    def of_header(self, request: web.Request) -> str | None:
        """The write key of the Authorization header, if any; a 401 if it is malformed or
        unknown (what the request's head alone refuses)."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        key = self._cache.get(header, _MISSING)
        if key is _MISSING:
            if len(self._cache) >= _AUTH_CACHE_SIZE:
                self._cache.clear()  # bounded: junk headers cannot grow it
            key = self._cache[header] = basic_user(header)
        if key is not None and key not in self._sources:  # (None: another scheme, ignored)
            if key is MALFORMED:
                raise Rejected(401, "unauthorized", _MALFORMED_DETAIL)
            raise Rejected(401, "unauthorized", "unknown write key")
        return key  # type: ignore[return-value]

    def check_big_body(self, request: web.Request, header_key: str | None, raw: bytes) -> None:
        """A 401, before it is parsed, for a big body with no known key in the header or
        among the first "writeKey"s of its text."""
        if header_key is not None or len(raw) <= _SCAN_BODY_KEY_OVER or self._known_in(raw):
            return
        if b'"writeKey"' not in raw:
            raise Rejected(401, "unauthorized", _no_key_detail(request))
        raise Rejected(401, "unauthorized", "unknown write key")

    def _known_in(self, raw: bytes) -> bool:
        """Whether one of the first "writeKey"s in the text of `raw` is a source's."""
        at = 0
        for _ in range(_BODY_KEYS_TRIED):
            at = raw.find(b'"writeKey"', at)
            if at < 0:
                return False
            match = self._body_key.match(raw, at)
            at += len(b'"writeKey"')
            if match is None:
                continue
            try:
                value = orjson.loads(match.group(1))
            except orjson.JSONDecodeError:
                continue
            if value in self._sources:
                return True
        return False

    def source(self, request: web.Request, header_key: str | None, body: object) -> str:
        """The source whose write key the request holds: the header's, else the body's."""
        key = header_key
        if key is None and isinstance(body, dict):
            key = body.get("writeKey")
        if not isinstance(key, str) or not key:
            if key is not None and key != "":
                detail = f"writeKey must be a string, not {type(key).__name__}"
            else:
                detail = _no_key_detail(request)
            raise Rejected(401, "unauthorized", detail)
        source = self._sources.get(key)
        if source is None:
            raise Rejected(401, "unauthorized", "unknown write key")
        return source


def _no_key_detail(request: web.Request) -> str:
    if "Authorization" in request.headers:
        return _NOT_BASIC_DETAIL
    return "send the write key as HTTP Basic user name or as writeKey"
