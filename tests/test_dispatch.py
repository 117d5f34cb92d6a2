"""Webhook delivery outcomes, retries and batching: the real Daemon in this process, a real
SQLite file and real aiohttp sinks on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from http import HTTPStatus

import aiohttp
import orjson
import pytest
from aiohttp import web
from support import (
    Received,
    Reply,
    Sink,
    closed_port_url,
    config_text,
    post,
    raw_server,
    run_cli,
    running_daemon,
    webhook,
)

FAST_RETRY = {"max_attempts": 5, "max_age": "1h", "backoff_initial": "20ms", "backoff_max": "50ms"}


async def send(d: running_daemon, n: int, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    async with aiohttp.ClientSession() as s:
        body = {"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": i}
                          for i in ids]}  # fmt: skip
        status, reply = await post(s, f"{d.url}/v1/batch", body)
    assert status == 200, reply
    return ids


@pytest.mark.parametrize(
    ("name", "replies", "retry", "final", "requests", "error_type", "error_phrase"),
    [
        ("ok", [Reply(200)], FAST_RETRY, "delivered", 1, None, None),
        ("accepted-202", [Reply(202)], FAST_RETRY, "delivered", 1, None, None),
        ("4xx-discarded-once", [Reply(404, body="no such hook")], FAST_RETRY, "discarded", 1,
         "Bad Request", "HTTP 404"),
        ("400-discarded-once", [Reply(400)], FAST_RETRY, "discarded", 1, "Bad Request",
         "HTTP 400"),
        ("5xx-then-ok", [Reply(500), Reply(503), Reply(200)], FAST_RETRY, "delivered", 3,
         None, None),
        ("408-retried", [Reply(408), Reply(200)], FAST_RETRY, "delivered", 2, None, None),
        ("5xx-until-expired", [Reply(500)] * 3, {**FAST_RETRY, "max_attempts": 3}, "expired",
         3, "Retry", "HTTP 500"),
        ("timeout-retried", [Reply(200, delay_s=1.0), Reply(200)], FAST_RETRY, "delivered", 2,
         None, None),
        ("timeout-until-expired", [Reply(200, delay_s=1.0)] * 2,
         {**FAST_RETRY, "max_attempts": 2}, "expired", 2, "Timeout", "no response"),
        # Not followed: aiohttp would follow a 302 as a GET without the event.
        ("302-not-followed", [Reply(302, headers={"Location": "/moved"})] * 2,
         {**FAST_RETRY, "max_attempts": 2}, "expired", 2, "Retry",
         "HTTP 302 Found to /moved: redirects are not followed"),
        ("308-not-followed-then-ok", [Reply(308, headers={"Location": "/moved"}), Reply(200)],
         FAST_RETRY, "delivered", 2, None, None),
        # No redirect at all: it was said to be one not followed.
        ("304-no-location", [Reply(304)], {**FAST_RETRY, "max_attempts": 1}, "expired", 1,
         "Retry", "HTTP 304 Not Modified: a 3xx answer without a Location; gave up"),
        ("max-age-expires", [Reply(500)] * 5,
         {"max_attempts": 10, "max_age": "1s", "backoff_initial": "800ms",
          "backoff_max": "5s"}, "expired", 2, "Retry", "HTTP 500"),
    ],
)  # fmt: skip
async def test_dispatch_webhook_outcome(
    tmp_path, name, replies, retry, final, requests, error_type, error_phrase
):
    async with Sink(lambda n, r: replies[min(n, len(replies) - 1)]) as sink:
        dest = webhook("hook", sink.url, timeout="300ms", retry=retry)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            rows = await d.wait_for_status({final}, 1)
            await asyncio.sleep(0.2)  # nothing more arrives after a final status
        assert len(sink.requests) == requests
        (row,) = d.deliveries()
        assert row["status"] == final
        assert row["attempts"] == requests
        assert row["last_error_type"] == error_type
        if error_phrase:
            assert error_phrase in row["last_error"]
        assert rows[0]["finished_at"] is not None


async def test_dispatch_waits_grow_by_the_configured_backoff_multiplier(tmp_path):
    """backoff_multiplier reaches the daemon's schedule: with 10 and a first step of 50 ms,
    the steps are 50 ms, 500 ms and 5 s (each wait from half its step to all of it); with
    doubling, the third wait would be at most 200 ms."""
    retry = {"max_attempts": 4, "max_age": "1h", "backoff_initial": "50ms", "backoff_max": "1h",
             "backoff_multiplier": 10}  # fmt: skip
    async with Sink(lambda n, r: Reply(500) if n < 3 else Reply(200)) as sink:
        dest = webhook("hook", sink.url, retry=retry)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            await d.wait_for_status({"delivered"}, 1, timeout_s=30)
    at = [r.at for r in sink.requests]
    waits = [later - earlier for earlier, later in itertools.pairwise(at)]
    assert len(waits) == 3, waits
    # Each wait is at least half its step; the dispatcher may add up to its poll interval.
    for wait, step in zip(waits, (0.05, 0.5, 5.0), strict=True):
        assert step / 2 - 0.01 <= wait <= step + 1.5, waits


async def test_dispatch_connection_refused_is_retried(tmp_path):
    url = closed_port_url()
    dest = webhook("down", url, retry={**FAST_RETRY, "max_attempts": 2})
    async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
        await send(d, 1)
        (row,) = (await d.wait_for_status({"expired"}, 1))[-1:]
    assert row["attempts"] == 2
    assert row["last_error_type"] == "Retry"
    host_port = url.split("//")[1].split("/")[0]
    assert row["last_error"].startswith(
        f"ClientConnectorError: cannot connect to {host_port}: connection refused; gave up"
    )


async def test_dispatch_retry_after_header_is_honoured(tmp_path):
    replies = [Reply(429, headers={"Retry-After": "1"}), Reply(200)]
    async with Sink(lambda n, r: replies[min(n, 1)]) as sink:
        dest = webhook("hook", sink.url, retry=FAST_RETRY)  # backoff alone: 10-20 ms
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            await d.wait_for_status({"delivered"}, 1)
    first, second = sink.requests
    assert second.at - first.at >= 0.95


async def test_dispatch_batches_post_json_arrays_flushed_on_size_and_wait(tmp_path):
    async with Sink() as sink:
        dest = webhook("hook", sink.url, batch={"max_events": 5, "max_wait": "400ms"})
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            sent_at = time.time()
            ids = await send(d, 12)
            await d.wait_for_status({"delivered"}, 12)
    sizes = [len(r.events()) for r in sink.requests]
    assert sorted(sizes) == [2, 5, 5]
    assert all(r.body.startswith(b"[") for r in sink.requests)
    assert sorted(sink.delivered_ids()) == sorted(ids)
    # The partial batch waited for max_wait (a busy machine only makes it later).
    partial = next(r for r in sink.requests if len(r.events()) == 2)
    assert partial.at - sent_at >= 0.38
    assert sink.requests[-1] is partial


async def test_dispatch_failed_batch_is_retried_as_a_whole_with_records_per_event(tmp_path):
    replies = [Reply(500), Reply(200)]
    async with Sink(lambda n, r: replies[min(n, 1)]) as sink:
        dest = webhook(
            "hook", sink.url, batch={"max_events": 3, "max_wait": "50ms"}, retry=FAST_RETRY
        )
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 3)
            rows = await d.wait_for_status({"delivered"}, 3)
    assert [len(r.events()) for r in sink.requests] == [3, 3]
    assert [r["attempts"] for r in rows] == [2, 2, 2]


async def test_dispatch_sources_and_disabled_destinations_fan_out(tmp_path):
    sources = (
        '[[sources]]\nname = "web"\nwrite_key = "wk_test_web"\n'
        '[[sources]]\nname = "ios"\nwrite_key = "wk_ios"\n'
    )
    async with Sink() as web_sink, Sink() as all_sink, Sink() as off_sink:
        dests = (
            webhook("web-only", web_sink.url, sources=["web"])
            + webhook("everything", all_sink.url)
            + webhook("off", off_sink.url, enabled=False)
        )
        cfg = config_text(tmp_path / "db", dests, sources=sources)
        async with running_daemon(tmp_path, cfg) as d:
            await send(d, 2, "web")
            async with aiohttp.ClientSession() as s:
                event = {"userId": "u", "event": "E", "messageId": "ios-0", "writeKey": "wk_ios"}
                assert (await post(s, f"{d.url}/v1/track", event, auth=False))[0] == 200
            await d.wait_for_status({"delivered"}, 5)
    assert web_sink.delivered_ids() == {"web-0", "web-1"}
    assert all_sink.delivered_ids() == {"web-0", "web-1", "ios-0"}
    assert off_sink.requests == []
    assert {r["destination"] for r in d.deliveries()} == {"web-only", "everything"}


async def test_dispatch_failed_response_body_is_recorded_not_logged(tmp_path):
    import sqlite3

    reply = Reply(422, body='{"error": "email a@example.com is invalid"}')
    async with Sink(lambda n, r: reply) as sink:
        dest = webhook("hook", sink.url, retry=FAST_RETRY)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            (row,) = await d.wait_for_status({"discarded"}, 1)
    # The reason phrase is the server's: Python 3.13's http.server names 422 "Unprocessable
    # Content" (RFC 9110), older ones "Unprocessable Entity".
    assert row["last_error"] == f"HTTP 422 {HTTPStatus(422).phrase}"
    conn = sqlite3.connect(d.cfg.storage.path)
    (requests,) = conn.execute("SELECT requests FROM invocations").fetchone()
    conn.close()
    (request,) = orjson.loads(requests)
    assert request["status"] == 422 and "a@example.com" in request["response_body"]


async def test_dispatch_webhook_answer_with_an_endless_body_is_delivered_not_held(tmp_path):
    """A destination that answers 200 and then streams a body without end (or a very large
    one): the event is delivered; destfnd reads at most 1 MB of it, dropping what it reads,
    and does not wait for the rest (it used to read it all into memory, until `timeout`)."""
    sent = {"bytes": 0}

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(16_384):  # 1 GB at most: bounded
                await resp.write(chunk)
                sent["bytes"] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # destfnd closed the connection
        return resp

    app = web.Application()
    app.router.add_post("/in", endless)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        dest = webhook("hook", f"http://127.0.0.1:{port}/in", timeout="5s", retry=FAST_RETRY)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            (row,) = await d.wait_for_status({"delivered", "retrying"}, 1)
        assert (row["status"], row["attempts"]) == ("delivered", 1), row
        assert sent["bytes"] < 64 * 1024 * 1024  # it stopped reading long before the end
    finally:
        await runner.cleanup()


STALLED_ANSWERS = {
    # 200 and its headers at once, then the body a byte at a time, slower than `timeout`.
    "200-slow-body": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", "trickle"),
    # 200 promising 100 bytes, 5 sent, then the connection closed.
    "200-short-body": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", "close"),
    # 429 asking to wait, then no body: the wait asked for is still honoured.
    "429-no-body": (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 10\r\n\r\n",
        "silent",
    ),
    # 400 promising 100 bytes, sending what it has to say, then nothing: what came is kept.
    "400-part-of-body": (
        b'HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\n{"error": "x is invalid"',
        "silent",
    ),
}


@pytest.mark.parametrize("case", list(STALLED_ANSWERS))
async def test_dispatch_the_status_decides_though_the_body_stalls(tmp_path, case):
    """The status and headers decide the outcome; a body that does not arrive whole within
    `timeout` only closes the connection. A 200 whose body stalled was taken as a Timeout and
    posted again and again until it expired."""
    head, then = STALLED_ANSWERS[case]
    posts = []
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request's head; its body is not needed
        posts.append(time.monotonic())
        writer.write(head)
        for _ in range(200 if then != "close" else 0):  # 10 s at most: bounded
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)
            if done.is_set():
                break
            if then == "trickle":
                writer.write(b"x")
                await writer.drain()

    async with raw_server(answer) as port:
        try:
            dest = webhook("hook", f"http://127.0.0.1:{port}/in", timeout="500ms", retry=FAST_RETRY)
            async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
                await send(d, 1)
                final = {"429": {"retrying"}, "400": {"discarded"}}.get(
                    case[:3], {"delivered", "expired"}
                )
                (row,) = await d.wait_for_status(final, 1)
        finally:
            done.set()
    assert len(posts) == 1, posts
    shown = run_cli("deliveries", "--json", "--config", str(tmp_path / "destfnd.toml"))
    ((request,),) = [a["requests"] for a in orjson.loads(shown.stdout)[0]["history"]]
    if case.startswith("200"):
        assert (row["status"], row["attempts"], row["last_error"]) == ("delivered", 1, None)
    elif case.startswith("400"):
        assert (row["status"], row["last_error"]) == ("discarded", "HTTP 400 Bad Request")
        assert request["response_body"] == '{"error": "x is invalid"'
    else:
        assert (row["status"], row["last_error"]) == ("retrying", "HTTP 429 Too Many Requests")
        assert row["next_at"] - row["created_at"] >= 29_000  # Retry-After: 30
    expected = "cut short" if then == "close" else "did not arrive within the timeout"
    assert request["response_body_error"].startswith(expected), request
    plain = run_cli("deliveries", "--config", str(tmp_path / "destfnd.toml")).stdout
    assert f"response body: {expected}" in plain, plain


UNREADABLE_ANSWERS = {
    # More body than its Content-Length, in the same packet: read as a next answer.
    "bytes-past-its-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        "ClientResponseError: the answer is not valid HTTP: Bad status line: Expected HTTP/, "
        "RTSP/ or ICE/: b'okEXTRA'",
    ),
    "bad-chunk-size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n",
        "ClientResponseError: the answer is not valid HTTP: Invalid character in chunk size: "
        "b'ZZZ'",
    ),
    # Not an answer to the POST: the event may not have been taken (it was discarded).
    "101-switching-protocols": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n",
        "HTTP 101 Switching Protocols: not a final answer",
    ),
    "closed-in-its-head": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
        "ServerDisconnectedError: the server closed the connection before the end of its "
        "answer's headers (status 200)",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE_ANSWERS))
async def test_dispatch_an_answer_not_valid_or_not_final_is_retried_and_says_why(tmp_path, case):
    """An answer aiohttp cannot parse has no status to decide by: retried, its message saying
    what was wrong on one line. It said "400, message=" (aiohttp's made-up status for its
    parser's errors, which the server never sent) with llhttp's text over several lines, or,
    for a connection closed in the answer's head, the repr of a parser object."""
    answer_bytes, message = UNREADABLE_ANSWERS[case]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer_bytes)
        await writer.drain()

    async with raw_server(answer) as port:
        dest = webhook("hook", f"http://127.0.0.1:{port}/in", timeout="2s", retry=FAST_RETRY)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            (row,) = await d.wait_for_status({"retrying", "expired", "delivered"}, 1)
    assert (row["status"], row["last_error_type"]) == ("retrying", "Retry"), row
    assert row["last_error"] == message


