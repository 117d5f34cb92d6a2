"""The Segment HTTP Tracking API: auth, limits, validation, enrichment, commit, then 200.

A request is all or nothing, and answered 200 only once every event of it is on disk.
Bad input gets a 4xx with a JSON body naming the problem; never a 5xx, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import HttpVersion11, web

from destfnd import descriptors, spec
from destfnd.client_ip import ClientIP
from destfnd.config import Config
from destfnd.logs import Throttle
from destfnd.store import IncomingEvent, StoreError, Writer
from destfnd.store import queue as q
from destfnd.store.dedupe import Dedupe

log = structlog.get_logger("destfnd.ingest")

# Enrichment adds messageId, receivedAt, timestamp, originalTimestamp: this much room is left
# for them so an event the client kept under the limit is not refused after we enriched it.
_ENRICH_ALLOWANCE = 512


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


# After a failed commit, /healthz answers 503 until one works, or for this long after it.
STORE_FAILING_S = 5.0
# Lines for refused requests: so many at once, then so many a second (and a count of the rest).
REJECTED_LINES_BURST = 100
REJECTED_LINES_PER_S = 10.0
_OK = orjson.dumps({"success": True})
_SKIPPED_LISTED = 10  # reasons in the answer to a request with invalid events skipped
_JSON = {"Content-Type": "application/json"}
_MISSING = object()
# What `_basic_user` makes of an `Authorization: Basic` header that does not hold base64 of
# "writekey:" (or of "writekey:password").
_MALFORMED: Any = object()
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
# Ingest paths and the event type each implies (None: a batch, each message with its own).
# /v1/b: analytics.js with deliveryStrategy "batching" posts its batches there.
_ROUTES: dict[str, str | None] = {
    **{f"/v1/{name}": etype for name, etype in spec.ENDPOINT_TYPES.items()},
    "/v1/batch": None,
    "/v1/b": None,
    "/v1/import": None,
}
# With a trailing slash too: analytics-java posts to /v1/import/ by default (a 404 it drops).
_ROUTES |= {f"{path}/": etype for path, etype in _ROUTES.items()}
_ALLOWED = {path: "OPTIONS, POST" for path in _ROUTES} | {"/healthz": "GET, HEAD"}


class Ingest:
    """The aiohttp app. It listens while the daemon starts (503 until `attach` and `ready`);
    `on_commit(destinations)` is told which destinations got new work."""

    def __init__(
        self,
        cfg: Config,
        on_commit: Callable[[tuple[str, ...]], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._server = cfg.server
        self._writer: Writer | None = None
        self._insert: Callable | None = None
        self._on_commit = on_commit
        self._clock = clock
        self._sources = {s.write_key.value: s.name for s in cfg.sources}
        # A "writeKey" member with a string no longer than the longest key as JSON may write
        # it (each character escaped at worst: 12 for one outside the BMP): each try is
        # bounded by that, not by the body.
        longest = max((12 * len(key) for key in self._sources), default=0)
        self._body_key = re.compile(
            rb'"writeKey"\s{0,64}:\s{0,64}("(?:[^"\\]|\\.){0,%d}")' % longest
        )
        self._rejections = Throttle(per_s=REJECTED_LINES_PER_S, burst=REJECTED_LINES_BURST)
        self._commit_failures = Throttle(per_s=1.0, burst=10)
        self._skip_invalid = cfg.server.invalid_events == "skip"
        self._skips = Throttle(per_s=REJECTED_LINES_PER_S, burst=REJECTED_LINES_BURST)
        self._commit_failed_at: float | None = None  # since the last commit that worked
        self._fill_ip = frozenset(s.name for s in cfg.sources if s.fill_ip)
        self._client_ip = ClientIP(cfg.server.trusted_proxies)
        subscribed = {
            s.name: [d for d in cfg.destinations if d.enabled and s.name in d.sources]
            for s in cfg.sources
        }
        self._fanout = {source: tuple(d.name for d in ds) for source, ds in subscribed.items()}
        # (name, its key in an event's `integrations`), for the events that have one.
        self._routes = {
            source: tuple((d.name, d.integrations_key or d.name) for d in ds)
            for source, ds in subscribed.items()
        }
        self._auth_cache: dict[str, Any] = {}  # str, None or _MALFORMED
        self._received_cache: tuple[int, datetime, str] = (-1, datetime.now(UTC), "")
        self.ready = False  # /healthz and ingest answer 503 until ready and after draining
        self.draining = False

    def attach(self, writer: Writer, dedupe: Dedupe) -> None:
        """The store, once open; ingest still answers 503 until `ready`."""
        self._writer = writer
        # One object for every request, so the writer batches them into one call.
        self._insert = functools.partial(q.insert_many, dedupe=dedupe)

    def app(self) -> web.Application:
        # client_max_size bounds the raw body; the decompressed size is bounded in _body().
        app = web.Application(client_max_size=self._server.max_request_bytes)
        app.router.add_get("/healthz", self.healthz)
        for path, etype in _ROUTES.items():
            app.router.add_post(path, self._handler(etype), expect_handler=self._expect)
            app.router.add_route("OPTIONS", path, self._preflight)
        # Last, so it only gets what no route above takes: an unknown path, or a known one
        # with another method. aiohttp's own answers to those are plain text.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._unrouted)  # newlines too (%0a)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        failed_at = self._commit_failed_at
        if failed_at is not None and abs(self._clock() - failed_at) > STORE_FAILING_S:
            # Let traffic try again: only a commit tells the disk is back (abs: a clock
            # stepped back must not keep it from ever being asked).
            failed_at = None
        if self.ready and not self.draining and failed_at is None:
            return web.json_response({"status": "ok"})
        if self.draining or not self.ready:
            state = "draining" if self.draining else "starting"
            return web.json_response({"status": state}, status=503)
        # The last commit failed (a full disk, say): ingest answers 503, and says so here,
        # for a load balancer to send the traffic elsewhere meanwhile.
        body = {"status": "failing", "detail": "events cannot be stored: see commit_failed"}
        return web.json_response(body, status=503)

    def _handler(self, endpoint_type: str | None):
        async def handle(request: web.Request) -> web.Response:
            try:
                response = await self._accept(request, endpoint_type)
            except Rejected as exc:
                self._log_rejected(request, exc.status, exc.error)
                response = error_response(exc.status, exc.error, exc.detail)
            return _cors(request, response)

        return handle

    async def _expect(self, request: web.Request) -> web.Response | None:
        """`Expect: 100-continue`: what can be refused from the head alone (starting or
        draining, an unknown write key in the header, a declared size over the limit) is
        refused before the client sends the body; otherwise it is asked for."""
        try:
            self._check_head(request)
            declared, limit = request.content_length, self._server.max_request_bytes
            if declared is not None and declared > limit:
                raise Rejected(413, "request too large", f"over {limit} bytes")
        except Rejected as exc:
            self._log_rejected(request, exc.status, exc.error)
            response = error_response(exc.status, exc.error, exc.detail)
            response.force_close()  # its body was not sent: the connection cannot go on
            return _cors(request, response)
        if request.version < HttpVersion11:
            return None  # an HTTP/1.0 client's expectation is ignored (RFC 9110 10.1.1)
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            detail = f"Expect: {expect[:100]!r} is not 100-continue"
            return _cors(request, error_response(417, "expectation failed", detail))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (as aiohttp's own: the answer has not begun)
        return None

    async def _unrouted(self, request: web.Request) -> web.Response:
        allowed = _ALLOWED.get(request.path)
        if allowed is None:
            detail = (
                f"no endpoint at {request.path}; events go to /v1/track, /v1/identify, "
                "/v1/page, /v1/screen, /v1/group, /v1/alias or /v1/batch"
            )
            response = error_response(404, "not found", detail)
        else:
            detail = f"{request.method} {request.path}: this endpoint takes {allowed}"
            response = error_response(405, "method not allowed", detail)
            response.headers["Allow"] = allowed
        self._log_rejected(request, response.status)
        return _cors(request, response)

    def _log_rejected(self, request: web.Request, status: int, error: str | None = None) -> None:
        """A line for a refused request, as long as they do not come too fast: anyone can
        send them, without a write key (5,000 lines a second from one client)."""
        more = self._rejections.fields()
        if more is None:
            return
        if error:
            more["error"] = error
        # The path is the client's, up to 8 KB: a scanner's would flood the log.
        log.info("request_rejected", path=request.path[:200], status=status, **more)

    async def _preflight(self, request: web.Request) -> web.Response:
        """CORS preflight, for analytics.js on any site (a write key is public, as at Segment;
        no cookies are used, so no credentials are allowed). Browsers send it before a POST
        with a header beyond the few a form could send: analytics.js sends `Authorization`
        (and `X-Retry-Count` on retries), so it comes before the first POST to each path."""
        headers = {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Max-Age": "86400",
            "Vary": "Access-Control-Request-Headers",
        }
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            headers["Access-Control-Allow-Headers"] = requested
        return web.Response(status=204, headers=headers)

    @staticmethod
    def _no_key_detail(request: web.Request) -> str:
        if "Authorization" in request.headers:
            return _NOT_BASIC_DETAIL
        return "send the write key as HTTP Basic user name or as writeKey"

    def _known_key_in(self, raw: bytes) -> bool:
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

    def _check_head(self, request: web.Request) -> str | None:
        """What the request's head alone refuses (starting or draining; an Authorization
        header with an unknown or malformed write key); the header's write key, if any."""
        if not self.ready or self.draining:
            raise Rejected(503, "unavailable", "the daemon is starting or shutting down; retry")
        header_key = self._auth(request.headers.get("Authorization"))
        if header_key is not None and header_key not in self._sources:
            if header_key is _MALFORMED:
                raise Rejected(401, "unauthorized", _MALFORMED_DETAIL)
            raise Rejected(401, "unauthorized", "unknown write key")
        return header_key

    async def _accept(self, request: web.Request, endpoint_type: str | None) -> web.Response:
        header_key = self._check_head(request)
        raw = await self._body(request)
        if header_key is None and len(raw) > _SCAN_BODY_KEY_OVER and not self._known_key_in(raw):
            if b'"writeKey"' not in raw:
                raise Rejected(401, "unauthorized", self._no_key_detail(request))
            raise Rejected(401, "unauthorized", "unknown write key")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            body = _loads_lone_surrogates(raw, exc)
        key = header_key
        if key is None and isinstance(body, dict):
            key = body.get("writeKey")
        if not isinstance(key, str) or not key:
            if key is not None and key != "":
                detail = f"writeKey must be a string, not {type(key).__name__}"
            else:
                detail = self._no_key_detail(request)
            raise Rejected(401, "unauthorized", detail)
        source = self._sources.get(key)
        if source is None:
            raise Rejected(401, "unauthorized", "unknown write key")
        now_s = self._clock()
        ip = None
        if source in self._fill_ip:
            forwarded_for = request.headers.getall("X-Forwarded-For", ())
            ip = self._client_ip.of(request.remote, forwarded_for)
        destinations = self._fanout[source]
        events, only, skipped = self._prepare(
            body, endpoint_type, now_s, ip, destinations, self._routes[source]
        )
        # The parsed body (a few containers per event) must not stay alive while the commit
        # is awaited: with 64 requests in flight, the cyclic collector kept walking them all.
        del body, raw
        # Valid but subscribed to by nothing: nothing to store (nor to dedupe later).
        if events and destinations:
            now_ms = int(now_s * 1000)
            cutoff = now_ms - int(self._server.dedupe_window_s * 1000)
            try:
                stored = q.IngestRequest(source, events, destinations, now_ms, cutoff, only)
                assert self._writer is not None and self._insert is not None  # ready: attached
                await self._writer.run_batched(self._insert, stored, urgent=True)
            except StoreError as exc:
                # Not the client's fault and not lost: no 200, so the client sends it again.
                self._commit_failed_at = self._clock()
                more = self._commit_failures.fields()  # one a request: 575 lines a second
                if more is not None:
                    log.error("commit_failed", error=str(exc) + descriptors.note(), **more)
                raise Rejected(503, "unavailable", "could not store the events; retry") from None
            self._commit_failed_at = None
            self._on_commit(destinations)
        if skipped:
            return self._skipped(request, source, skipped)
        return web.Response(body=_OK, headers=_JSON)

    def _skipped(self, request: web.Request, source: str, skipped: list[str]) -> web.Response:
        """200, as Segment answers a request with invalid events among valid ones: the rest
        are stored. The answer and a log line say which were left out, and why."""
        more = self._skips.fields()
        if more is not None:
            log.warning("events_skipped", source=source, path=request.path[:200],
                        skipped=len(skipped), error=skipped[0], **more)  # fmt: skip
        body = {"success": True, "skipped": len(skipped), "errors": skipped[:_SKIPPED_LISTED]}
        return web.Response(body=orjson.dumps(body), headers=_JSON)

    async def _body(self, request: web.Request) -> bytes:
        limit = self._server.max_request_bytes
        try:
            if request.content.is_eof():  # all of it has arrived (nearly always)
                raw = await request.read()
            else:
                declared = request.content_length
                if declared is not None and declared > limit:  # refused before it is sent
                    raise Rejected(413, "request too large", f"over {limit} bytes")
                # A client that sends it a trickle at a time holds a connection this long.
                async with asyncio.timeout(self._server.body_timeout_s):
                    raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Rejected(413, "request too large", f"over {limit} bytes") from None
        except TimeoutError:
            within = f"the body did not arrive within {self._server.body_timeout_s:g}s"
            raise Rejected(408, "request timeout", within) from None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding not in ("gzip", "x-gzip"):  # (x-gzip: gzip's old name, RFC 9110 8.4.1.3)
            raise Rejected(415, "unsupported Content-Encoding", f"{encoding!r}; use gzip")
        return _gunzip(raw, self._server.max_decompressed_bytes)

    def _auth(self, header: str | None) -> str | None:
        """The write key of an Authorization header (or _MALFORMED); decoded once per
        distinct header."""
        if header is None:
            return None
        key = self._auth_cache.get(header, _MISSING)
        if key is _MISSING:
            if len(self._auth_cache) >= _AUTH_CACHE_SIZE:
                self._auth_cache.clear()  # bounded: junk headers cannot grow it
            key = self._auth_cache[header] = _basic_user(header)
        return key  # type: ignore[return-value]

    def _received(self, now_s: float) -> tuple[datetime, str]:
        """receivedAt as a datetime and as text; the text is reused within a millisecond."""
        now_ms = int(now_s * 1000)
        if now_ms != self._received_cache[0]:
            at = datetime.fromtimestamp(now_ms / 1000, UTC)
            self._received_cache = (now_ms, at, spec.format_timestamp(at))
        return self._received_cache[1], self._received_cache[2]

    def _check_merged_size(self, body: object) -> None:
        """Refused before the batch's context and integrations are copied into each message:
        the copies alone took hundreds of MB for a body of a few KB."""
        if not isinstance(body, dict) or not isinstance(batch := body.get("batch"), list):
            return
        shared = [body.get(key) for key in ("context", "integrations")]
        shared = [value for value in shared if isinstance(value, dict) and value]
        if not shared:
            return
        try:
            copied = len(batch) * sum(len(orjson.dumps(value)) for value in shared)
        except TypeError:  # nested too deep to write: each event is refused for it, below
            return
        if copied > self._server.max_merged_bytes:
            raise Rejected(413, "request too large", self._merged_detail())

    def _merged_detail(self) -> str:
        return (
            f"its events take over {self._server.max_merged_bytes} bytes once the batch's "
            "context and integrations are merged into each (server.max_merged_size)"
        )

    def _prepare(
        self,
        body: object,
        endpoint_type: str | None,
        now_s: float,
        ip: str | None,
        destinations: Sequence[str],
        routes: Sequence[tuple[str, str]],
    ) -> tuple[list[IncomingEvent], list[Sequence[str]] | None, list[str]]:
        """The events of `body`, validated, enriched and serialized; `ip` goes into the
        `context.ip` of each event that has none (Segment does so for client-side sources;
        an event that wants no address recorded sends its own, such as "0.0.0.0"). With them,
        each event's own destinations if an event's `integrations` turns some of the source's
        `destinations` off (`routes`: each with its key there), else None; and, with
        `server.invalid_events = "skip"`, why each invalid event was left out (else an
        invalid event refuses the request)."""
        if endpoint_type is None:
            # Counted before anything is copied into each message: 2 KB of gzip can hold
            # 700,000 empty ones.
            batch = body.get("batch") if isinstance(body, dict) else None
            limit = self._server.max_batch_events
            if isinstance(batch, list) and len(batch) > limit:
                raise Rejected(400, "batch too large", f"{len(batch)} events; at most {limit}")
            self._check_merged_size(body)
        try:
            messages = spec.expand(body, endpoint_type, lenient=self._skip_invalid)
        except spec.SpecError as exc:
            raise Rejected(400, "invalid request", str(exc)) from None
        received_at, received_text = self._received(now_s)
        max_bytes = self._server.max_event_bytes + _ENRICH_ALLOWANCE
        prefix = "batch[{}]." if endpoint_type is None else ""
        events = []
        only: list[Sequence[str]] | None = None
        skipped: list[str] = []
        total = 0
        for index, message in enumerate(messages):
            path = prefix.format(index)
            try:
                times = spec.check(message, path)
                if ip is not None:
                    spec.fill_ip(message, ip)
                spec.enrich(
                    message, received_at, times=times, received_text=received_text, path=path
                )
                payload = orjson.dumps(message)
            except (spec.SpecError, TypeError) as exc:
                if isinstance(exc, spec.SpecError):
                    why = str(exc)
                else:  # orjson writes at most 254 levels of nesting
                    deep = "nested more than 254 levels deep" if "Recursion" in str(exc) else exc
                    why = f"{path or 'body'}: {deep}"
                if not self._skip_invalid:
                    raise Rejected(400, "invalid event", why) from None
                skipped.append(why)
                continue
            if len(payload) > max_bytes:
                where = f"batch[{index}]" if endpoint_type is None else "event"
                raise Rejected(
                    413,
                    "event too large",
                    f"{where}: {len(payload)} bytes with destfnd's fields; at most "
                    f"{self._server.max_event_bytes} + {_ENRICH_ALLOWANCE}",
                )
            total += len(payload)
            if total > self._server.max_merged_bytes:
                raise Rejected(413, "request too large", self._merged_detail())
            integrations = message.get("integrations")
            targets = spec.routed(routes, integrations) if integrations else None
            if targets is not None and only is None:
                only = [destinations] * len(events)
            if only is not None:
                only.append(destinations if targets is None else targets)
            events.append(IncomingEvent(message["messageId"], payload))
        return events, only, skipped


