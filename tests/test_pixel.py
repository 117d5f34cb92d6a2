"""Segment's Tracking Pixel API: GET /v1/pixel/<type> with the event in the query, a GIF back."""

from __future__ import annotations

import base64
from urllib.parse import quote

import orjson
import pytest
from support import WRITE_KEY, Sink, config_text, webhook
from yarl import URL

from destfnd.ingest_body import Rejected
from destfnd.ingest_pixel import GIF, pixel_answer, pixel_body


def _b64(value: dict, *, urlsafe: bool = False, pad: bool = False) -> str:
    raw = orjson.dumps(value)
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    return text if pad else text.rstrip("=")


async def _get(session, url: str):
    """GET `url` as written (its query kept byte for byte); status, headers, body."""
    async with session.get(URL(url, encoded=True)) as resp:
        return resp.status, resp.headers, await resp.read()


def test_dotted_parameters_nest_and_data_wins():
    query = [
        ("writeKey", "k"),
        ("context.page.path", "/a/"),
        ("context.page.title", "A"),
        ("context.library.name", "amp"),
        ("name", "first"),
        ("name", "second"),  # a later parameter replaces an earlier one
        ("data", _b64({"name": "from data", "context": {"page": {"title": "B"}}})),
    ]
    assert pixel_body(query) == {
        "writeKey": "k",
        "name": "from data",
        "context": {"page": {"path": "/a/", "title": "B"}, "library": {"name": "amp"}},
    }


def test_deep_data_over_deep_parameters_merges_without_recursion():
    """`data` can be nested deeper than Python's recursion limit (orjson reads 1,024 levels),
    and merged over parameters as deep: this was a RecursionError, a 500 for a request
    without any write key."""
    depth = 1_020
    data_text = "{" + '"a":{' * depth + '"y":"2"' + "}" * (depth + 1)
    body = pixel_body([(".".join(["a"] * depth + ["x"]), "1"), ("data", data_text)])
    for _ in range(depth):
        body = body["a"]
    assert body == {"x": "1", "y": "2"}


def test_empty_names_and_empty_data_are_ignored():
    query = [("", "x"), ("data", ""), ("userId", "u"), ("data", _b64({"event": "E"}))]
    assert pixel_body(query) == {"userId": "u", "event": "E"}


def test_a_refusal_or_a_skip_is_still_a_200_gif_saying_why():
    for answer, why in [
        (pixel_answer(Rejected(503, "unavailable", "starting")), "503 unavailable: starting"),
        (pixel_answer(Rejected(401, "unauthorized")), "401 unauthorized"),
        (pixel_answer(skipped="event: missing"), "skipped: event: missing"),
    ]:
        assert (answer.status, answer.body) == (200, GIF)
        assert answer.headers["X-Destfnd-Error"] == why
    assert "X-Destfnd-Error" not in pixel_answer().headers


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ([("a..b", "1")], "an empty name"),
        ([("a", "1"), ("a.b", "2")], "a is a value already"),
        ([("a.b", "1"), ("a", "2")], "its fields are given already"),
        ([("data", "%%%")], "neither base64 nor JSON"),
        ([("data", _b64([1]))], "a JSON list, not object"),
        ([("data", "{nope")], "data: "),
        ([("data", "e30"), ("data", "e30")], "more than once"),
    ],
)
def test_pixel_queries_that_make_no_event_say_why(query, detail):
    with pytest.raises(Rejected) as caught:
        pixel_body(query)
    assert caught.value.status == 400 and detail in caught.value.detail