async def test_dispatch_a_webhook_url_may_be_a_secret(tmp_path, monkeypatch):
    """A Slack or Zapier hook carries its token in the URL: `url = { env = "..." }` is taken,
    and the URL is redacted wherever destfnd shows it, also its path where a server echoes
    it. It was refused ("got a table")."""
    async with Sink(lambda n, r: Reply(404, body="Cannot POST /in/T000/sekrit-token")) as sink:
        monkeypatch.setenv("DESTFND_TEST_HOOK", f"{sink.url}/T000/sekrit-token")
        dest = (
            '[[destinations]]\nname = "hook"\ntype = "webhook"\n'
            'url = { env = "DESTFND_TEST_HOOK" }\n'
        )
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 1)
            await d.wait_for_status({"discarded"}, 1)
    assert len(sink.requests) == 1
    shown = run_cli("deliveries", "--config", str(tmp_path / "destfnd.toml"))
    assert "POST [redacted] -> 404" in shown.stdout, shown.stdout
    assert "response body: Cannot POST [redacted]" in shown.stdout, shown.stdout
    assert "sekrit" not in shown.stdout + shown.stderr


async def test_dispatch_a_webhook_url_goes_as_written_and_its_password_is_not_shown(
    tmp_path, monkeypatch, capfd
):
    """A signed URL is checked against its exact bytes: the %2F and %3D of its query were
    decoded on the way, so the server got another URL than the one configured and shown. A
    password in a plain url was shown in the Event Delivery view, and a secret url's query
    value that a redirect repeats in another URL. Found by a new user's audit."""
    token = "ABCDEFSECRET99"

    def reply(n: int, r: Received) -> Reply:
        if r.raw_path.startswith("/in/signed"):
            return Reply(200)
        if r.raw_path.startswith("/in/pw"):
            return Reply(404)
        return Reply(307, headers={"Location": f"https://elsewhere.example/x?t={token}"})

    async with Sink(reply) as sink:
        signed = "/signed/p%2Fq?sig=a%2Bb%2Fc%3D%3D&x=1"
        monkeypatch.setenv("DESTFND_TEST_HOOK", f"{sink.url}/s?token={token}&x=1")
        once = {"max_attempts": 1}
        dests = (
            webhook("signed", sink.url + signed, retry=once)
            + webhook("pw", sink.url.replace("//", "//bob:hunter2hunter2@") + "/pw", retry=once)
            + '[[destinations]]\nname = "s"\ntype = "webhook"\n'
            + 'url = { env = "DESTFND_TEST_HOOK" }\n[destinations.retry]\nmax_attempts = 1\n'
        )
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dests)) as d:
            await send(d, 1)
            rows = await d.wait_for_status({"delivered", "discarded", "expired"}, 3)
    assert sorted(r["status"] for r in rows) == ["delivered", "discarded", "expired"], rows
    assert [r.raw_path for r in sink.requests if "/signed" in r.raw_path] == ["/in" + signed]
    shown = run_cli("deliveries", "--config", str(tmp_path / "destfnd.toml"))
    assert "POST http://bob:[redacted]@127.0.0.1:" in shown.stdout, shown.stdout
    assert "HTTP 307 Temporary Redirect to https://elsewhere.example/x?t=[redacted]" in (
        shown.stdout
    )
    logged = capfd.readouterr().err
    for text in (shown.stdout, shown.stderr, logged):
        assert "hunter2hunter2" not in text and token not in text


