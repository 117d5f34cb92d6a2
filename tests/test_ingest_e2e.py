"""The Tracking API through the real `destfnd serve` process, to a recording webhook sink."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import re
import sqlite3
import time
import uuid
from datetime import datetime

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from support import (
    AUTH,
    FIXTURES,
    WRITE_KEY,
    Sink,
    config_text,
    post,
    run_cli,
    running_daemon,
    webhook,
)

from destfnd.spec import parse_timestamp


async def start(make_daemon, tmp_path, sink: Sink, server: str = ""):
    cfg = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url), server=server)
    return await make_daemon(cfg).start()


def fixture_body(name: str) -> dict:
    body = orjson.loads((FIXTURES / "http-api" / name).read_bytes())
    body["writeKey"] = WRITE_KEY
    return body


@pytest.mark.parametrize("use_gzip", [False, True], ids=["plain", "gzip"])
async def test_ingest_segment_python_sdk_events_arrive_intact(make_daemon, tmp_path, use_gzip):
    from segment.analytics.client import Client

    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        user = f"user-{uuid.uuid4()}"

        def send() -> None:
            # The SDK's default mode: a background thread sends batches to /v1/batch.
            client = Client(
                WRITE_KEY, host=daemon.url, gzip=use_gzip, on_error=lambda e, b: errors.append(e)
            )
            client.identify(user, {"email": "peter@example.com", "plan": "premium"})
            client.track(user, "Item Purchased", {"revenue": 14.99, "sku": "A-1"})
            client.page(user, name="Home", properties={"url": "https://example.com"})
            client.group(user, "group-1", {"name": "Initech"})
            client.alias("previous-1", user)
            client.screen(user, name="Main")
            client.flush()
            client.shutdown()

        errors: list[Exception] = []
        sent_at = time.time()
        await asyncio.to_thread(send)
        assert errors == []
        await sink.wait_for(lambda: len(sink.delivered()) == 6)
        by_type = {e["type"]: e for e in sink.delivered()}
        assert set(by_type) == {"identify", "track", "page", "group", "alias", "screen"}
        track = by_type["track"]
        assert track["userId"] == user
        assert track["event"] == "Item Purchased"
        assert track["properties"] == {"revenue": 14.99, "sku": "A-1"}
        assert track["context"]["library"]["name"] == "analytics-python"
        assert by_type["identify"]["traits"] == {"email": "peter@example.com", "plan": "premium"}
        assert by_type["alias"]["previousId"] == "previous-1"
        assert by_type["group"]["groupId"] == "group-1"
        for event in sink.delivered():
            assert event["messageId"]
            received = parse_timestamp(event["receivedAt"]).timestamp()
            assert sent_at - 1 <= received <= time.time() + 1
            # The SDK's clocks are ours: skew-corrected timestamp is within a second of arrival.
            assert abs(parse_timestamp(event["timestamp"]).timestamp() - received) < 1


async def test_ingest_segment_python_sdk_reports_our_errors_by_code_and_message(
    make_daemon, tmp_path
):
    from segment.analytics.request import APIError, post

    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)

        def send(write_key: str) -> APIError:
            event = {"type": "track", "userId": "u1", "event": "E", "messageId": "m1"}
            with pytest.raises(APIError) as raised:
                post(write_key, host=daemon.url, batch=[event])
            return raised.value

        error = await asyncio.to_thread(send, "wk_not_ours")
        # Without Segment's `code` and `message` in the body, the SDK says "unknown".
        assert (error.status, error.code) == (401, "unauthorized")
        assert "unknown write key" in error.message
        assert sink.delivered() == []


async def test_ingest_segment_docs_bodies_accepted_and_delivered(make_daemon, tmp_path, session):
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        singles = ["alias", "group", "identify", "page", "screen", "track"]
        for kind in singles:
            status, body = await post(
                session, f"{daemon.url}/v1/{kind}", fixture_body(f"v1-{kind}.json"), auth=False
            )
            assert (status, body) == (200, {"success": True}), kind
        status, _ = await post(
            session, f"{daemon.url}/v1/batch", fixture_body("v1-batch.json"), auth=False
        )
        assert status == 200
        await sink.wait_for(lambda: len(sink.delivered()) == len(singles) + 4)
        events = sink.delivered()
        batch = [e for e in events if e.get("context", {}).get("device")]
        assert len(batch) == 4
        # The sloppy timestamps of Segment's own example are accepted and normalised.
        originals = sorted(e["originalTimestamp"] for e in batch)
        assert originals[-1] == "2015-02-02T00:30:12.984Z"
        assert all("writeKey" not in e for e in events)
        track = next(e for e in events if e["type"] == "track" and e["event"] == "Item Purchased")
        assert track["properties"]["revenue"] == 14.99
        assert track["timestamp"] == "2012-12-02T00:30:12.984Z"  # no sentAt: kept as sent


async def test_ingest_analytics_js_text_plain_with_write_key_in_body(
    make_daemon, tmp_path, session
):
    """What analytics.js sends from a page on another site: text/plain with the write key in
    the body (and, after the preflight, in an Authorization header). The answer must carry
    Access-Control-Allow-Origin or the browser hides it from the script, which then counts
    the event as failed and sends it again."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        now = datetime.now().astimezone()
        body = {
            "type": "track",
            "event": "Clicked",
            "anonymousId": "anon-1",
            "writeKey": WRITE_KEY,
            "timestamp": now.isoformat(),
            "sentAt": now.isoformat(),
        }
        browser = {"Content-Type": "text/plain", "Origin": "https://shop.example.com"}
        async with session.post(
            f"{daemon.url}/v1/t", data=orjson.dumps(body), headers=browser
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        # A refusal is readable by the page too (the script tells a 4xx from a network error).
        bad_key = orjson.dumps({**body, "writeKey": "wk_nobody"})
        async with session.post(f"{daemon.url}/v1/t", data=bad_key, headers=browser) as resp:
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        await sink.wait_for(lambda: len(sink.delivered()) == 1)
        assert sink.delivered()[0]["anonymousId"] == "anon-1"
        assert "writeKey" not in sink.delivered()[0]
        # Server-side SDKs and curl send no Origin: no CORS header for them.
        async with session.post(
            f"{daemon.url}/v1/track", data=orjson.dumps(body), headers={"Authorization": AUTH}
        ) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_ingest_cors_preflight_for_analytics_js(make_daemon, tmp_path, session):
    """analytics.js sends an Authorization header, so the browser asks first with OPTIONS;
    without a 2xx answer allowing it, the browser never sends the events (see
    test_browser_e2e.py for the real thing)."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        for path in ("/v1/t", "/v1/track", "/v1/batch", "/v1/b", "/v1/import"):
            async with session.options(
                f"{daemon.url}{path}",
                headers={
                    "Origin": "https://shop.example.com",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type,authorization",
                },
            ) as resp:
                assert resp.status == 204, path
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                allowed = resp.headers["Access-Control-Allow-Headers"].lower().split(",")
                assert {"content-type", "authorization"} <= {h.strip() for h in allowed}
                assert int(resp.headers["Access-Control-Max-Age"]) > 0
        assert sink.delivered() == []


async def test_ingest_unknown_paths_and_methods_get_json_errors(make_daemon, tmp_path, session):
    """A path or method no route takes gets the same JSON error as any other refusal (aiohttp
    alone answers those in plain text), with the CORS header a page's script needs to read it
    and, for a 405, the Allow header HTTP asks for."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        cases = [
            # (method, path, status, Allow)
            ("GET", "/v1/track", 405, "OPTIONS, POST"),
            ("PUT", "/v1/batch", 405, "OPTIONS, POST"),
            ("DELETE", "/healthz", 405, "GET, HEAD"),
            ("GET", "/", 404, None),
            ("OPTIONS", "/v2/track", 404, None),
            ("POST", "/v1/track/x", 404, None),
            ("GET", "/v1/x%0a", 404, None),  # a newline in the path (aiohttp's "." skips it)
        ]
        for method, path, status, allow in cases:
            headers = {"Origin": "https://shop.example.com", "Authorization": AUTH}
            async with session.request(method, daemon.url + path, headers=headers) as resp:
                assert resp.status == status, (method, path)
                assert resp.content_type == "application/json", (method, path)
                got = await resp.json()
                assert resp.headers["Access-Control-Allow-Origin"] == "*", (method, path)
                assert resp.headers.get("Allow") == allow, (method, path)
            assert got["success"] is False
            assert got["code"] == ("method_not_allowed" if allow else "not_found")
            assert path.replace("%0a", "\n") in got["detail"], (method, path, got)
        # A HEAD gets the status and headers without a body.
        async with session.head(daemon.url + "/v1/nowhere") as resp:
            assert resp.status == 404 and await resp.read() == b""
        # The routes themselves still answer as before.
        async with session.get(f"{daemon.url}/healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        assert (await post(session, f"{daemon.url}/v1/track", TRACK))[0] == 200
        await sink.wait_for(lambda: len(sink.delivered()) == 1)
        assert not [r for r in daemon.log_records() if r.get("level") in ("error", "critical")]


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_ingest_a_sites_cookies_in_a_large_header_are_accepted(
    make_daemon, tmp_path, session, parser
):
    """analytics.js on a first-party endpoint sends the site's cookies: 20 KB of them were a
    plain-text 400 (aiohttp's 8 KB limit), which it does not retry. Sent as a network sends
    them, the head in pieces, and at once; to either of aiohttp's parsers (its pure-Python
    one held a header arriving in pieces to its line limit). Past 32 KiB for one header, or
    64 headers, it is still a 400, and the daemon carries on."""
    cookies = "; ".join(f"c{i}={'v' * 4000}" for i in range(5))  # five full-size cookies
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else {}
    async with Sink() as sink:
        cfg = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        daemon = await make_daemon(cfg, env).start()
        body = orjson.dumps({"userId": "u1", "event": "Cookies", "messageId": "cookie-1"})
        host, port = daemon.url.removeprefix("http://").split(":")
        head = (
            f"POST /v1/track HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH}\r\n"
            f"Content-Type: application/json\r\nCookie: {cookies}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        for at in range(0, len(head), 1400):  # a segment at a time, each read on its own
            writer.write(head[at : at + 1400])
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(body)
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        at_once = {"Cookie": cookies, "Origin": "https://www.example.com"}
        again = {"userId": "u1", "event": "Cookies", "messageId": "cookie-2"}
        assert (await post(session, f"{daemon.url}/v1/track", again, headers=at_once))[0] == 200
        await sink.wait_for(lambda: sink.delivered_ids() == {"cookie-1", "cookie-2"})
        huge = {"Cookie": "a=" + "v" * (32 * 1024)}
        status, answer = await post(session, f"{daemon.url}/v1/track", again, headers=huge)
        assert status == 400, answer
        many = {f"X-Header-{i}": "v" for i in range(70)}
        assert (await post(session, f"{daemon.url}/v1/track", again, headers=many))[0] == 400
        async with session.get(f"{daemon.url}/healthz") as resp:
            assert resp.status == 200
        assert sink.delivered_ids() == {"cookie-1", "cookie-2"}


async def test_ingest_analytics_java_posts_to_v1_import_with_a_trailing_slash(
    make_daemon, tmp_path, session
):
    """analytics-java's default endpoint is /v1/import/ (Analytics.Builder): a 404 there,
    which it does not retry, lost every event. Its body: sequence, a batch-level context."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        body = {
            "batch": [{"type": "track", "event": "Java", "userId": "u", "messageId": "j-1",
                       "timestamp": "2026-12-07T05:00:00.123Z"}],
            "sentAt": "2026-12-07T05:00:00.456Z",
            "context": {"library": {"name": "analytics-java", "version": "3.5.4"}},
            "sequence": 0,
        }  # fmt: skip
        headers = {"User-Agent": "analytics-java/3.5.4",
                   "Content-Type": "application/json; charset=UTF-8"}  # fmt: skip
        for path in ("/v1/import/", "/v1/track/"):
            payload = body if path == "/v1/import/" else {**body["batch"][0], "messageId": "j-2"}
            status, _ = await post(session, daemon.url + path, payload, headers=headers)
            assert status == 200, path
        await sink.wait_for(lambda: sink.delivered_ids() == {"j-1", "j-2"})
        (java,) = [e for e in sink.delivered() if e["messageId"] == "j-1"]
        assert java["context"]["library"]["name"] == "analytics-java"


async def test_ingest_takes_runs_of_slashes_in_a_path_as_one(make_daemon, tmp_path, session):
    """An SDK configured with a host that ends in "/" (analytics-go appends "/v1/batch" to its
    endpoint) posts to //v1/batch: a 404 there, which SDKs drop or retry until they drop,
    lost the batch. Each run of slashes counts as one, for POST, OPTIONS and /healthz; an
    unknown path is still a 404, and another method a 405 naming what the path takes."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        paths = {"//v1/batch": "s-1", "/v1//b": "s-2", "/v1/b//": "s-3", "/v1///track": "s-4"}
        for path, message_id in paths.items():
            event = {"type": "track", "event": "Slashes", "userId": "u", "messageId": message_id}
            body = event if path.endswith("track") else {"batch": [event]}
            status, answer = await post(session, daemon.url + path, body)
            assert (status, answer) == (200, {"success": True}), path
        await sink.wait_for(lambda: sink.delivered_ids() == set(paths.values()))
        async with session.options(f"{daemon.url}/v1//batch") as resp:
            assert resp.status == 204
        async with session.get(f"{daemon.url}//healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        async with session.get(f"{daemon.url}/v1//batch") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "OPTIONS, POST"
            assert (
                "GET /v1//batch: this endpoint takes OPTIONS, POST" in (await resp.json())["detail"]
            )
        status, answer = await post(session, f"{daemon.url}/v1//trak", paths)
        assert status == 404 and "no endpoint at /v1//trak" in answer["detail"]
        # Expect: 100-continue is checked there as on the path itself: an unknown key is
        # refused before the body is sent, not asked for it; another expectation is JSON.
        head = (b"POST //v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                b"Authorization: Basic " + base64.b64encode(b"nope:") + b"\r\n"
                b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        answer = await _raw(daemon.url, head)
        assert answer.startswith(b"HTTP/1.1 401") and b"unknown write key" in answer, answer
        odd = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: foo\r\n\r\n"
        answer = await _raw(daemon.url, odd)
        assert answer.startswith(b"HTTP/1.1 417") and b'"expectation failed"' in answer, answer


def _sized(message_id: str, size: int) -> dict:
    """A track event whose compact JSON is `size` bytes, as an SDK measures it."""
    message = {"type": "track", "event": "Big", "userId": "u", "messageId": message_id,
               "timestamp": "2026-12-07T05:00:00.123Z", "properties": {"pad": ""}}  # fmt: skip
    message["properties"]["pad"] = "x" * (size - len(orjson.dumps(message)))
    assert len(orjson.dumps(message)) == size
    return message


def _ruby_batch() -> tuple[list[dict], bytes]:
    """The largest batch analytics-ruby builds (MessageBatch, 2.x): messages are added until
    their JSON, a byte for each comma, reaches 512,000 - 32,768, so one more of 32,768 bytes
    takes it to 512,000; Transport then wraps it as {"sentAt", "batch"}."""
    sizes = [31_000] * 15 + [14_215]  # 479,231 counted: one byte short of full
    messages = [_sized(f"rb-{i}", size) for i, size in enumerate(sizes)]
    messages.append(_sized("rb-last", 32_768))
    assert sum(len(orjson.dumps(m)) + 1 for m in messages) == 512_000
    body = orjson.dumps({"sentAt": "2026-12-07T05:00:01.000000+00:00", "batch": messages})
    return messages, body


def _java_batch() -> bytes:
    """analytics-java 3.0-3.1 (AnalyticsClient.enqueue) flushes a batch once it has reached
    1024 * 500 characters, with the message that took it there: up to one message over
    (3.2 and later check before adding one)."""
    messages = [_sized(f"jv-{i}", 31_990) for i in range(16)] + [_sized("jv-last", 32_700)]
    assert len(orjson.dumps(messages)) > 1024 * 500 + 30_000
    context = {"library": {"name": "analytics-java", "version": "3.1.3"}}
    sent_at = "2026-12-07T05:00:01.000Z"
    return orjson.dumps({"batch": messages, "sentAt": sent_at, "context": context, "sequence": 7})


async def test_ingest_the_largest_batches_of_segments_sdks_are_accepted(
    make_daemon, tmp_path, session
):
    """analytics-ruby and analytics-java 3.0-3.1 can build a batch a little over 500 KB, and
    drop a batch answered 4xx without retrying it: a body may pass server.max_request_size by
    one event (server.max_event_size) and 4 KB, gzip or not, declared with Expect or not. One
    byte more is a 413, delivered to nobody."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        messages, ruby = _ruby_batch()
        assert len(ruby) > 512_000
        java = _java_batch()
        headers = {"User-Agent": "analytics-ruby/2.5.0"}
        assert await post(session, daemon.url + "/v1/import", ruby, headers=headers) == (
            200,
            {"success": True},
        )
        headers = {"User-Agent": "analytics-java/3.1.3"}
        status, got = await post(session, daemon.url + "/v1/import/", java, headers=headers)
        assert status == 200, got
        # At the limit and one byte past it (the limit: 500 KB + 32 KB + 4 KB).
        limit = 512_000 + 32_768 + 4096
        for size, want in ((limit, 200), (limit + 1, 413)):
            tail = f"edge-{size}"
            batch = [_sized(f"{tail}-{i}", 32_000) for i in range(17)] + [_sized(tail, 200)]
            body = orjson.dumps({"batch": batch})
            batch[-1] = _sized(tail, 200 + size - len(body))
            body = orjson.dumps({"batch": batch})
            assert len(body) == size
            status, got = await post(session, daemon.url + "/v1/batch", body)
            assert status == want, (size, got)
        assert got["detail"] == (
            f"over {limit} bytes (server.max_request_size 512000, with room for a batch's last"
            " event: server.max_event_size 32768 + 4096)"
        )
        # The same body gzipped: decompressed, it may be as large as one that is not.
        edge = [_sized(f"gz-{i}", 32_000) for i in range(17)] + [_sized("gz", 200)]
        edge[-1] = _sized("gz", 200 + limit - len(orjson.dumps({"batch": edge})))
        gz = {"Content-Encoding": "gzip"}
        body = gzip.compress(orjson.dumps({"batch": edge}))
        assert await post(session, daemon.url + "/v1/batch", body, headers=gz) == (
            200,
            {"success": True},
        )
        # Declared with Expect: 100-continue, asked for at the limit, refused one byte past it.
        head = f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
        for size, want in ((limit, b"HTTP/1.1 100 Continue"), (limit + 1, b"HTTP/1.1 413")):
            ask = f"{head}Expect: 100-continue\r\nContent-Length: {size}\r\n\r\n"
            answer = await _raw(daemon.url, ask.encode())
            assert answer.startswith(want), (size, answer[:200])
        want_ids = {m["messageId"] for m in messages} | {f"jv-{i}" for i in range(16)}
        want_ids |= {"jv-last", f"edge-{limit}"} | {f"edge-{limit}-{i}" for i in range(17)}
        want_ids |= {"gz"} | {f"gz-{i}" for i in range(17)}
        await sink.wait_for(lambda: sink.delivered_ids() >= want_ids)
        await asyncio.sleep(0.3)
        assert sink.delivered_ids() == want_ids  # none of the refused batch
        (last,) = [e for e in sink.delivered() if e["messageId"] == "rb-last"]
        assert last["properties"] == messages[-1]["properties"]
    # max_decompressed_size set to max_request_size: a gzip body gets the same room.
    async with Sink() as sink:
        server = 'max_request_size = "1MB"\nmax_decompressed_size = "1MB"\n'
        daemon = await start(make_daemon, tmp_path / "equal", sink, server=server)
        batch = [_sized(f"eq-{i}", 32_000) for i in range(33)]  # 1 MiB + 8 KB
        body = gzip.compress(orjson.dumps({"batch": batch}))
        assert len(gzip.decompress(body)) > 1024 * 1024
        status, got = await post(session, daemon.url + "/v1/batch", body, headers=gz)
        assert status == 200, got


async def test_ingest_invalid_events_skip_keeps_the_valid_events_of_a_batch(
    make_daemon, tmp_path, session
):
    """server.invalid_events = "skip": Segment's way. Every SDK drops a batch answered 400,
    and Kotlin's, Swift's and React Native's send track("") as it is: one such event lost up
    to a whole batch file. Now it alone is left out, said so in the answer and the log."""
    async with Sink() as sink, Sink() as other:
        dests = webhook("hook", sink.url) + webhook("other", other.url)
        config = config_text(tmp_path / "db.sqlite3", dests,
                             server='invalid_events = "skip"')  # fmt: skip
        daemon = await make_daemon(config).start()
        batch = {
            "batch": [
                {"type": "track", "userId": "u", "event": "", "messageId": "empty-name"},
                {"type": "track", "userId": "u", "event": "Good", "messageId": "good-1"},
                {"type": "track", "userId": "u", "event": "Bad time", "messageId": "bad-time",
                 "timestamp": "yesterday"},
                {"type": "track", "userId": "u", "event": "Hook only", "messageId": "routed",
                 "integrations": {"other": False}},
                None,  # a member that is no object is one invalid event too
                {"type": "identify", "userId": "u", "messageId": "good-2"},
            ],
            "writeKey": WRITE_KEY,
        }  # fmt: skip
        status, answer = await post(
            session, f"{daemon.url}/v1/b", gzip.compress(orjson.dumps(batch)),
            headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"}, auth=False,
        )  # fmt: skip
        assert status == 200
        assert answer["success"] is True and answer["skipped"] == 3
        assert answer["errors"][0] == "batch[0].event: required for track: a non-empty string"
        assert answer["errors"][1].startswith("batch[2].timestamp: ")
        assert answer["errors"][2] == "batch[4]: must be a JSON object"
        # One event alone, invalid: 200, nothing stored.
        status, answer = await post(session, f"{daemon.url}/v1/track", {"userId": "u"})
        assert (status, answer["skipped"]) == (200, 1)
        await sink.wait_for(lambda: sink.delivered_ids() == {"good-1", "routed", "good-2"})
        await other.wait_for(lambda: other.delivered_ids() == {"good-1", "good-2"})
        await asyncio.sleep(0.3)  # and nothing more comes
        assert len(sink.delivered()) == 3 and len(other.delivered()) == 2
        (line, *_) = [r for r in daemon.log_records() if r.get("event") == "events_skipped"]
        assert (line["skipped"], line["source"], line["level"]) == (3, "web", "warning")
        assert line["error"] == "batch[0].event: required for track: a non-empty string"
    # Refused as a whole otherwise (the default, "refuse"): tested with the bad inputs above.


async def test_ingest_analytics_js_batching_posts_to_v1_b(make_daemon, tmp_path, session):
    """analytics.js with deliveryStrategy "batching" posts {writeKey, batch, sentAt} to /b
    under its apiHost (api.segment.io/v1/b), each event without its own sentAt."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        now = datetime.now().astimezone().isoformat()
        events = [
            {
                "type": kind,
                "anonymousId": "anon-2",
                "messageId": f"ajs-next-{uuid.uuid4()}",
                "timestamp": now,
                "writeKey": WRITE_KEY,
                "context": {"library": {"name": "analytics.js", "version": "npm:next-1.84.3"}},
                **extra,
            }
            for kind, extra in (("page", {"name": "Home"}), ("track", {"event": "Clicked"}))
        ]
        body = {"writeKey": WRITE_KEY, "batch": events, "sentAt": now}
        async with session.post(
            f"{daemon.url}/v1/b",
            data=orjson.dumps(body),
            headers={"Content-Type": "text/plain", "Origin": "https://shop.example.com"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        await sink.wait_for(lambda: len(sink.delivered()) == 2)
        assert sorted(e["messageId"] for e in sink.delivered()) == sorted(
            e["messageId"] for e in events
        )
        assert {e["type"] for e in sink.delivered()} == {"page", "track"}


async def test_ingest_a_big_body_with_its_write_key_at_the_end_is_accepted(
    make_daemon, tmp_path, session
):
    """A body over 64 KB without an Authorization header is parsed once its text shows a
    source's writeKey (analytics.js puts it after the batch)."""
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        events = [
            {"type": "track", "anonymousId": "a", "event": "Big", "messageId": f"big-{i}",
             "properties": {"pad": "x" * 1000}}
            for i in range(100)
        ]  # fmt: skip
        # Other "writeKey"s first (a long string, not a key; not a string): looked past.
        events[0]["properties"]["writeKey"] = "k" * 5000
        events[1]["properties"]["writeKey"] = 12
        body = orjson.dumps({"batch": events, "sentAt": "2026-12-07T09:00:00Z"})
        assert len(body) > 100_000
        body = body[:-1] + b', "writeKey": ' + json.dumps(WRITE_KEY).encode() + b"}"
        status, answer = await post(
            session, f"{daemon.url}/v1/b", body, headers={"Content-Type": "text/plain"},
            auth=False,
        )  # fmt: skip
        assert (status, answer) == (200, {"success": True})
        await sink.wait_for(lambda: len(sink.delivered_ids()) == 100)


async def test_ingest_duplicate_message_id_delivered_once(make_daemon, tmp_path, session):
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        event = {"userId": "u1", "event": "Paid", "messageId": "dup-1"}
        for _ in range(3):
            assert (await post(session, f"{daemon.url}/v1/track", event))[0] == 200
        marker = {"userId": "u1", "event": "Marker", "messageId": "marker-1"}
        assert (await post(session, f"{daemon.url}/v1/track", marker))[0] == 200
        await sink.wait_for(lambda: "marker-1" in sink.delivered_ids())
        await asyncio.sleep(0.3)
        assert [e["messageId"] for e in sink.delivered()].count("dup-1") == 1


def _gzip_bomb() -> bytes:
    # 20 MB of JSON inside one valid object, about 20 KB compressed: far over the 2 MB cap.
    payload = b'{"userId":"u","event":"e","properties":{"x":"' + b" " * 20_000_000 + b'"}}'
    return gzip.compress(payload, 9)


def _corrupt_gzip(body: object) -> bytes:
    data = bytearray(gzip.compress(orjson.dumps(body)))
    data[-5] ^= 0xFF  # the stored CRC-32 no longer matches
    return bytes(data)


TRACK = {"userId": "u1", "event": "Bad"}
BAD_INPUTS = [
    # (id, path, body, headers, auth, status, error phrase, detail phrase)
    ("no-key", "/v1/track", TRACK, {}, False, 401, "unauthorized", "write key"),
    ("unknown-key-header", "/v1/track", TRACK,
     {"Authorization": "Basic d3Jvbmdfa2V5Og=="}, False, 401, "unauthorized", "unknown"),
    ("unknown-key-body", "/v1/track", {**TRACK, "writeKey": "nope"}, {}, False, 401,
     "unauthorized", "unknown"),
    ("malformed-json", "/v1/track", b'{"userId": "u1", "event": ', {}, True, 400,
     "malformed JSON", ""),
    ("not-an-object", "/v1/track", [1, 2], {}, True, 400, "invalid request", "body"),
    ("batch-not-array", "/v1/batch", {"batch": {"type": "track"}}, {}, True, 400,
     "invalid request", "batch"),
    ("unknown-type", "/v1/batch", {"batch": [{"type": "purchase", "userId": "u"}]}, {}, True,
     400, "invalid event", "batch[0].type"),
    ("missing-ids", "/v1/track", {"event": "Bad"}, {}, True, 400, "invalid event", "userId"),
    ("track-without-event", "/v1/track", {"userId": "u1"}, {}, True, 400, "invalid event",
     "event"),
    ("properties-not-object", "/v1/track", {**TRACK, "properties": "x"}, {}, True, 400,
     "invalid event", "properties"),
    ("bad-timestamp", "/v1/track", {**TRACK, "timestamp": "yesterday"}, {}, True, 400,
     "invalid event", "timestamp"),
    # Dates at the ends of the calendar: out of range once moved to UTC, or once corrected
    # for the client's clock skew.
    ("timestamp-out-of-range", "/v1/track",
     {**TRACK, "timestamp": "0001-01-01T00:00:00+01:00"}, {}, True, 400, "invalid event",
     "timestamp"),
    ("skew-out-of-range", "/v1/track",
     {**TRACK, "timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T00:00:00Z"}, {},
     True, 400, "invalid event", "sentAt"),
    ("one-bad-in-batch", "/v1/batch",
     {"batch": [{"type": "track", **TRACK}, {"type": "track", "userId": "u2"}]}, {}, True,
     400, "invalid event", "batch[1].event"),
    ("oversize-event", "/v1/track", {**TRACK, "properties": {"x": "a" * 40_000}}, {}, True,
     413, "event too large", "bytes"),
    ("oversize-request", "/v1/batch",
     {"batch": [{"type": "track", **TRACK, "properties": {"x": "a" * 20_000}}] * 30}, {}, True,
     413, "request too large", ""),
    # 140 KB of body made 79 MB of events: the batch's context copied into each of 2,500.
    ("batch-context-amplified", "/v1/batch",
     {"batch": [{"type": "track", "userId": "u", "event": "amp"}] * 2500,
      "context": {"pad": "x" * 31_500}}, {}, True, 413, "request too large",
     "its events take over 8388608 bytes once the batch's context and integrations are merged"
     " into each (server.max_merged_size)"),
    # A message's own context that is no object was replaced by the batch's, and accepted.
    ("batch-member-context-not-object", "/v1/batch",
     {"batch": [{"type": "track", **TRACK, "context": ["ip"]}], "context": {"app": "a"}}, {},
     True,
     400, "invalid event", "batch[0].context: must be an object"),
    # A batch context nested too deep to write: refused as any event would be, never a 500.
    ("batch-context-too-deep", "/v1/batch",
     b'{"batch": [' + orjson.dumps({"type": "track", **TRACK}) + b'], "context": '
     + b'{"a": ' * 300 + b"{}" + b"}" * 300 + b"}", {}, True, 400, "invalid event",
     "nested more than 254 levels deep"),
    ("too-many-events", "/v1/batch", {"batch": [{"type": "track", **TRACK}] * 2501}, {}, True,
     400, "batch too large", "2501"),
    # Counted before the batch's context is copied into each (3,000 x 4 KB would be 413).
    ("too-many-events-counted-first", "/v1/batch",
     {"batch": [{}] * 3000, "context": {"pad": "x" * 4000}}, {}, True, 400, "batch too large",
     "3000 events; at most 2500"),
    # A big body without an Authorization header and without a known writeKey in its text
    # is not parsed (this one is not even JSON): parsing it is what would cost the daemon.
    ("big-body-no-key", "/v1/batch", b'{"batch": [' + b"{}," * 30_000, {}, False, 401,
     "unauthorized", "send the write key as HTTP Basic user name or as writeKey"),
    ("big-body-unknown-key", "/v1/batch",
     {"batch": [{"type": "track", **TRACK}] * 2000, "writeKey": "wk_not_ours"}, {}, False, 401,
     "unauthorized", "unknown write key"),
    ("gzip-bomb", "/v1/track", "BOMB", {"Content-Encoding": "gzip"}, True, 413,
     "request too large", "decompressed"),
    ("bad-gzip", "/v1/track", b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, True,
     400, "bad gzip", "truncated"),
    ("corrupt-gzip", "/v1/track", _corrupt_gzip(TRACK), {"Content-Encoding": "gzip"}, True,
     400, "bad gzip", "the gzip data is corrupt"),
    ("not-gzip", "/v1/track", orjson.dumps(TRACK), {"Content-Encoding": "gzip"}, True, 400,
     "bad gzip", "the body is not gzip data"),
    ("write-key-not-string", "/v1/track", {**TRACK, "writeKey": 123}, {}, False, 401,
     "unauthorized", "writeKey must be a string, not int"),
    ("bearer-auth", "/v1/track", TRACK, {"Authorization": "Bearer " + WRITE_KEY}, False, 401,
     "unauthorized", "not HTTP Basic"),
    ("unknown-encoding", "/v1/track", TRACK, {"Content-Encoding": "br"}, True, 415,
     "Content-Encoding", "gzip"),
    ("gzip-trailing-junk", "/v1/track", gzip.compress(orjson.dumps(TRACK)) + b"JUNK",
     {"Content-Encoding": "gzip"}, True, 400, "bad gzip", "4 bytes after the gzip stream"),
    ("gzip-too-many-members", "/v1/track",
     b"".join(gzip.compress(b" ") for _ in range(16)) + gzip.compress(orjson.dumps(TRACK)),
     {"Content-Encoding": "gzip"}, True, 400, "bad gzip", "more than 16 gzip members"),
    # A lone surrogate is forgiven; what orjson refuses otherwise is still refused.
    ("surrogate-and-infinity", "/v1/track",
     b'{"userId": "u1", "event": "Bad", "properties": {"s": "\\ud83d", "n": 1e400}}', {},
     True, 400, "malformed JSON", "infinity"),
    ("basic-not-base64", "/v1/track", {**TRACK, "writeKey": WRITE_KEY},
     {"Authorization": "Basic wk_test_web"}, False, 401, "unauthorized", "HTTP Basic"),
    ("basic-no-user", "/v1/track", TRACK,
     {"Authorization": "Basic " + base64.b64encode(b":secret").decode()}, False, 401,
     "unauthorized", "HTTP Basic"),
    # Not UTF-8 outside a string (inside one, it becomes U+FFFD: see below).
    ("not-utf8", "/v1/track", b'{"userId": "u1", "event": "e"}\xe9', {}, True, 400,
     "malformed JSON", "not UTF-8: byte 30 is 0xe9"),
    # A Latin-1 byte in a string is not the trouble of this one: its trailing comma is.
    ("not-utf8-and-comma", "/v1/track", b'{"userId": "caf\xe9", "event": "e",}', {}, True,
     400, "malformed JSON", "trailing comma"),
    ("timestamp-long-spaces", "/v1/track",
     {**TRACK, "timestamp": "2015-12-10" + " " * 20_000 + "x"}, {}, True, 400,
     "invalid event", "timestamp"),
    ("unknown-path", "/v1/trak", TRACK, {}, True, 404, "not found", "no endpoint at /v1/trak"),
    ("post-to-healthz", "/healthz", TRACK, {}, True, 405, "method not allowed",
     "POST /healthz: this endpoint takes GET, HEAD"),
    ("nested-too-deep", "/v1/track",
     b'{"userId": "u1", "event": "Bad", "properties": ' + b'{"a": ' * 300 + b"{}" + b"}" * 301,
     {}, True, 400, "invalid event", "nested more than 254 levels deep"),
]  # fmt: skip


async def test_ingest_bad_inputs_get_4xx_json_and_are_not_delivered(make_daemon, tmp_path, session):
    bomb = _gzip_bomb()
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        for case_id, path, body, headers, auth, status, error, detail in BAD_INPUTS:
            data = bomb if body == "BOMB" else body
            got_status, got = await post(
                session, daemon.url + path, data, auth=auth, headers=headers
            )
            assert got_status == status, (case_id, got)
            assert got["success"] is False, case_id
            assert error in got["error"], (case_id, got)
            assert detail in got.get("detail", ""), (case_id, got)
            # Segment's own fields, which its SDKs log: a slug and the whole message.
            assert re.fullmatch("[a-z_]+", got["code"]), (case_id, got)
            assert got["error"] in got["message"] and detail in got["message"], (case_id, got)
        # Healthy after all of it, and the first thing delivered is the good event.
        async with session.get(f"{daemon.url}/healthz") as resp:
            assert resp.status == 200
        good = {"userId": "u1", "event": "Good", "messageId": "good-1"}
        assert (await post(session, f"{daemon.url}/v1/track", good))[0] == 200
        await sink.wait_for(lambda: len(sink.delivered()) >= 1)
        await asyncio.sleep(0.3)
        assert [e["messageId"] for e in sink.delivered()] == ["good-1"]
        assert daemon.proc.poll() is None
        assert not [r for r in daemon.log_records() if r.get("level") in ("error", "critical")]


async def test_ingest_batch_context_merged_and_gzip_accepted(make_daemon, tmp_path, session):
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        body = {
            "batch": [
                {"type": "track", "userId": "u1", "event": "A"},
                {"type": "identify", "userId": "u1", "context": {"ip": "1.2.3.4"}},
            ],
            "context": {"ip": "9.9.9.9", "app": {"name": "shop"}},
            "integrations": {"All": False, "hook": True},
        }
        status, _ = await post(
            session,
            f"{daemon.url}/v1/batch",
            gzip.compress(orjson.dumps(body)),
            headers={"Content-Encoding": "gzip"},
        )
        assert status == 200
        await sink.wait_for(lambda: len(sink.delivered()) == 2)
        track, identify = sorted(sink.delivered(), key=lambda e: e["type"], reverse=True)
        assert track["context"] == {"ip": "9.9.9.9", "app": {"name": "shop"}}
        assert identify["context"] == {"ip": "1.2.3.4", "app": {"name": "shop"}}
        assert track["integrations"] == {"All": False, "hook": True}


async def test_ingest_integrations_object_routes_events_between_destinations(
    make_daemon, tmp_path, session
):
    """Segment's `integrations` object, by destination name: "All": false with some named
    true sends only to those, a name with false leaves that one out; a batch's object is
    merged into each message. An event it turns every destination off for is accepted and
    stored nowhere."""
    async with Sink() as mixpanel, Sink() as analytics, Sink() as crm:
        # A destination's key there is its name, or its integrations_key (a name has no space).
        dests = (webhook("Mixpanel", mixpanel.url)
                 + webhook("ga", analytics.url, integrations_key="Google Analytics")
                 + webhook("crm", crm.url))  # fmt: skip
        daemon = await make_daemon(config_text(tmp_path / "db.sqlite3", dests)).start()
        # Segment's example: All false, Mixpanel and Kissmetrics (not configured) true, and
        # "Google Analytics" false.
        status, _ = await post(
            session, f"{daemon.url}/v1/identify",
            fixture_body("v1-identify-with-integrations.json"), auth=False,
        )  # fmt: skip
        assert status == 200
        batch = {
            "batch": [
                {"type": "track", "userId": "u", "event": "not to crm", "messageId": "b1"},
                {"type": "track", "userId": "u", "event": "to all", "messageId": "b2",
                 "integrations": {"crm": {"listId": 7}}},
                {"type": "track", "userId": "u", "event": "to none", "messageId": "b3",
                 "integrations": {"All": False}},
                {"type": "track", "userId": "u", "event": "to crm alone", "messageId": "b4",
                 "integrations": {"All": False, "crm": True, "Mixpanel": False}},
            ],
            "integrations": {"crm": False},
        }  # fmt: skip
        status, _ = await post(session, f"{daemon.url}/v1/batch", batch)
        assert status == 200
        status, _ = await post(session, f"{daemon.url}/v1/track",
                               {"userId": "u", "event": "plain", "messageId": "p"})  # fmt: skip
        assert status == 200
        expected = {
            mixpanel: ["Peter Gibbons", "not to crm", "to all", "plain"],
            analytics: ["not to crm", "to all", "plain"],
            crm: ["to all", "to crm alone", "plain"],
        }
        for sink, names in expected.items():
            await sink.wait_for(lambda s=sink, n=names: len(s.delivered()) >= len(n))
        await asyncio.sleep(0.3)  # and nothing more comes
        for sink, names in expected.items():
            got = [e.get("event") or e["traits"]["name"] for e in sink.delivered()]
            assert sorted(got) == sorted(names)
        deadline = time.monotonic() + 10
        while True:  # the outcomes are committed just after the POSTs
            counts = orjson.loads(run_cli("stats", "--config", str(daemon.config), "--json").stdout)
            delivered = {name: c["delivered"] for name, c in counts.items()}
            if delivered == {"Mixpanel": 4, "ga": 3, "crm": 3} or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert delivered == {"Mixpanel": 4, "ga": 3, "crm": 3}
        with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite3")) as conn:
            stored = {m for (m,) in conn.execute("SELECT message_id FROM events")}
        assert "b3" not in stored and {"b1", "b2", "b4", "p"} <= stored


def _ip_sources() -> str:
    return (
        f'[[sources]]\nname = "web"\nwrite_key = "{WRITE_KEY}"\nfill_ip = true\n'
        '[[sources]]\nname = "backend"\nwrite_key = "wk_test_backend"\n'
    )


async def test_ingest_fill_ip_sets_context_ip_from_the_request(make_daemon, tmp_path, session):
    """A source with fill_ip gets context.ip as Segment's servers set it for client-side
    sources: the peer's address, or the client's from X-Forwarded-For when a proxy on this host
    sends it (trusted by default); an address the event brings is kept (0.0.0.0 opts out)."""
    async with Sink() as sink:
        cfg = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url), sources=_ip_sources())
        daemon = await make_daemon(cfg).start()

        async def send(body: dict, *xff: str, path: str = "/v1/track") -> None:
            headers = CIMultiDict(("X-Forwarded-For", line) for line in xff)
            status, answer = await post(
                session, daemon.url + path, body, auth=False, headers=headers
            )
            assert (status, answer) == (200, {"success": True})

        def track(label: str, key: str = WRITE_KEY, **extra) -> dict:
            return {"writeKey": key, "type": "track", "event": label, "anonymousId": "a-1", **extra}

        await send(track("direct"))
        await send(track("proxied"), "192.0.2.1, 198.51.100.7")
        # A proxy that adds its own header line after the client's (HAProxy): the later wins.
        await send(track("two lines"), "6.6.6.6", "198.51.100.9")
        await send(track("opted out", context={"ip": "0.0.0.0", "locale": "de-DE"}))
        await send(track("server side", key="wk_test_backend"))
        batch = [track("batched"), track("batched own", context={"ip": "24.5.68.47"})]
        await send({"writeKey": WRITE_KEY, "batch": batch}, "198.51.100.8", path="/v1/batch")
        # A batch-level context.ip is merged into each message first, so it stands.
        body = {"writeKey": WRITE_KEY, "batch": [track("batch ip")], "context": {"ip": "192.0.2.9"}}
        await send(body, path="/v1/batch")
        await sink.wait_for(lambda: len(sink.delivered()) == 8)
        context = {e["event"]: e.get("context") for e in sink.delivered()}
        assert context == {
            "direct": {"ip": "127.0.0.1"},
            "proxied": {"ip": "198.51.100.7"},
            "two lines": {"ip": "198.51.100.9"},
            "opted out": {"ip": "0.0.0.0", "locale": "de-DE"},
            "server side": None,  # its source has no fill_ip: nothing added
            "batched": {"ip": "198.51.100.8"},
            "batched own": {"ip": "24.5.68.47"},
            "batch ip": {"ip": "192.0.2.9"},
        }


async def test_ingest_fill_ip_ignores_forwarded_for_from_untrusted_peers(
    make_daemon, tmp_path, session
):
    async with Sink() as sink:
        server = 'trusted_proxies = ["10.0.0.0/8"]\n'  # not loopback, where the test posts from
        cfg = config_text(
            tmp_path / "db.sqlite3", webhook("hook", sink.url), server=server, sources=_ip_sources()
        )
        daemon = await make_daemon(cfg).start()
        body = {"type": "track", "event": "spoofed", "anonymousId": "a-1"}
        headers = {"X-Forwarded-For": "198.51.100.7"}
        status, _ = await post(session, f"{daemon.url}/v1/track", body, headers=headers)
        assert status == 200
        await sink.wait_for(lambda: len(sink.delivered()) == 1)
        assert sink.delivered()[0]["context"] == {"ip": "127.0.0.1"}


async def test_ingest_gzip_members_lone_surrogates_and_latin1_are_delivered(
    make_daemon, tmp_path, session
):
    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        # Two gzip members (RFC 1952), the JSON split across them, then zero padding.
        body = orjson.dumps({"userId": "u1", "event": "Two Members", "messageId": "gz-2"})
        data = gzip.compress(body[:10]) + gzip.compress(body[10:]) + b"\0" * 8
        headers = {"Content-Encoding": "gzip"}
        assert (await post(session, f"{daemon.url}/v1/track", data, headers=headers))[0] == 200
        # "\ud83d" alone: a string cut in the middle of an emoji by JSON.stringify.
        cut = b'{"userId": "u1", "event": "Cut", "messageId": "cut-1", "properties": '
        cut += b'{"title": "Caf\\u00e9 \\ud83d", "\\udc00k": "\\ud83d\\ude00"}}'
        assert (await post(session, f"{daemon.url}/v1/track", cut))[0] == 200
        # Latin-1 bytes in strings (a shell script's curl), one cut before a quote: each is
        # U+FFFD, as Go's encoding/json (Segment's API) reads them, and no quote is lost.
        latin = b'{"userId": "u1", "event": "Latin", "messageId": "latin-1", "properties": '
        latin += b'{"city": "Besan\xe7on", "caf\xe9": "x\xe2", "ok": "\xe2\x82\xac"}}'
        assert (await post(session, f"{daemon.url}/v1/track", latin))[0] == 200
        # x-gzip: gzip's old name, which RFC 9110 asks servers to take as gzip (it was 415).
        old = orjson.dumps({"userId": "u1", "event": "Old Name", "messageId": "x-gz"})
        headers = {"Content-Encoding": "x-gzip"}
        status, _ = await post(
            session, f"{daemon.url}/v1/track", gzip.compress(old), headers=headers
        )
        assert status == 200
        await sink.wait_for(lambda: len(sink.delivered()) == 4)
        by_id = {e["messageId"]: e for e in sink.delivered()}
        assert by_id["gz-2"]["event"] == "Two Members"
        assert by_id["cut-1"]["properties"] == {"title": "Café \ufffd", "\ufffdk": "😀"}
        assert by_id["latin-1"]["properties"] == {
            "city": "Besan\ufffdon",
            "caf\ufffd": "x\ufffd",
            "ok": "€",
        }


async def test_ingest_refuses_with_503_what_would_pass_the_bytes_waiting_to_be_stored(
    tmp_path, session, monkeypatch
):
    """What accepted requests hold in memory until their commit had no bound but the number
    of connections (a few KB of gzip can be 8 MB of events). Over the bound a request gets a
    503 that SDKs retry, and is not stored; one request alone is never refused for it. (The
    bound made one byte here, so that any request arriving while another waits is over.)"""
    from destfnd import ingest

    monkeypatch.setattr(ingest, "PENDING_BYTES_MAX", 1)
    async with Sink() as sink:
        cfg = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        async with running_daemon(tmp_path, cfg) as daemon:
            pad = "x" * 2000  # over 64 KB a request: small ones are never refused for it
            batches = [
                {"batch": [{"type": "track", "userId": "u", "event": "E",
                            "messageId": f"w{i}-{j}", "properties": {"pad": pad}}
                           for j in range(40)]}
                for i in range(20)
            ]  # fmt: skip
            answers = await asyncio.gather(
                *(post(session, f"{daemon.url}/v1/batch", b) for b in batches)
            )
            statuses = [status for status, _ in answers]
            assert 200 in statuses and 503 in statuses, statuses
            for status, body in answers:
                assert status in (200, 503), body
                if status == 503:
                    assert body["error"] == "busy", body
                    assert "too many events are waiting to be stored" in body["detail"]
            acked = {e["messageId"] for (status, _), b in zip(answers, batches, strict=True)
                     if status == 200 for e in b["batch"]}  # fmt: skip
            await sink.wait_for(lambda: sink.delivered_ids() == acked)
            stored = {row["message_id"] for row in daemon.deliveries()}
            assert stored == acked  # the refused ones were not stored
            # Alone, a request goes through, however big; a small one, whatever waits.
            status, _ = await post(session, f"{daemon.url}/v1/batch", batches[0])
            assert status == 200
            small = [{"batch": [{"type": "track", "userId": "u", "event": "S",
                                 "messageId": f"s{i}"}]} for i in range(20)]  # fmt: skip
            answers = await asyncio.gather(
                *(post(session, f"{daemon.url}/v1/batch", b) for b in small),
                *(post(session, f"{daemon.url}/v1/batch", b) for b in batches[1:5]),
            )
            assert [status for status, _ in answers[:20]] == [200] * 20


async def _raw(url: str, request: bytes, wait_s: float = 10.0) -> bytes:
    """Send `request` on a fresh connection; what comes back first (b"" if the server closes
    the connection without answering)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        async with asyncio.timeout(wait_s):
            answer = await reader.read(65536)
    finally:
        writer.close()
    return answer


async def test_ingest_slow_and_broken_clients_are_answered_and_logged_on_one_line(
    make_daemon, tmp_path
):
    async with Sink() as sink:
        server = 'body_timeout = "1s"\nkeepalive_timeout = "1s"\n'
        daemon = await start(make_daemon, tmp_path, sink, server=server)
        head = f"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
        # A body that never finishes arriving: 408 once body_timeout has passed.
        answer = await _raw(daemon.url, f"{head}Content-Length: 100\r\n\r\n{{".encode())
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive within 1s" in answer
        # A declared length over the limit: 413 at once, without waiting for the body.
        answer = await _raw(daemon.url, f"{head}Content-Length: 600000\r\n\r\n{{".encode())
        assert answer.startswith(b"HTTP/1.1 413"), answer  # (a 408 while it waited for it)
        # A connection that sends no request is closed after keepalive_timeout.
        answer = await _raw(daemon.url, b"")
        assert answer == b""
        # Malformed HTTP, and a client gone in the middle of its body: aiohttp answers or
        # drops them; the log gets one JSON line each, no traceback.
        await _raw(
            daemon.url, b"POST /v1/track HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        _, writer = await asyncio.open_connection(*daemon.url.removeprefix("http://").split(":"))
        writer.write(f"{head}Content-Length: 100\r\n\r\n{{".encode())
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        for _ in range(200):  # bounded: until both lines are logged
            errors = [r for r in daemon.log_records() if r.get("event") == "http_client_error"]
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.05)
        assert {r["error"].split(":")[0] for r in errors} == {
            "BadHttpMessage",
            "ConnectionResetError",
        }, errors
        assert all(r["level"] == "info" for r in errors)
        assert "Traceback" not in daemon.log_text()
        assert [r for r in daemon.log_records() if r.get("event") == "<not json>"] == []
        assert daemon.proc.poll() is None
        assert sink.delivered() == []


async def test_ingest_running_out_of_file_descriptors_is_said(make_daemon, tmp_path, session):
    """Out of file descriptors, the event loop accepts and closes new connections without a
    word, and a commit fails with SQLite's "unable to open database file": the daemon now
    raises its soft limit to the hard one as it starts, and says when they run out."""
    dest = '[[destinations]]\nname = "archive"\ntype = "file"\npath = "out.ndjson"\n'
    import resource

    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # only root may raise it
    raised = make_daemon(config_text(tmp_path / "db", dest), open_files=(64, hard))
    await raised.start()
    (ready,) = [r for r in raised.log_records() if r.get("event") == "daemon_ready"]
    assert ready["open_files_limit"] == hard > 64
    assert await raised.terminate() == 0

    low = make_daemon(config_text(tmp_path / "db", dest), open_files=(48, 48))
    await low.start()
    host, port = low.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(60):  # more than the limit: the last ones are closed at once
            held.append(await asyncio.open_connection(host, int(port)))
        for _ in range(150):  # bounded: 15 s (the check runs every 5 s)
            said = [r for r in low.log_records() if r.get("event") == "file_descriptors_low"]
            if said:
                break
            await asyncio.sleep(0.1)
        assert said, low.log_text()
        assert (said[0]["limit"], said[0]["level"]) == (48, "warning"), said
        assert said[0]["open"] >= 0.9 * 48
    finally:
        for _, writer in held:
            writer.close()
    # Once they are given back, it works as before.
    for _ in range(50):  # bounded: the daemon sees the connections closed
        with contextlib.suppress(aiohttp.ClientError):
            status, _ = await post(session, f"{low.url}/v1/track", {"userId": "u", "event": "e"})
            if status == 200:
                break
        await asyncio.sleep(0.1)
    assert status == 200
    assert await low.terminate() == 0


async def test_ingest_expect_100_continue_refuses_from_the_head(make_daemon, tmp_path):
    """With `Expect: 100-continue` a client waits before sending its body: an unknown key or a
    declared size over the limit is refused then (it got "100 Continue", sent megabytes, and
    was refused after). A good request gets 100 Continue, then its answer."""
    daemon = await make_daemon(config_text(tmp_path / "db", "")).start()
    host, port = daemon.url.removeprefix("http://").split(":")

    async def head(auth: bytes, length: int) -> tuple[bytes, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Authorization: Basic " + base64.b64encode(auth + b":") + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
        )
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 10), writer

    unknown, writer = await head(b"nope", 5_000_000)
    writer.close()
    assert unknown.startswith(b"HTTP/1.1 401 "), unknown
    assert b"\r\nConnection: close\r\n" in unknown  # its body was never sent
    too_big, writer = await head(WRITE_KEY.encode(), 5_000_000)
    writer.close()
    assert too_big.startswith(b"HTTP/1.1 413 "), too_big
    body = orjson.dumps(TRACK)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/track HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nAuthorization: Basic "
        + base64.b64encode(WRITE_KEY.encode() + b":")
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"success":true}'), answer
    # HTTP/1.0 has no 100 Continue: the expectation is ignored (RFC 9110), not a 417.
    old = await _raw(
        daemon.url,
        b"POST /v1/track HTTP/1.0\r\nExpect: 100-continue\r\nAuthorization: Basic "
        + base64.b64encode(WRITE_KEY.encode() + b":")
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body,
    )
    assert old.startswith(b"HTTP/1.1 200 ") or old.startswith(b"HTTP/1.0 200 "), old
    assert await daemon.terminate() == 0


async def test_ingest_refused_requests_cannot_flood_the_log(make_daemon, tmp_path, session):
    """Anyone can send refused requests, without a write key: their lines come at a bounded
    rate, and the next line let through counts those held back. One client made 5,000
    lines a second, past journald's own limit, which then drops the lines that matter."""
    from destfnd.ingest import REJECTED_LINES_BURST, REJECTED_LINES_PER_S

    async with Sink() as sink:
        daemon = await start(make_daemon, tmp_path, sink)
        bad = {"Authorization": "Basic " + base64.b64encode(b"wrong-key:").decode()}
        started = time.monotonic()
        for _ in range(400):
            async with session.post(f"{daemon.url}/v1/track", json={}, headers=bad) as resp:
                assert resp.status == 401
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)  # tokens for a line or more
        async with session.get(f"{daemon.url}/nowhere") as resp:
            assert resp.status == 404
        await asyncio.sleep(0.3)
    lines = [r for r in daemon.log_records() if r.get("event") == "request_rejected"]
    assert len(lines) <= REJECTED_LINES_BURST + REJECTED_LINES_PER_S * elapsed + 2, len(lines)
    last = lines[-1]
    assert last["path"] == "/nowhere" and last["status"] == 404
    assert last["not_logged"] > 0, last
    # Every refusal is either a line or counted in the next line let through.
    logged_401 = sum(1 for r in lines if r["status"] == 401)
    assert logged_401 + sum(r.get("not_logged", 0) for r in lines) == 400, lines