async def test_pixel_api_delivers_segments_documented_forms(make_daemon, tmp_path, session):
    """The forms of Segment's docs and of AMP's Segment vendor: base64 `data` (unpadded, as
    btoa's output made URL-safe; padded; a "+" that a query turned into a space), JSON as it
    is, and plain parameters in dot notation. Each answers 200 with the GIF, uncacheable,
    and arrives as the POST's event would (its type from the path)."""
    async with Sink() as sink:
        daemon = await make_daemon(
            config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        ).start()
        email = {
            "writeKey": WRITE_KEY, "userId": "user_123", "event": "Email Opened",
            "messageId": "px-1", "properties": {"subject": "The Electric Daily ~~~?>"},
        }  # fmt: skip
        for lead in ("", "x", "xx"):  # ">>>" at a 3-byte boundary is "Pj4+" in base64
            plus = {**email, "messageId": "px-3", "properties": {"s": lead + ">>>"}}
            encoded = _b64(plus, pad=True)
            if "+" in encoded:  # sent bare: the query reads it as a space
                break
        assert "+" in encoded
        traits = {"writeKey": WRITE_KEY, "userId": "u9", "messageId": "px-4",
                  "traits": {"plan": "pro"}}  # fmt: skip
        urls = [
            f"/v1/pixel/track?data={_b64(email, urlsafe=True)}",
            f"/v1/pixel/track/?data={_b64({**email, 'messageId': 'px-2'}, pad=True)}",
            f"/v1/pixel/track?data={encoded}",
            f"/v1/pixel/identify?data={quote(orjson.dumps(traits).decode())}",
            f"/v1/pixel/page?writeKey={WRITE_KEY}&name=About%20us&anonymousId=amp-1"
            "&messageId=px-5&context.library.name=amp&context.page.path=%2Fabout%2F"
            "&context.screen.width=320",
            f"/v1//pixel/screen?writeKey={WRITE_KEY}&userId=u&name=Home&messageId=px-6",
        ]
        for path in urls:
            status, headers, body = await _get(session, daemon.url + path)
            assert (status, body) == (200, GIF), path
            assert headers["Content-Type"] == "image/gif"
            assert "no-store" in headers["Cache-Control"]
            assert "X-Destfnd-Error" not in headers, headers.get("X-Destfnd-Error")
        ids = {f"px-{i}" for i in range(1, 7)}
        await sink.wait_for(lambda: sink.delivered_ids() == ids)
        got = {e["messageId"]: e for e in sink.delivered()}
        assert got["px-1"]["type"] == "track"
        assert got["px-1"]["properties"] == email["properties"]
        assert got["px-3"]["properties"] == plus["properties"]
        assert got["px-4"]["type"] == "identify" and got["px-4"]["traits"] == {"plan": "pro"}
        page = got["px-5"]
        assert (page["type"], page["name"], page["anonymousId"]) == ("page", "About us", "amp-1")
        assert page["context"]["library"] == {"name": "amp"}
        assert page["context"]["page"] == {"path": "/about/"}
        assert page["context"]["screen"] == {"width": "320"}  # a parameter is a string
        assert got["px-6"]["type"] == "screen"
        for event in got.values():
            assert "writeKey" not in event and "receivedAt" in event and "timestamp" in event


async def test_pixel_api_refusals_answer_the_gif_and_say_why(make_daemon, tmp_path, session):
    """As Segment: a refused pixel is still a 200 with the GIF (an `<img>` would show broken
    and nothing retries it); why goes in X-Destfnd-Error and the log, and nothing of it is
    delivered. HEAD records nothing: a 405."""
    async with Sink() as sink:
        daemon = await make_daemon(
            config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        ).start()
        refused = {
            "/v1/pixel/track?writeKey=nope&userId=u&event=E": "401 unauthorized: unknown write key",
            "/v1/pixel/track?userId=u&event=E": "401 unauthorized: send the write key",
            f"/v1/pixel/track?writeKey={WRITE_KEY}&event=E": "400 invalid event",
            f"/v1/pixel/track?writeKey={WRITE_KEY}&userId=u": "400 invalid event",
            f"/v1/pixel/track?writeKey={WRITE_KEY}&data=%25%25": "neither base64 nor JSON",
            f"/v1/pixel/track?writeKey={WRITE_KEY}&userId=u&event=E&timestamp=nope%0d%0aX:%201":
                "400 invalid event: timestamp",
        }  # fmt: skip
        for path, why in refused.items():
            status, headers, body = await _get(session, daemon.url + path)
            assert (status, body) == (200, GIF), path
            assert why in headers["X-Destfnd-Error"], (path, headers["X-Destfnd-Error"])
            assert "\r" not in headers["X-Destfnd-Error"]
        head = f"{daemon.url}/v1/pixel/track?writeKey={WRITE_KEY}&userId=u&event=H"
        async with session.head(head) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET"
        status, _, _ = await _get(
            session, f"{daemon.url}/v1/pixel/track?writeKey={WRITE_KEY}&userId=u&event=Last"
        )
        assert status == 200
        await sink.wait_for(lambda: len(sink.delivered()) == 1)
        assert [e["event"] for e in sink.delivered()] == ["Last"]
        lines = daemon.log_records()
        assert any(line.get("event") == "request_rejected" and line.get("status") == 401
                   for line in lines)  # fmt: skip