async def test_dispatch_a_secret_a_webhook_echoes_across_a_cut_leaves_no_part(
    tmp_path, monkeypatch, capfd
):
    """A server that echoes a secret header back, in a failed response's body or in a
    redirect's Location, just where destfnd cuts them short (4,096 bytes, 200 characters):
    the secret is redacted before the cut. 34 of its 35 characters were left in the Event
    Delivery view, the database and the journal."""
    secret = "hooktok_SECRET_0123456789abcdefghij"
    body = "x" * (4096 - 34) + secret
    wide = "é" * 2241 + secret  # 2 bytes a character: the cut is in characters
    location = "https://e.example/" + "p" * (200 - 18 - 34) + secret

    def reply(n: int, request: object) -> Reply:
        if n < 2:
            return Reply(400, body=[body, wide][n])
        return Reply(302, headers={"Location": location})

    monkeypatch.setenv("DESTFND_TEST_TOKEN", secret)
    async with Sink(reply) as sink:
        dest = (
            f'[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = "{sink.url}"\n'
            'concurrency = 1\nheaders = { "X-Token" = { env = "DESTFND_TEST_TOKEN" } }\n'
            "[destinations.retry]\nmax_attempts = 1\n"
        )
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 3)
            rows = await d.wait_for_status({"discarded", "expired"}, 3)
    assert sorted(r["status"] for r in rows) == ["discarded", "discarded", "expired"]
    assert sink.requests[0].headers["X-Token"] == secret  # the header went out
    shown = run_cli("deliveries", "--config", str(tmp_path / "destfnd.toml"), "--json")
    assert "[redacted]" in shown.stdout
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("db*") if p.is_file())
    logged = capfd.readouterr().err
    for part in (secret[:12], secret[-12:]):
        assert part not in shown.stdout, part
        assert part.encode() not in stored, part
        assert part not in logged, part


