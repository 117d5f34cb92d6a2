"""The Segment HTTP Tracking API: routes, auth, commit, then 200 once every event of the request
is on disk (all or nothing; its body read by ingest_body, its events made by ingest_events).
Bad input gets a 4xx with a JSON body naming the problem; never a 5xx, never a traceback.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable

import orjson
import structlog
from aiohttp import HttpVersion11, web

from destfnd import descriptors, spec
from destfnd.client_ip import ClientIP
from destfnd.config import Config
from destfnd.ingest_auth import WriteKeys
from destfnd.ingest_body import (
    Rejected,
    error_response,
    loads,
    read_body,
    too_large,
)
from destfnd.ingest_events import Messages
from destfnd.ingest_pixel import PIXEL_TYPES, pixel_answer, pixel_body
from destfnd.logs import Throttle
from destfnd.store import StoreError, Writer
from destfnd.store import queue as q
from destfnd.store.dedupe import Dedupe
from destfnd.store.writer import SMALL_BYTES

log = structlog.get_logger("destfnd.ingest")

# After a failed commit, /healthz answers 503 until one works, or for this long after it.
STORE_FAILING_S = 5.0
# Lines for refused requests: so many at once, then so many a second (and a count of the rest).
REJECTED_LINES_BURST = 100
REJECTED_LINES_PER_S = 10.0
_OK = orjson.dumps({"success": True})
_SKIPPED_LISTED = 10  # reasons in the answer to a request with invalid events skipped
_JSON = {"Content-Type": "application/json"}
# A browser posting to a first-party endpoint (analytics.example.com, say) sends the site's
# cookies along: on a heavy site 10-20 KB of them, over aiohttp's 8 KB default for a header,
# which refused the request with a 400 that analytics.js does not retry. The line limit too:
# aiohttp's pure-Python parser holds a header line that arrives in pieces to it. At most this
# many headers (aiohttp's default is 128), so a request's head stays under 2 MiB.
_MAX_HEADER_BYTES = 32 * 1024
_MAX_HEADERS = 64
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
_PIXEL_ROUTES = {f"/v1/pixel/{etype}": etype for etype in PIXEL_TYPES}
_PIXEL_ROUTES |= {f"{path}/": etype for path, etype in _PIXEL_ROUTES.items()}
_ALLOWED = (
    {path: "OPTIONS, POST" for path in _ROUTES}
    | {path: "GET" for path in _PIXEL_ROUTES}
    | {"/healthz": "GET, HEAD"}
)
# Runs of slashes, as an SDK makes of a configured host that ends in "/" (analytics-go
# appends "/v1/batch" to it): taken as one, where a 404 lost the batch.
_SLASHES = re.compile(r"//+")
# Events of accepted requests waiting for their commit, in bytes, at most: a request of more
# than SMALL_BYTES that would go over is answered 503 (SDKs send it again; see _check_room).
PENDING_BYTES_MAX = 256 * 1024 * 1024
_BUSY_DETAIL = "too many events are waiting to be stored (over 256 MB); retry"


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
        self._keys = WriteKeys({s.write_key.value: s.name for s in cfg.sources})
        self._rejections = Throttle(per_s=REJECTED_LINES_PER_S, burst=REJECTED_LINES_BURST)
        self._commit_failures = Throttle(per_s=1.0, burst=10)
        self._prepare = Messages(cfg.server).prepare
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
        self._posts: dict[str, Callable] = {}  # path -> its POST handler, for _unrouted
        self._pixels: dict[str, Callable] = {}  # and its GET handler, for a pixel's path
        self._waiting_bytes = 0  # of the requests whose commit is awaited (PENDING_BYTES_MAX)
        self.ready = False  # /healthz and ingest answer 503 until ready and after draining
        self.draining = False

    def attach(self, writer: Writer, dedupe: Dedupe) -> None:
        """The store, once open; ingest still answers 503 until `ready`."""
        self._writer = writer
        # One object for every request, so the writer batches them into one call.
        self._insert = functools.partial(q.insert_many, dedupe=dedupe)

    def app(self) -> web.Application:
        # client_max_size bounds the raw body; the decompressed size in ingest_body.read_body.
        app = web.Application(
            client_max_size=self._server.request_limit_bytes,
            handler_args={
                "max_field_size": _MAX_HEADER_BYTES,
                "max_line_size": _MAX_HEADER_BYTES,
                "max_headers": _MAX_HEADERS,
            },
        )
        app.router.add_get("/healthz", self.healthz)
        for path, etype in _ROUTES.items():
            handler = self._posts[path] = self._handler(etype)
            app.router.add_post(path, handler, expect_handler=self._expect)
            app.router.add_route("OPTIONS", path, self._preflight)
        for path, etype in _PIXEL_ROUTES.items():  # no HEAD: it would record an event
            handler = self._pixels[path] = self._pixel(etype)
            app.router.add_get(path, handler, allow_head=False)
        # Last, so it only gets what no route above takes: an unknown path, or a known one
        # with another method. aiohttp's own answers to those are plain text.
        app.router.add_route(
            "*", r"/{tail:[\s\S]*}", self._unrouted, expect_handler=self._expect_unrouted
        )  # (newlines too: %0a)
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
            declared = request.content_length
            if declared is not None and declared > self._server.request_limit_bytes:
                raise too_large(self._server)
        except Rejected as exc:
            self._log_rejected(request, exc.status, exc.error)
            response = error_response(exc.status, exc.error, exc.detail)
            response.force_close()  # its body was not sent: the connection cannot go on
            return _cors(request, response)
        return await self._continue(request)

    async def _expect_unrouted(self, request: web.Request) -> web.Response | None:
        """The catch-all route's: an ingest POST reached through a run of slashes is checked
        as on its own path; anything else is only asked for its body (or a JSON 417)."""
        if request.method == "POST" and _SLASHES.sub("/", request.path) in self._posts:
            return await self._expect(request)
        return await self._continue(request)

    @staticmethod
    async def _continue(request: web.Request) -> web.Response | None:
        if request.version < HttpVersion11:
            return None  # an HTTP/1.0 client's expectation is ignored (RFC 9110 10.1.1)
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            detail = f"Expect: {expect[:100]!r} is not 100-continue"
            return _cors(request, error_response(417, "expectation failed", detail))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (as aiohttp's own: the answer has not begun)
        return None

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        path = _SLASHES.sub("/", request.path)
        if path != request.path:  # ("/v1//batch": a host configured with a trailing "/")
            if request.method == "POST" and path in self._posts:
                return await self._posts[path](request)
            if request.method == "OPTIONS" and path in _ROUTES:
                return await self._preflight(request)
            if request.method in ("GET", "HEAD") and path == "/healthz":
                return await self.healthz(request)
            if request.method == "GET" and path in self._pixels:
                return await self._pixels[path](request)
        allowed = _ALLOWED.get(path)
        if allowed is None:
            detail = (
                f"no endpoint at {request.path}; events go to /v1/track, /v1/identify, "
                "/v1/page, /v1/screen, /v1/group, /v1/alias or /v1/batch (POST), or to "
                "/v1/pixel/<type> (GET)"
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
        # The path is the client's, up to 32 KiB: a scanner's would flood the log.
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

    def _check_head(self, request: web.Request) -> str | None:
        """What the request's head alone refuses (starting or draining; an Authorization
        header with an unknown or malformed write key); the header's write key, if any."""
        if not self.ready or self.draining:
            raise Rejected(503, "unavailable", "the daemon is starting or shutting down; retry")
        return self._keys.of_header(request)

    async def _accept(self, request: web.Request, endpoint_type: str | None) -> web.Response:
        header_key = self._check_head(request)
        raw = await read_body(request, self._server)
        self._keys.check_big_body(request, header_key, raw)
        self._check_room(len(raw))  # before the parse: a refusal costs it nothing
        body = loads(raw)
        source = self._keys.source(request, header_key, body)
        stored, skipped = self._events(request, source, body, endpoint_type)
        # The parsed body (a few containers per event) must not stay alive while the commit
        # is awaited: with 64 requests in flight, the cyclic collector kept walking them all.
        del body, raw
        await self._commit(stored)
        if skipped:
            return self._skipped(request, source, skipped)
        return web.Response(body=_OK, headers=_JSON)

    def _events(
        self, request: web.Request, source: str, body: object, endpoint_type: str | None
    ) -> tuple[q.IngestRequest | None, list[str]]:
        """What to commit of `body` for `source` (None: nothing, as nothing subscribes to it
        or every event was skipped), and why each event skipped was (`invalid_events`)."""
        now_s = self._clock()
        ip = None
        if source in self._fill_ip:
            forwarded_for = request.headers.getall("X-Forwarded-For", ())
            ip = self._client_ip.of(request.remote, forwarded_for)
        destinations = self._fanout[source]
        events, only, skipped, size = self._prepare(
            body, endpoint_type, now_s, ip, destinations, self._routes[source]
        )
        # Valid but subscribed to by nothing: nothing to store (nor to dedupe later).
        if not (events and destinations):
            return None, skipped
        now_ms = int(now_s * 1000)
        cutoff = now_ms - int(self._server.dedupe_window_s * 1000)
        return q.IngestRequest(source, events, destinations, now_ms, cutoff, only, size), skipped

    def _check_room(self, size: int) -> None:
        """A 503 for a request of more than SMALL_BYTES that would put the events waiting
        for their commit over PENDING_BYTES_MAX (none if nothing else waits): without it, what
        clients had waiting was bounded by the number of connections alone, and a few KB of
        gzip can be 8 MB of events. Small requests (single events, pixels) always go in."""
        if size > SMALL_BYTES and self._waiting_bytes:
            if self._waiting_bytes + size > PENDING_BYTES_MAX:
                raise Rejected(503, "busy", _BUSY_DETAIL)

    async def _commit(self, stored: q.IngestRequest | None) -> None:
        if stored is None:
            return
        size = stored.size
        self._check_room(size)
        self._waiting_bytes += size
        try:
            assert self._writer is not None and self._insert is not None  # ready: attached
            await self._writer.run_batched(self._insert, stored, urgent=True, size=size)
        except StoreError as exc:
            # Not the client's fault and not lost: no 200, so the client sends it again.
            self._commit_failed_at = self._clock()
            more = self._commit_failures.fields()  # one a request: 575 lines a second
            if more is not None:
                log.error("commit_failed", error=str(exc) + descriptors.note(), **more)
            raise Rejected(503, "unavailable", "could not store the events; retry") from None
        finally:
            self._waiting_bytes -= size
        self._commit_failed_at = None
        self._on_commit(stored.destinations)

    def _pixel(self, endpoint_type: str):
        async def handle(request: web.Request) -> web.Response:
            """Segment's Tracking Pixel API: the event in the query, a GIF back (200 even
            when refused, as Segment answers: see ingest_pixel)."""
            try:
                header_key = self._check_head(request)
                body = pixel_body(request.query.items())
                source = self._keys.source(request, header_key, body)
                stored, skipped = self._events(request, source, body, endpoint_type)
                del body  # (not kept while the commit is awaited: see _accept)
                await self._commit(stored)
            except Rejected as exc:
                self._log_rejected(request, exc.status, exc.error)
                return pixel_answer(exc)
            if skipped:
                self._skipped(request, source, skipped)  # (its log line)
                return pixel_answer(skipped=skipped[0])
            return pixel_answer()

        return handle

    def _skipped(self, request: web.Request, source: str, skipped: list[str]) -> web.Response:
        """200, as Segment answers a request with invalid events among valid ones: the rest
        are stored. The answer and a log line say which were left out, and why."""
        more = self._skips.fields()
        if more is not None:
            log.warning("events_skipped", source=source, path=request.path[:200],
                        skipped=len(skipped), error=skipped[0], **more)  # fmt: skip
        body = {"success": True, "skipped": len(skipped), "errors": skipped[:_SKIPPED_LISTED]}
        return web.Response(body=orjson.dumps(body), headers=_JSON)


def _cors(request: web.Request, response: web.Response) -> web.Response:
    if "Origin" in request.headers:  # a browser: let the page's script read the answer
        # (No Vary: Origin: answers to POST are not cached.)
        response.headers["Access-Control-Allow-Origin"] = "*"
    return response
