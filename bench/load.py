"""Load generator for bench.py: one measured phase per invocation, JSON result on stdout.

Modes (every loop is bounded in count and time):
  closed  C keep-alive connections send back to back for warm-up + duration seconds
  paced   open loop: request i is scheduled at t0 + i/rate; latency is measured from the
          scheduled time (coordinated omission corrected), for warm-up + duration seconds
  fill    send exactly --total-events events in bodies of --events, C at a time

Clients: `raw` (default) is a minimal HTTP/1.1 keep-alive client on asyncio protocols,
cheap enough that one core of it can saturate an aiohttp server on the other core;
`aiohttp` is aiohttp's ClientSession (about 3x more CPU per request, see README).
Bodies are Segment-spec events with a fresh messageId each (the daemon dedupes ids); with
--stamp each event also carries properties.bench_t = time.time() when it is sent, from which
sink.py computes per-event delivery latency (GET /_latency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import sys
import time
import uuid
from collections import Counter, deque

import orjson

_now = time.perf_counter  # uvloop's loop.time() has only millisecond resolution

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

_MID = b"@@MID@@"
_EVENT = orjson.dumps(
    {
        "type": "track",
        "event": "Order Completed",
        "userId": "user-4711",
        "anonymousId": "507f191e810c19729de860ea",
        "messageId": "@@MID@@",
        "timestamp": "2024-05-01T12:00:00.123Z",
        "properties": {
            "orderId": "50314b8e9bcf000000000000",
            "total": 27.5,
            "revenue": 25.0,
            "currency": "USD",
            "products": [
                {
                    "product_id": "507f1f77bcf86cd799439011",
                    "sku": "45790-32",
                    "price": 19.0,
                    "quantity": 1,
                    "name": "Monopoly: 3rd Edition",
                },
            ],
        },
        "context": {
            "ip": "127.0.0.1",
            "library": {"name": "analytics-python", "version": "2.3.2"},
            "userAgent": "bench/1.0",
        },
    }
)


class Bodies:
    """Request bodies with unique messageIds: one event, or {"batch": [n events]}."""

    def __init__(
        self, prefix: str, events: int, stamp: bool = False, sequential: bool = False
    ) -> None:
        self.prefix = prefix.encode()
        self.sequential = sequential
        self.events = events
        self.parts = _EVENT.split(_MID)
        assert len(self.parts) == 2
        self.stamp = stamp
        if stamp:  # properties.bench_t = time.time() when the body is made (just before sending)
            tail = self.parts[1].split(b'"properties":{', 1)
            assert len(tail) == 2
            self.parts = [self.parts[0], tail[0] + b'"properties":{"bench_t":', b"," + tail[1]]
        self.counter = itertools.count()

    def one(self) -> bytes:
        if self.sequential:
            mid = self.prefix + b"-%d" % next(self.counter)
        else:  # random like Segment's SDKs (analytics-python: uuid4)
            mid = str(uuid.uuid4()).encode()
        if self.stamp:
            return self.parts[0] + mid + self.parts[1] + b"%.6f" % time.time() + self.parts[2]
        return self.parts[0] + mid + self.parts[1]

    def make(self, n: int | None = None) -> bytes:
        n = self.events if n is None else n
        if self.events == 1 and n == 1:
            return self.one()
        return b'{"batch":[' + b",".join(self.one() for _ in range(n)) + b"]}"


# -- raw HTTP/1.1 client -------------------------------------------------------------------


class RawConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        if i < 0:
            self._fail(ConnectionError("response without Content-Length"))
            return
        j = head.find(b"\r\n", i + 2)
        length = int(head[i + 17 : j if j > 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        close = b"\r\nconnection: close" in head
        del self.buf[:total]
        waiter, self.waiter = self.waiter, None
        if close:
            self.closed = True
            self.transport.close()
        if not waiter.done():
            waiter.set_result(status)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.waiter = None

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        self.waiter = None

    async def request(self, data: bytes) -> int:
        if self.closed:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class RawClient:
    def __init__(self, host: str, port: int, path: str, auth: str | None, max_conns: int) -> None:
        self.host, self.port = host, port
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
        if auth:
            head.append("Authorization: Basic " + base64.b64encode(f"{auth}:".encode()).decode())
        self.head = ("\r\n".join(head) + "\r\nContent-Length: ").encode()
        self.max_conns = max_conns
        self.idle: list[RawConn] = []
        self.count = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def connect(self) -> RawConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(RawConn, self.host, self.port)
        return proto

    async def get(self) -> RawConn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.count -= 1
        if self.count < self.max_conns:
            self.count += 1
            try:
                return await self.connect()
            except BaseException:
                self.count -= 1
                raise
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def put(self, conn: RawConn) -> None:
        if conn.closed:
            self.count -= 1
            if self.waiters:
                self.count += 1
                asyncio.get_running_loop().create_task(self._replace(self.waiters.popleft()))
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)

    async def _replace(self, fut: asyncio.Future) -> None:
        try:
            conn = await self.connect()
        except OSError as exc:
            self.count -= 1
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(conn)
        else:
            self.put(conn)

    async def post(self, body: bytes) -> int:
        conn = await self.get()
        try:
            return await conn.request(self.head + b"%d\r\n\r\n" % len(body) + body)
        finally:
            self.put(conn)

    async def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


class AiohttpClient:
    def __init__(self, url: str, auth: str | None, max_conns: int) -> None:
        import aiohttp

        self.url = url
        self.headers = {"Content-Type": "application/json"}
        if auth:
            self.headers["Authorization"] = (
                "Basic " + base64.b64encode(f"{auth}:".encode()).decode()
            )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_conns),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def post(self, body: bytes) -> int:
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            await resp.read()
            return resp.status

    async def close(self) -> None:
        await self.session.close()


# -- measurement ---------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None}
    v = sorted(values)

    def p(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 3)

    return {
        "p50": p(0.50),
        "p90": p(0.90),
        "p99": p(0.99),
        "p999": p(0.999),
        "max": round(v[-1] * 1000, 3),
    }


async def closed(args, client, bodies: Bodies) -> dict:
    start = _now()
    measure_from = start + args.warmup
    end = measure_from + args.duration
    lat: list[float] = []
    ok = 0
    all_ok = 0  # warm-up included: to divide the server's CPU time by
    errors: Counter = Counter()

    async def worker() -> None:
        nonlocal ok, all_ok
        while True:
            body = bodies.make()
            t0 = _now()
            if t0 >= end:
                return
            try:
                status = await client.post(body)
            except (OSError, ConnectionError) as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)
                continue
            t1 = _now()
            all_ok += status == 200
            if measure_from <= t1 <= end:  # completions inside the window
                if status == 200:
                    ok += 1
                    lat.append(t1 - t0)
                else:
                    errors[str(status)] += 1

    cpu0 = time.process_time()
    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(args.concurrency))),
        args.warmup + args.duration + 30,
    )
    cpu = time.process_time() - cpu0
    rps = ok / args.duration
    return {
        "ok": ok,
        "all_ok": all_ok,
        "errors": dict(errors),
        "duration_s": args.duration,
        "requests_per_s": round(rps, 1),
        "events_per_s": round(rps * args.events, 1),
        "latency_ms": percentiles(lat),
        "client_cpu": round(cpu / (args.warmup + args.duration), 3),
    }


async def paced(args, client, bodies: Bodies) -> dict:
    loop = asyncio.get_running_loop()
    total = int(args.rate * (args.warmup + args.duration))
    n_warm = int(args.rate * args.warmup)
    lat: list[float] = []
    lag: list[float] = []
    ok = 0
    errors: Counter = Counter()
    dropped = 0
    inflight: set[asyncio.Task] = set()

    async def one(i: int, sched: float) -> None:
        nonlocal ok
        body = bodies.make()
        started = _now()
        try:
            status = await client.post(body)
        except (OSError, ConnectionError) as exc:
            if i >= n_warm:
                errors[type(exc).__name__] += 1
            return
        done = _now()
        if i < n_warm:
            return
        if status == 200:
            ok += 1
            lat.append(done - sched)
            lag.append(started - sched)
        else:
            errors[str(status)] += 1

    cpu0 = time.process_time()
    t0 = _now() + 0.05
    interval = 1.0 / args.rate
    i = 0
    hard_end = t0 + args.warmup + args.duration + 5
    while i < total and _now() < hard_end:
        now = _now()
        while i < total and t0 + i * interval <= now:
            if len(inflight) >= args.max_outstanding:
                dropped += 1
            else:
                task = loop.create_task(one(i, t0 + i * interval))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            i += 1
        if i < total:
            # uvloop timers have millisecond resolution: a start may be up to ~1 ms late
            # (reported as client_send_lag_ms, and counted in the latency). Spinning instead
            # made the tails worse on this VM.
            await asyncio.sleep(max(0.0, t0 + i * interval - _now()))
    unfinished = 0
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=10)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
    cpu = time.process_time() - cpu0
    return {
        "rate": args.rate,
        "scheduled": total - n_warm,
        "ok": ok,
        "errors": dict(errors),
        "dropped_over_outstanding_cap": dropped,
        "unfinished": unfinished,
        "duration_s": args.duration,
        "latency_ms": percentiles(lat),
        "client_send_lag_ms": percentiles(lag),
        "client_cpu": round(cpu / (args.warmup + args.duration), 3),
    }


async def fill(args, client, bodies: Bodies) -> dict:
    n_req = -(-args.total_events // args.events)
    next_req = itertools.count()
    sent = 0
    failed = 0
    errors: Counter = Counter()
    start = _now()
    deadline = start + args.max_seconds
    last_report = start

    async def worker() -> None:
        nonlocal sent, failed, last_report
        while _now() < deadline:
            k = next(next_req)
            if k >= n_req:
                return
            n = min(args.events, args.total_events - k * args.events)
            body = bodies.make(n)
            for attempt in range(5):
                try:
                    status = await client.post(body)
                except (OSError, ConnectionError) as exc:
                    status = type(exc).__name__
                if status == 200:
                    sent += n
                    break
                errors[str(status)] += 1
                await asyncio.sleep(0.05 * (attempt + 1))
            else:
                failed += n
            now = _now()
            if args.progress and now - last_report >= 5:
                last_report = now
                print(
                    f"    ... ingested {sent:,}/{args.total_events:,} events "
                    f"({sent / (now - start):,.0f}/s)",
                    file=sys.stderr,
                    flush=True,
                )

    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = _now() - start
    return {
        "events_sent": sent,
        "events_failed": failed,
        "complete": sent == args.total_events,
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(sent / elapsed, 1) if elapsed else None,
        "client_cpu": round((time.process_time() - cpu0) / elapsed, 3) if elapsed else None,
    }


async def main_async(args) -> dict:
    host, _, port = args.url.removeprefix("http://").partition(":")
    port = int(port.split("/")[0])
    max_conns = args.concurrency if args.mode != "paced" else args.max_conns
    if args.client == "raw":
        client = RawClient(host, port, args.path, args.auth, max_conns)
    else:
        client = AiohttpClient(f"http://{host}:{port}{args.path}", args.auth, max_conns)
    bodies = Bodies(args.id_prefix, args.events, stamp=args.stamp, sequential=args.sequential_ids)
    try:
        if args.mode == "closed":
            result = await closed(args, client, bodies)
        elif args.mode == "paced":
            # Open the connections before the clock starts.
            if args.client == "raw":
                conns = [await client.get() for _ in range(min(64, max_conns))]
                for c in conns:
                    client.put(c)
            result = await paced(args, client, bodies)
        else:
            result = await fill(args, client, bodies)
    finally:
        await client.close()
    result.update(
        mode=args.mode,
        client=args.client,
        path=args.path,
        events_per_request=args.events,
        concurrency=args.concurrency,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    p.add_argument("--path", default="/v1/track")
    p.add_argument("--auth", default=None, help="write key, sent as HTTP Basic user name")
    p.add_argument("--mode", choices=["closed", "paced", "fill"], default="closed")
    p.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--events", type=int, default=1, help="events per request (>1: /v1/batch body)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--max-conns", type=int, default=256, help="paced: connection pool cap")
    p.add_argument("--max-outstanding", type=int, default=5000, help="paced: in-flight cap")
    p.add_argument("--total-events", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=900.0, help="fill: give up after")
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--stamp", action="store_true", help="put time.time() in properties.bench_t (sink latency)"
    )
    p.add_argument("--id-prefix", default=f"bench-{os.getpid()}-{int(time.time())}")
    p.add_argument(
        "--sequential-ids",
        action="store_true",
        help="messageIds <id-prefix>-<n> instead of random UUIDs (cheaper for an index)",
    )
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = p.parse_args()
    if args.url.rstrip("/").count("/") > 2:
        p.error("--url is scheme://host:port only; use --path")
    if not args.url.startswith("http://127.0.0.1:"):
        p.error("only http://127.0.0.1 targets are allowed")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    run = uvloop.run if uvloop is not None else asyncio.run
    result = run(main_async(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