@pytest.mark.parametrize("insert", [False, True])
async def test_dispatch_a_retry_after_on_429_pauses_the_whole_destination(tmp_path, insert):
    """A rate-limited downstream (429 with Retry-After) wants every request to wait, not only
    the one it refused: the destination starts no delivery meanwhile (also behind an insert
    function). Only that delivery used to wait, the others went on at full concurrency, each
    burning an attempt on a 429."""
    replies = [Reply(429, headers={"Retry-After": "1"})] + [Reply(200)] * 3
    (tmp_path / "pass.py").write_text("def on_track(event, settings):\n    return event\n")
    extra = {"insert_function": "pass.py"} if insert else {}
    async with Sink(lambda n, r: replies[min(n, 3)]) as sink:
        dest = webhook("hook", sink.url, retry=FAST_RETRY, concurrency=1, **extra)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dest)) as d:
            await send(d, 3)
            await sink.wait_for(lambda: len(sink.requests) == 1)
            await asyncio.sleep(0.3)  # paused: the two others are given back, uncounted
            waiting = [r for r in d.deliveries() if r["message_id"] != "m-0"]
            rows = await d.wait_for_status({"delivered"}, 3)
    assert [(r["leased"], r["attempts"]) for r in waiting] == [(0, 0), (0, 0)]
    first, *later = sink.requests
    assert first.status == 429 and len(later) == 3
    assert min(r.at for r in later) - first.at >= 0.95  # the two others waited too
    assert sorted(r["attempts"] for r in rows) == [1, 1, 2]  # only the refused one retried