# Each escape in a JSON text, left to right (so "\\\\" is one escape and the next character
# starts none): a valid surrogate pair (kept), a lone surrogate (1, replaced), anything else.
_ESCAPES = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})|\\.",
    re.DOTALL,
)


def _cors(request: web.Request, response: web.Response) -> web.Response:
    if "Origin" in request.headers:  # a browser: let the page's script read the answer
        # (No Vary: Origin: answers to POST are not cached.)
        response.headers["Access-Control-Allow-Origin"] = "*"
    return response


def _replace_lone(match: re.Match[bytes]) -> bytes:
    return b"\\ufffd" if match.group(1) else match.group(0)


def _loads_lone_surrogates(raw: bytes, error: orjson.JSONDecodeError) -> object:
    """A body orjson refused only for a lone surrogate escape (`"\\ud83d"` with no low half,
    as JSON.stringify writes a string cut in the middle of an emoji), parsed with each lone
    surrogate replaced by U+FFFD, as Go's encoding/json does (so nothing is lost); any other
    malformed body is refused with orjson's error."""
    if "surrogate" not in str(error):
        raise Rejected(400, "malformed JSON", str(error))
    try:
        return orjson.loads(_ESCAPES.sub(_replace_lone, raw))
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")  # orjson says "surrogates not allowed" for any bad byte
        except UnicodeDecodeError as bad:
            detail = f"the body is not UTF-8: byte {bad.start} is 0x{raw[bad.start]:02x}"
            raise Rejected(400, "malformed JSON", detail) from None
        raise Rejected(400, "malformed JSON", str(exc)) from None


_GZIP_MEMBERS = 16


def _gunzip(raw: bytes, cap: int) -> bytes:
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


def _basic_user(header: str | None) -> str | Any:
    """The user name of an HTTP Basic header (Segment's write key), None if there is no Basic
    header, `_MALFORMED` if it holds no user name."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
        return _MALFORMED
    return decoded.partition(":")[0] or _MALFORMED
