"""The daemon's log: every line JSON, aiohttp's and asyncio's records included."""

from __future__ import annotations

import subprocess
import sys

import orjson

SCRIPT = """
import logging
from aiohttp.http_exceptions import BadHttpMessage
from destfnd import logs

logs.setup("info", "json")
logs.setup("info", "json")  # twice (tests, a re-configured CLI): still one line per record
server = logging.getLogger("aiohttp.server")
try:
    raise BadHttpMessage("Duplicate Content-Length:\\n  b'Content-Length: 11'")
except BadHttpMessage:
    server.exception("Error handling request from %s", "127.0.0.1")
try:
    raise ConnectionResetError("Connection lost")
except ConnectionResetError:
    logging.getLogger("asyncio").exception("Task exception was never retrieved")
logging.getLogger("somelib").log(35, "between warning and error")
logging.getLogger("somelib").info("below the root's warning level: dropped")
"""


def test_stdlib_records_are_one_json_line_each_and_client_errors_have_no_traceback():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    client, task, odd = lines
    assert client["event"] == "http_client_error" and client["level"] == "info"
    assert client["error"] == "BadHttpMessage: Duplicate Content-Length: b'Content-Length: 11'"
    assert client["logger"] == "aiohttp.server" and "exception" not in client
    # The same kind of error from the daemon's own task is no client's: kept, with traceback.
    assert task["event"] == "Task exception was never retrieved" and task["level"] == "error"
    assert "ConnectionResetError: Connection lost" in task["exception"]
    assert (odd["event"], odd["level"], odd["logger"]) == (
        "between warning and error",
        "warning",
        "somelib",
    )