async def test_daemon_prunes_attempt_records_by_each_destinations_own_max_age(tmp_path):
    """Records go after retention plus their own destination's max_age, not the longest one
    of any destination: with one destination left at 4 h, a 1 h one's were kept 4 h too."""
    from destfnd.store import open_db
    from destfnd.store.db import SQL

    db, hour = tmp_path / "db", 3600 * 1000
    now = int(time.time() * 1000)
    conn = open_db(db)
    with conn:
        conn.executemany(
            SQL["insert_invocation"],
            [(dest, now - hours * hour, 1.0, None, "x", b"[]", 2)
             for hours in (6, 3) for dest in ("short", "long", "gone")],
        )  # fmt: skip
    conn.close()
    url = closed_port_url()
    dests = webhook("short", url, retry={"max_age": "1h"}) + webhook("long", url)
    config = config_text(db, dests).replace("[storage]\n", '[storage]\nretention = "1h"\n')

    def left() -> list[tuple[str, int]]:
        with contextlib.closing(open_db(db, readonly=True)) as conn:
            return conn.execute("SELECT destination, started_at FROM invocations").fetchall()

    async with running_daemon(tmp_path, config) as d:
        deadline = time.monotonic() + 10
        # Those 6 h old are past retention + 4 h; of those 3 h old, only the 1 h destination's
        # are past theirs. "gone", no longer configured, goes by the longest max_age.
        # (The count of bytes kept follows the commit once the daemon's loop resumes.)
        retention = d.daemon.retention
        while (len(left()) > 2 or retention.records_bytes > 4) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(left()) == [("gone", now - 3 * hour), ("long", now - 3 * hour)]
        assert retention.records_bytes == 4


