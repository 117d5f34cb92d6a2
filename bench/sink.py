"""A webhook sink for bench.py: counts the events it receives and answers 200.

  POST /<anything>   a webhook delivery (one event, or a JSON array of events)
  GET  /_count       {"events", "requests", "first", "last", "held", "mode"}; first/last are
                     time.time() of the first/last answered delivery since the last reset
  GET  /_latency     {"n", "p50_ms", "p90_ms", "p99_ms", "max_ms", "min_ms"} (?all=1 adds
                     "all_ms", every value in arrival order): for events that carry a
                     client timestamp `properties.bench_t` (time.time() when posted, see
                     load.py --stamp), time.time() at the sink when answered minus bench_t
  POST /_ctl         {"mode": "ok"|"hold", "delay_ms": N, "reset": true}

Modes: "ok" answers 200 after `delay_ms`; "hold" keeps each request open until the mode
becomes "ok" (or --hold-max-s passes: then 503), so a daemon's deliveries stay in flight
while the bench loads its queue. A reset zeroes the counters; requests held from before a
reset are answered 503 and not counted.
Prints {"event": "ready", "listen": "127.0.0.1:PORT"} on stdout once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import orjson
from aiohttp import web

_MAX_LATENCIES = 1_000_000  # bounded memory


class Sink:
    def __init__(self, mode: str, delay_ms: float, hold_max_s: float) -> None:
        self.mode = mode
        self.delay_s = delay_ms / 1000
        self.hold_max_s = hold_max_s
        self.open = asyncio.Event()
        if mode == "ok":
            self.open.set()
        self.gen = 0
        self.held = 0
        self.reset()

    def reset(self) -> None:
        self.events = 0
        self.requests = 0
        self.first: float | None = None
        self.last: float | None = None
        self.latencies: list[float] = []  # seconds, events stamped with properties.bench_t

    async def deliver(self, request: web.Request) -> web.Response:
        body = await request.read()
        data = orjson.loads(body)
        n = len(data) if isinstance(data, list) else 1
        gen = self.gen
        if not self.open.is_set():
            self.held += 1
            try:
                await asyncio.wait_for(self.open.wait(), self.hold_max_s)
            except TimeoutError:
                return web.Response(status=503, text="held too long")
            finally:
                self.held -= 1
        if gen != self.gen:
            return web.Response(status=503, text="held across a reset")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        now = time.time()
        if self.first is None:
            self.first = now
        self.last = now
        self.events += n
        self.requests += 1
        self._latency(data, now)
        return web.Response(text="ok")

    def _latency(self, data, now: float) -> None:
        """Record now - properties.bench_t for stamped events (cheap when not stamped)."""
        first = data[0] if isinstance(data, list) and data else data
        if not isinstance(first, dict):
            return
        props = first.get("properties")
        if not isinstance(props, dict) or "bench_t" not in props:
            return
        if len(self.latencies) >= _MAX_LATENCIES:
            return
        for event in data if isinstance(data, list) else (data,):
            try:
                self.latencies.append(now - float(event["properties"]["bench_t"]))
            except (KeyError, TypeError, ValueError):
                continue

    async def latency(self, request: web.Request) -> web.Response:
        v = sorted(self.latencies)

        def p(q: float) -> float | None:
            return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 3) if v else None

        return web.json_response(
            {
                "n": len(v),
                "p50_ms": p(0.50),
                "p90_ms": p(0.90),
                "p99_ms": p(0.99),
                "max_ms": round(v[-1] * 1000, 3) if v else None,
                "min_ms": round(v[0] * 1000, 3) if v else None,
                **(
                    {"all_ms": [round(x * 1000, 3) for x in self.latencies]}
                    if request.query.get("all")
                    else {}
                ),
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def count(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "events": self.events,
                "requests": self.requests,
                "first": self.first,
                "last": self.last,
                "held": self.held,
                "mode": self.mode,
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def ctl(self, request: web.Request) -> web.Response:
        cmd = orjson.loads(await request.read())
        if cmd.get("reset"):
            self.gen += 1
            self.reset()
        if "delay_ms" in cmd:
            self.delay_s = float(cmd["delay_ms"]) / 1000
        if cmd.get("mode") == "ok":
            self.mode = "ok"
            self.open.set()
        elif cmd.get("mode") == "hold":
            self.mode = "hold"
            self.open = asyncio.Event()
        elif cmd.get("reset") and not self.open.is_set():
            # wake the held requests so they answer 503; keep holding new ones
            old, self.open = self.open, asyncio.Event()
            old.set()
        return await self.count(request)


async def serve_until_signalled(app: web.Application, port: int, on_stop=None) -> None:
    """Serve `app` on 127.0.0.1:`port` (0: any), print the ready line, run until SIGTERM or
    SIGINT, call `on_stop()`, clean up. Shared with bare_server.py."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    sys.stdout.write(orjson.dumps({"event": "ready", "listen": f"{bound[0]}:{bound[1]}"}).decode())
    sys.stdout.write("\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if on_stop is not None:
        on_stop()
    await runner.cleanup()


async def serve(args) -> None:
    sink = Sink(args.mode, args.delay_ms, args.hold_max_s)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/_count", sink.count)
    app.router.add_get("/_latency", sink.latency)
    app.router.add_post("/_ctl", sink.ctl)
    app.router.add_post("/{tail:.*}", sink.deliver)
    await serve_until_signalled(app, args.port, on_stop=lambda: sink.open.set())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mode", choices=["ok", "hold"], default="ok")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--hold-max-s", type=float, default=1800.0)
    p.add_argument("--cpu", type=int, default=None)
    args = p.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
