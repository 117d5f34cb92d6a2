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
# Anyone can send malformed requests as fast as they like: a burst of lines, then a rate,
# never the bytes aiohttp quotes (a write key here).
import time
quoted = "Invalid header value char:\\n\\n  b'Authorization: Basic d2tfc2VjcmV0Og=='\\n  ^"
for _ in range(150):
    try:
        raise BadHttpMessage(quoted)
    except BadHttpMessage:
        server.exception("Error handling request from %s", "127.0.0.1")
time.sleep(0.3)
try:
    raise BadHttpMessage("Bad status line 'POST /v1/track?writeKey=wk_secret HTTP/1.1'")
except BadHttpMessage:
    server.exception("Error handling request from %s", "127.0.0.1")
"""


def test_stdlib_records_are_one_json_line_each_and_client_errors_have_no_traceback():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    client, task, odd, *flood = lines
    assert client["event"] == "http_client_error" and client["level"] == "info"
    assert client["error"] == "BadHttpMessage: Duplicate Content-Length"
    assert client["logger"] == "aiohttp.server" and "exception" not in client
    # The same kind of error from the daemon's own task is no client's: kept, with traceback.
    assert task["event"] == "Task exception was never retrieved" and task["level"] == "error"
    assert "ConnectionResetError: Connection lost" in task["exception"]
    assert (odd["event"], odd["level"], odd["logger"]) == (
        "between warning and error",
        "warning",
        "somelib",
    )
    assert {line["event"] for line in flood} == {"http_client_error"}
    assert 99 <= len(flood) <= 102  # the burst of 100 (1 went above), then 10 a second
    assert flood[0]["error"] == "BadHttpMessage: Invalid header value char"
    assert flood[-1]["error"] == "BadHttpMessage: Bad status line"
    assert flood[-1]["not_logged"] >= 48
    assert "d2tfc2VjcmV0" not in done.stderr and "wk_secret" not in done.stderr


def test_throttle_lets_a_burst_then_a_rate_through_and_counts_the_rest():
    now = [100.0]
    from destfnd.logs import Throttle

    throttle = Throttle(per_s=2.0, burst=3, clock=lambda: now[0])
    assert [throttle.allow() for _ in range(5)] == [0, 0, 0, None, None]
    assert throttle.held == 2
    now[0] += 0.4  # 0.8 of a line
    assert throttle.allow() is None
    now[0] += 0.1  # 1.0: the next line goes, with the three held back since the last
    assert throttle.allow() == 3
    assert throttle.held == 0
    now[0] += 1000  # a long quiet: back to the burst, no more
    assert [throttle.allow() for _ in range(4)] == [0, 0, 0, None]


def test_console_lines_escape_what_a_client_sent():
    """On a terminal (the console format), a value from a request, such as the path of a
    refused one, is shown escaped: a client's ESC sequences would clear the operator's
    screen or set its title."""
    script = (
        "import structlog\nfrom destfnd import logs\nlogs.setup('info', 'console')\n"
        "structlog.get_logger().info('request_rejected', path='/\\x1b[2J\\x1b]0;OWNED\\x07x')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (
        "\x1b[2J" not in done.stderr and "\x1b]0;" not in done.stderr and "\x07" not in done.stderr
    )
    assert "/\\x1b[2J\\x1b]0;OWNED\\x07x" in done.stderr


def test_console_tracebacks_escape_what_an_exception_says():
    """A traceback on a terminal is escaped line by line, as values are: an exception's
    message may quote what a client sent or a function wrote."""
    script = (
        "import structlog\nfrom destfnd import logs\nlogs.setup('info', 'console')\n"
        "try:\n    raise ValueError('bad \\x1b]0;OWNED\\x07 name\\nforged: line')\n"
        "except ValueError:\n    structlog.get_logger().exception('unexpected')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b]0;" not in done.stderr and "\x07" not in done.stderr
    # Its line break too: a line of its own could pass for a log line.
    assert "ValueError: bad \\x1b]0;OWNED\\x07 name\\nforged: line\n" in done.stderr
    assert "\nforged: line" not in done.stderr
    assert "Traceback (most recent call last):\n" in done.stderr  # still one line per line


async def test_stray_output_past_the_throttle_is_counted_line_for_line():
    """A worker's stray output beyond what the throttle lets through is counted without
    splitting each line (that took most of the daemon's CPU under a flood): the count must
    still be exact, across chunks and for a line too long to wait for its end."""
    import asyncio
    from types import SimpleNamespace

    from structlog.testing import capture_logs

    from destfnd.logs import Throttle
    from destfnd.sandbox import process

    stdout = asyncio.StreamReader()
    worker = SimpleNamespace(pid=1, proc=SimpleNamespace(stdout=stdout))
    chunks = [
        b"".join(b"line %d\n" % i for i in range(10)) + b"half of line 10",
        b" and its end\nline 11\n",
        b"L" * 70_000,  # no end yet: its start is a line (held back here), the rest dropped
        b"LLL\nline 13\nline 14",  # the long line's end (no line of its own); 14 at EOF
    ]

    async def feed() -> None:  # a chunk at a time, each read before the next comes
        for chunk in chunks:
            stdout.feed_data(chunk)
            while len(stdout._buffer):  # type: ignore[attr-defined]
                await asyncio.sleep(0)
        stdout.feed_eof()

    clock = [0.0]
    throttle = Throttle(per_s=1.0, burst=3, clock=lambda: clock[0])
    with capture_logs() as logged:
        limits = process.OutputLimits(lines=throttle)
        await asyncio.gather(feed(), process._read_output(worker, "fn", str, limits))
    lines = [e for e in logged if e["event"] == "worker_output"]
    assert [e["line"] for e in lines[:3]] == ["line 0", "line 1", "line 2"]
    # 15 lines: lines 0-14 with the long one as line 12; 3 shown, the rest counted at the end.
    assert lines[3:] == [
        {"event": "worker_output", "log_level": "info", "destination": "fn", "pid": 1,
         "line": "", "not_logged": 12}
    ]  # fmt: skip