async def test_dispatch_an_unreachable_server_pauses_its_destination(tmp_path):
    """A server that refuses connections failed every delivery at once, each retried on its
    own backoff: about 650 failed attempts/s at 100 events/s, whose CPU the healthy
    destinations' deliveries waited for. Its destination pauses instead (1 s, then doubling
    while it stays so): a few attempts per pause, the rest given back uncounted."""
    async with Sink() as sink:
        down = webhook("down", closed_port_url(), concurrency=4, retry=FAST_RETRY)
        dests = down + webhook("up", sink.url)
        async with running_daemon(tmp_path, config_text(tmp_path / "db", dests)) as d:
            await send(d, 50)
            await sink.wait_for(lambda: len(sink.delivered()) == 50)
            await asyncio.sleep(2.5)  # pauses of 1 s, then 2 s
            rows = [r for r in d.deliveries() if r["destination"] == "down"]
    attempts = sum(r["attempts"] for r in rows)
    # Without the pause: each of the 50 every 20-50 ms (FAST_RETRY) until max_attempts (5).
    assert 1 <= attempts <= 4 * 3, attempts
    assert {r["status"] for r in rows} <= {"pending", "retrying"}


async def test_dispatch_cancelled_with_a_claim_on_its_way_gives_its_leases_back(tmp_path):
    """A drain that runs out (`drain_timeout = "0s"`, a second signal) cancels a destination
    while its claim waits for the writer: the writer commits the claim all the same, and its
    leases were lost to the final settle, so after a clean exit rows stayed leased, each with
    an attempt counted that was never made. The claim is now waited for and given back."""
    import time as clock

    from destfnd.config import load_config
    from destfnd.deliverers import make_deliverer
    from destfnd.dispatch import Dispatcher
    from destfnd.redact import Redactor
    from destfnd.store import Dedupe, IncomingEvent, Writer, open_db
    from destfnd.store import queue as q

    async with Sink() as sink:
        (tmp_path / "destfnd.toml").write_text(
            config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        )
        dest = load_config(tmp_path / "destfnd.toml").destinations[0]
        conn = open_db(tmp_path / "db.sqlite3")
        events = [IncomingEvent(f"m{i}", orjson.dumps({"type": "track"})) for i in range(20)]
        q.insert_events(conn, Dedupe(), "web", events, ["hook"], 1, 0)
        writer = Writer(conn)
        serving = asyncio.create_task(writer.serve())
        deliverer = make_deliverer(dest, Redactor(), "destinations[0]")
        await deliverer.start()
        try:
            # The writer busy for 0.5 s: the dispatcher's first claim waits behind it.
            busy = asyncio.create_task(writer.run(lambda c: clock.sleep(0.5)))
            await asyncio.sleep(0.05)
            dispatcher = Dispatcher(dest, writer, deliverer)
            running = asyncio.create_task(dispatcher.run())
            for _ in range(100):  # until the claim waits in the writer's queue
                await asyncio.sleep(0.01)
                if writer._queue:
                    break
            assert writer._queue and not busy.done()
            dispatcher.stop()
            running.cancel()
            async with asyncio.timeout(10):
                await asyncio.gather(running, busy, return_exceptions=True)
                await writer.run(lambda c: None)  # after whatever was queued has committed
            leased = conn.execute(
                "SELECT count(*), coalesce(sum(attempts), 0) FROM deliveries WHERE leased = 1"
            ).fetchone()
            assert leased == (0, 0)
            assert conn.execute("SELECT sum(attempts) FROM deliveries").fetchone() == (0,)
            assert sink.requests == []
        finally:
            writer.close()
            async with asyncio.timeout(10):
                await serving
            writer.shutdown()
