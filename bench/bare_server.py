"""The baseline for bench.py: a bare aiohttp server that reads the body, parses it with orjson
and answers {"success": true}. Same stack as the daemon (aiohttp on uvloop, no access log,
backlog 1024) with no auth, validation, enrichment or storage.

Prints one JSON line {"event": "ready", "listen": "127.0.0.1:PORT"} on stdout once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import orjson
from aiohttp import web

_OK = orjson.dumps({"success": True})


async def handle(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    if not isinstance(body, dict):
        return web.Response(status=400, body=b'{"success":false}', content_type="application/json")
    return web.Response(body=_OK, content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application(client_max_size=500 * 1024)
    app.router.add_post("/{tail:.*}", handle)
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
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cpu", type=int, default=None)
    args = p.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
