"""The baseline for bench.py: a bare aiohttp server that reads the body, parses it with orjson
and answers {"success": true}. Same stack as the daemon (aiohttp on uvloop, no access log,
backlog 1024) with no auth, validation, enrichment or storage.

Prints one JSON line {"event": "ready", "listen": "127.0.0.1:PORT"} on stdout once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import orjson
from aiohttp import web
from sink import serve_until_signalled  # bench/ is on sys.path: run as a script

_OK = orjson.dumps({"success": True})


async def handle(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    if not isinstance(body, dict):
        return web.Response(status=400, body=b'{"success":false}', content_type="application/json")
    return web.Response(body=_OK, content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application(client_max_size=500 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    await serve_until_signalled(app, port)


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
