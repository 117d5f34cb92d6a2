"""`fetch`: the HTTP client user functions call; every call is recorded on the invocation.

A network failure or a timeout raises FetchError, a RetryError: retried unless caught.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from destfnd.client_errors import client_error_text
from destfnd.config import parse_duration
from destfnd.functions import record
from destfnd.functions.errors import RetryError
from destfnd.urls import as_written

DEFAULT_TIMEOUT_S = 10.0  # the worker sets it to the destination's `timeout`
_session: aiohttp.ClientSession | None = None
_home_loop: asyncio.AbstractEventLoop | None = None


class FetchError(RetryError):
    """fetch() got no HTTP response (connection failed or timed out): retried by default."""


class Response:
    def __init__(self, status: int, reason: str, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.reason = reason
        # As the server sent them: looked up in any case (`headers.get("retry-after")`),
        # a repeated header keeps every value (`headers.getall("Set-Cookie")`).
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.ok = 200 <= status < 300
        self._body = body
        self.url = ""  # where it came from, after redirects (as JavaScript's `res.url`)
        self.redirected = False

    async def text(self) -> str:
        return self._body.decode("utf-8", errors="replace")

    async def json(self) -> Any:
        return orjson.loads(self._body)

    async def read(self) -> bytes:
        return self._body

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def _session_for_loop() -> aiohttp.ClientSession | None:
    """The worker's shared session (keep-alive connections), on the worker's own loop; None
    on another loop: a plain `def` handler that runs `asyncio.run(fetch(...))` closes that
    loop after, and a shared session tied to it would fail every later fetch of the worker
    ("Event loop is closed"). The first loop to fetch is taken as the worker's own."""
    global _session, _home_loop
    loop = asyncio.get_running_loop()
    if _home_loop is None:
        _home_loop = loop
    if loop is not _home_loop:
        return None
    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    return _session


def _timeout_seconds(value: object) -> float:
    """fetch's `timeout`: seconds (a number, or its text: from settings, say), or a duration
    such as "500ms" or "5s"."""
    expected = 'a number of seconds above 0, or a duration such as "500ms"'
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                seconds = parse_duration(value)
        else:
            seconds = float(value)  # type: ignore[arg-type]
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"fetch(timeout=) must be {expected}, got {value!r}") from None
    if not 0 < seconds < math.inf:
        raise ValueError(f"fetch(timeout=) must be {expected}, got {value!r}")
    return seconds


def _header_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")  # HTTP's own header encoding
    return str(value)


def set_home_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The worker's own loop, where the shared session lives (else the first to fetch)."""
    global _home_loop
    _home_loop = loop


async def close() -> None:
    if _session is not None:
        await _session.close()


async def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str | bytes | None = None,
    json: Any = None,
    timeout: float | None = None,
) -> Response:
    """Make an HTTP request; `json=` serializes the body and sets Content-Type."""
    if json is not None and body is not None:
        raise TypeError("fetch() takes body= or json=, not both")
    if body is not None and not isinstance(body, str | bytes):
        what = type(body).__name__
        raise TypeError(f"fetch(body=) takes str or bytes, not {what}: use json= for an object")
    # Header values as text, as JavaScript's fetch makes them ({"X-Count": 5}); a header
    # whose value is None is left out, as the requests library does.
    headers = {str(k): _header_text(v) for k, v in dict(headers or {}).items() if v is not None}
    data: bytes | None
    kind = None  # the body's own Content-Type, unless one is given
    if json is not None:
        data, kind = orjson.dumps(json), "application/json"
    elif isinstance(body, str):  # typed as JavaScript's fetch types it (aiohttp: octet-stream)
        data, kind = body.encode(), "text/plain;charset=UTF-8"
    else:
        data = body
    send: bytes | aiohttp.BytesPayload | None = data
    shown = headers
    if kind is not None and data is not None:
        if not any(name.lower() == "content-type" for name in headers):
            # The payload's, not a header of the request: after a redirect that turns the
            # POST into a GET it goes with the body, as JavaScript's fetch drops it.
            send = aiohttp.BytesPayload(data, content_type=kind)
            shown = {**headers, "Content-Type": kind}
    timeout_s = DEFAULT_TIMEOUT_S if timeout is None else _timeout_seconds(timeout)
    entry: dict[str, Any] = {
        "method": method.upper(),
        "url": url,
        "request_headers": record.safe_headers(shown),
        "request_body": data or None,  # bytes: CallRecord.request clips it
    }
    rec = record.current.get()
    started = time.monotonic()
    shared = _session_for_loop()
    session = shared or aiohttp.ClientSession()  # one request's own on another loop
    try:
        target = as_written(url) if isinstance(url, str) else url
        limit = aiohttp.ClientTimeout(total=timeout_s)
        async with session.request(
            method, target, data=send, headers=headers, timeout=limit
        ) as resp:
            raw = await resp.read()
            response = Response(resp.status, resp.reason or "", resp.headers, raw)
            response.url, response.redirected = str(resp.url), bool(resp.history)
        entry["status"] = response.status
        if resp.history:  # followed, as JavaScript's fetch does: the record says where it ended
            entry["redirected_to"] = str(resp.url)
        entry["response_headers"] = record.safe_headers(response.headers)
        entry["response_body"] = raw
    except TimeoutError:
        entry["error"] = f"no response within {timeout_s:g}s"
        raise FetchError(f"fetch {method.upper()} {url}: {entry['error']}") from None
    except aiohttp.RedirectClientError as exc:  # the server's Location is bad: as a failure
        entry["error"] = client_error_text(exc)
        raise FetchError(f"fetch {method.upper()} {url}: {entry['error']}") from None
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        # The function's bug, not the network's: no retry helps (Bad Request).
        entry["error"] = client_error_text(exc)
        raise ValueError(f"fetch {method.upper()} {url!r}: not an http(s) URL") from None
    except aiohttp.ClientError as exc:
        entry["error"] = client_error_text(exc)
        raise FetchError(f"fetch {method.upper()} {url}: {entry['error']}") from None
    finally:
        if shared is None:
            await session.close()
        entry["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        if rec is not None:  # once complete: it is redacted and clipped as it is recorded
            rec.request(entry)
    return response
