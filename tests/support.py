"""Test support: a recording HTTP sink and the real `destfnd serve` process.

Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anyio
import orjson
from aiohttp import web
from multidict import CIMultiDict

WRITE_KEY = "wk_test_web"
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
FIXTURES = Path(__file__).parent / "fixtures" / "segment-docs"


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: str = "ok"


@dataclass
class Received:
    at: float  # time.time() when the request arrived
    body: bytes
    headers: dict[str, str]
    status: int  # what the sink answered
    raw_path: str = ""  # the request line's target, as it came

    def events(self) -> list[dict]:
        data = orjson.loads(self.body)
        return data if isinstance(data, list) else [data]


class Sink:
    """A fake destination: records every request, answers per `script(n, request)`."""

    def __init__(self, script: Callable[[int, Received], Reply] | None = None) -> None:
        self.script = script or (lambda n, r: Reply())
        self.requests: list[Received] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Sink:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/in"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        rec = Received(
            time.time(), await request.read(), dict(request.headers), 0, request.raw_path
        )
        reply = self.script(len(self.requests), rec)
        rec.status = reply.status
        self.requests.append(rec)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return web.Response(status=reply.status, text=reply.body, headers=reply.headers)

    def delivered(self) -> list[dict]:
        """Every event of every 2xx-answered request, in arrival order."""
        return [e for r in self.requests if 200 <= r.status < 300 for e in r.events()]

    def delivered_ids(self) -> set[str]:
        return {e["messageId"] for e in self.delivered()}

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        try:
            with anyio.fail_after(timeout_s):
                while not predicate():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(
                f"sink condition not met in {timeout_s}s; {len(self.requests)} requests"
            ) from None


def config_text(
    db: Path,
    destinations: str,
    *,
    server: str = "",
    sources: str = f'[[sources]]\nname = "web"\nwrite_key = "{WRITE_KEY}"\n',
) -> str:
    return (
        f'[server]\nlisten = "127.0.0.1:0"\ndrain_timeout = "5s"\n{server}\n'
        f'[storage]\npath = "{db}"\n\n[logging]\nlevel = "debug"\nformat = "json"\n\n'
        f"{sources}\n{destinations}"
    )


def webhook(name: str, url: str, **extra: object) -> str:
    lines = [f'[[destinations]]\nname = "{name}"\ntype = "webhook"\nurl = "{url}"']
    tables = {k: v for k, v in extra.items() if isinstance(v, dict)}
    for key, value in extra.items():
        if key not in tables:
            lines.append(f"{key} = {_toml(value)}")
    for key, table in tables.items():
        lines.append(f"[destinations.{key}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return orjson.dumps(value).decode()  # JSON strings, numbers and arrays are valid TOML


# Runs the command after it with RLIMIT_NOFILE set to its two arguments.
_WITH_OPEN_FILES = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


class DaemonProcess:
    """The real `destfnd serve`, started from a config file in tmp_path."""

    def __init__(
        self,
        tmp_path: Path,
        config: str,
        env: dict[str, str] | None = None,
        open_files: tuple[int, int] | None = None,  # its RLIMIT_NOFILE (soft, hard)
    ) -> None:
        self.dir = tmp_path
        self.open_files = open_files
        self.config = tmp_path / "destfnd.toml"
        self.config.write_text(config)
        self.log_path = tmp_path / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log_offset = 0

    async def start(self, timeout_s: float = 20.0, until: str = "daemon_ready") -> DaemonProcess:
        """Start it and wait for the log line `until` ("daemon_listening": the port is open,
        the store may still be opening)."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        argv = [sys.executable, "-m", "destfnd", "serve", "--config", str(self.config)]
        if self.open_files is not None:
            argv = [sys.executable, "-c", _WITH_OPEN_FILES, *map(str, self.open_files), *argv]
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [e for e in self.log_records() if e.get("event") == until]
            if ready:
                self.url = f"http://{ready[-1]['listen']}"
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in {timeout_s}s: {self.log_text()}")
            await asyncio.sleep(0.05)

    def log_text(self, since_start: bool = True) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[self._log_offset if since_start else 0 :].decode(errors="replace")

    def log_records(self, since_start: bool = True) -> list[dict]:
        records = []
        for line in self.log_text(since_start).splitlines():
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                records.append({"event": "<not json>", "line": line})
        return records

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"daemon did not exit in {timeout_s}s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, "--config", str(self.config), env=self.env)

    def stats(self) -> dict:
        result = self.cli("stats", "--json")
        assert result.returncode == 0, result.stderr
        return orjson.loads(result.stdout)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "destfnd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: object | bytes,
    *,
    auth: bool = True,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    all_headers = CIMultiDict(headers or {})  # a header given twice goes as two lines
    all_headers.setdefault("Content-Type", "application/json")
    if auth:
        all_headers["Authorization"] = AUTH
    async with session.post(url, data=data, headers=all_headers) as resp:
        text = await resp.read()
        try:
            return resp.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return resp.status, {"raw": text.decode(errors="replace")}


class running_daemon:  # lower case: used as `async with running_daemon(cfg) as d:`
    """The real Daemon, in this process: for tests that need no signals or kill -9."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        from destfnd.config import load_config

        path = tmp_path / "destfnd.toml"
        path.write_text(config)
        self.cfg = load_config(path)
        self.url = ""
        self._task: asyncio.Task | None = None

    async def __aenter__(self):
        from destfnd.daemon import Daemon

        self.daemon = Daemon(self.cfg)
        self._task = asyncio.create_task(self.daemon.run(), name="daemon-under-test")
        deadline = time.monotonic() + 10
        while not self.daemon.ready:
            if self._task.done():
                self._task.result()
            assert time.monotonic() < deadline, "daemon not ready in 10s"
            await asyncio.sleep(0.01)
        host, port = self.daemon.bound
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self.daemon.request_stop()
        await asyncio.wait_for(self._task, 30)

    def deliveries(self) -> list[dict]:
        """Every delivery row, oldest first, read from the real SQLite file."""
        import sqlite3

        conn = sqlite3.connect(self.cfg.storage.path)
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(
                "SELECT d.*, e.message_id FROM deliveries d JOIN events e ON e.id = d.event_id "
                "ORDER BY d.id"
            ).fetchall()
        finally:
            conn.close()
        return [dict(r) for r in rows]

    async def wait_for_status(
        self, statuses: set[str], count: int, timeout_s: float = 20.0
    ) -> list[dict]:
        """Wait until `count` deliveries are in one of `statuses`; returns all rows."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.deliveries()
            if sum(r["status"] in statuses for r in rows) >= count:
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not {count} in {statuses} after {timeout_s}s: {rows}")
            await asyncio.sleep(0.02)


def database_at_schema(path: Path, version: int):
    """A new database file as destfnd left it at schema `version` (migrations up to it), for
    upgrade tests; returns an autocommit connection to fill it with."""
    import sqlite3

    from destfnd.store import db as store_db

    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in store_db._migrations():
        if number <= version:
            for statement in store_db._statements(script):
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/in"  # nothing listens once the socket is closed


def process_running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def process_gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether `pid` has exited within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@asynccontextmanager
async def raw_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 (its port) whose `answer` writes HTTP by hand, what an
    aiohttp server would not write (a body that stalls, bytes that are not UTF-8). A client
    that goes away is no error; each connection is closed after its answer, and the answers
    still running are awaited on the way out (`answer` ends them: bounded)."""
    answering: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answering.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.gather(*answering, return_exceptions=True)
