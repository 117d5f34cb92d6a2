"""destfnd.spec against Segment's own published examples and the spec's rules.

The examples are copies of shared/fixtures/segment-docs (CC BY 4.0, see its README.md), kept
under tests/fixtures so a fresh clone runs these tests without the shared folder.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from destfnd.spec import SpecError, enrich, expand, format_timestamp, parse_timestamp, validate

FIXTURES = Path(__file__).parent / "fixtures" / "segment-docs"
SPEC_EXAMPLES = sorted((FIXTURES / "spec").glob("*.json"))
HTTP_EXAMPLES = sorted((FIXTURES / "http-api").glob("*.json"))
RECEIVED_AT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def load(relative: str | Path) -> dict:
    return json.loads((FIXTURES / relative).read_text())


def endpoint_type(path: Path) -> str | None:
    # v1-identify-with-integrations.json -> "identify"; v1-batch.json -> None (/v1/batch)
    kind = path.stem.split("-")[1]
    return None if kind == "batch" else kind


def test_fixtures_are_present_with_attribution():
    # Guards against a fresh clone silently running the parametrized tests over nothing.
    assert len(SPEC_EXAMPLES) >= 7
    assert len(HTTP_EXAMPLES) >= 7
    assert "CC BY 4.0" in (FIXTURES / "README.md").read_text()


@pytest.mark.parametrize("path", SPEC_EXAMPLES, ids=lambda p: p.stem)
def test_validate_accepts_spec_example(path):
    event = json.loads(path.read_text())
    assert validate(copy.deepcopy(event)) == event


@pytest.mark.parametrize("path", HTTP_EXAMPLES, ids=lambda p: p.stem)
def test_expand_then_validate_accepts_http_api_example(path):
    body = json.loads(path.read_text())
    kind = endpoint_type(path)
    messages = expand(body, kind)
    expected_count = len(body["batch"]) if kind is None else 1
    assert len(messages) == expected_count
    for index, message in enumerate(messages):
        validate(message, f"batch[{index}]." if kind is None else "")
        assert "writeKey" not in message
        if kind is not None:
            assert message["type"] == kind


ROUTES = (("crm", "crm"), ("ga", "Google Analytics"), ("mp", "Mixpanel"))


@pytest.mark.parametrize(
    ("integrations", "on"),
    [
        (None, None),
        ({}, None),
        ({"All": True, "Segment.io": {"apiHost": "x"}}, None),
        ({"crm": True}, None),
        ({"crm": False}, ("ga", "mp")),
        ({"Google Analytics": False}, ("crm", "mp")),
        ({"ga": False}, None),  # its key is "Google Analytics": "ga" names nothing
        ({"google analytics": False}, None),  # case-sensitive, as Segment's
        ({"All": False}, ()),
        ({"All": False, "Mixpanel": True, "crm": {"listId": 7}}, ("crm", "mp")),
        ({"All": False, "Mixpanel": {}}, ("mp",)),  # options, even none, turn it on
        # Only false turns off, as analytics.js tests it (=== false).
        ({"All": None, "crm": 0, "Mixpanel": "", "Google Analytics": None}, None),
        ({"All": False, "crm": None, "Mixpanel": 0}, ("crm", "mp")),
        ({"All": 0}, None),
    ],
)
def test_routed_reads_the_integrations_object_as_segment_does(integrations, on):
    from destfnd.spec import routed

    assert routed(ROUTES, integrations) == on


def test_expand_batch_merges_batch_context_into_each_message():
    body = load("http-api/v1-batch.json")
    batch_context = copy.deepcopy(body["context"])
    messages = expand(body, None)
    assert len(messages) == 4
    for message in messages:
        assert message["context"] == batch_context


def test_expand_batch_message_context_keys_win_over_batch_keys():
    body = load("http-api/v1-batch.json")
    body["context"]["locale"] = "en-US"
    own = {"device": {"type": "tablet"}, "ip": "203.0.113.7"}
    body["batch"][1]["context"] = copy.deepcopy(own)
    messages = expand(body, None)
    # The message's own keys replace the batch's; batch keys it lacks are still added.
    assert messages[1]["context"] == {**own, "locale": "en-US"}
    assert messages[0]["context"]["device"] == {"type": "phone", "name": "Apple iPhone 6"}
    assert messages[0]["context"]["locale"] == "en-US"


def test_expand_batch_applies_batch_sent_at_unless_message_has_its_own():
    body = {
        "sentAt": "2024-05-01T11:00:00.000Z",
        "batch": [
            {"type": "track", "userId": "u", "event": "a"},
            {"type": "track", "userId": "u", "event": "b", "sentAt": "2024-05-01T10:00:00Z"},
        ],
    }
    first, second = expand(body, None)
    assert first["sentAt"] == "2024-05-01T11:00:00.000Z"
    assert second["sentAt"] == "2024-05-01T10:00:00Z"


def test_expand_rejects_type_that_contradicts_endpoint():
    with pytest.raises(SpecError) as info:
        expand({"type": "identify", "userId": "u"}, "track")
    assert info.value.path == "type"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ([], "body"),
        ({"batch": {"type": "track"}}, "batch"),
        ({"batch": [{"type": "track"}, "oops"]}, "batch[1]"),
        ({"batch": [], "context": "web"}, "context"),
    ],
)
def test_expand_rejects_malformed_batch_body(body, path):
    with pytest.raises(SpecError) as info:
        expand(body, None)
    assert info.value.path == path


def test_validate_accepts_sloppy_batch_timestamp_from_segment_docs():
    messages = expand(load("http-api/v1-batch.json"), None)
    assert messages[2]["timestamp"] == "2015-2-02T00:30:08.276Z"
    validate(messages[2], "batch[2].")
    assert parse_timestamp(messages[2]["timestamp"]) == datetime(
        2015, 2, 2, 0, 30, 8, 276000, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-2-02T00:30:08.276Z", datetime(2015, 2, 2, 0, 30, 8, 276000, tzinfo=UTC)),
        ("2020-01-01T12:00:00Z", datetime(2020, 1, 1, 12, 0, tzinfo=UTC)),
        # 12:00 at UTC+2 is 10:00 UTC.
        ("2020-01-01T12:00:00+02:00", datetime(2020, 1, 1, 10, 0, tzinfo=UTC)),
        ("2020-01-01T12:00:00+0200", datetime(2020, 1, 1, 10, 0, tzinfo=UTC)),
        # 12:00 at UTC-5:30 is 17:30 UTC.
        ("2020-01-01T12:00:00-0530", datetime(2020, 1, 1, 17, 30, tzinfo=UTC)),
        ("2020-01-01T12:00:00-05:30", datetime(2020, 1, 1, 17, 30, tzinfo=UTC)),
        # Crossing midnight backwards.
        ("2020-01-01T01:00:00+03:00", datetime(2019, 12, 31, 22, 0, tzinfo=UTC)),
        # No zone: UTC.
        ("2020-01-01T12:00:00", datetime(2020, 1, 1, 12, 0, tzinfo=UTC)),
        ("2020-01-01", datetime(2020, 1, 1, tzinfo=UTC)),
        # Nanoseconds (Go clients) are truncated to microseconds.
        ("2020-01-01T12:00:00.123456789Z", datetime(2020, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        # RFC 3339 allows lowercase t and z.
        ("2015-02-02t00:30:08z", datetime(2015, 2, 2, 0, 30, 8, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_converts_to_utc(text, expected):
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2015-13-01T00:00:00Z",
        "2015-02-30T00:00:00Z",
        "2015-02-01T25:00Z",
        "",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "0001-01-01 00:00:00+0100",  # the same through the lenient parser
        "9999-12-31T23:30:00-01:00",  # after year 9999 in UTC
        "2020-02-03T00:00:00+99:99",  # offsets beyond a day, through the lenient parser
        "2020-02-03 00:00:00+24:00",
        "2020-02-03 00:00:00-0060",
        "2020-02-03T10:00:00+00:60",  # the same through fromisoformat, which takes it
        "2020-02-03T10:00:00.123-0099",
        "2020-02-03T10:00:00+00:00:99",  # offset seconds, likewise
    ],
)
def test_parse_timestamp_rejects_unparseable(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


@pytest.mark.parametrize("value", ["yesterday", "2015-13-01T00:00:00Z", 12345])
@pytest.mark.parametrize("field", ["timestamp", "sentAt"])
@pytest.mark.parametrize("prefix", ["", "batch[3]."])
def test_validate_rejects_unparseable_timestamp_naming_field(value, field, prefix):
    event = {"type": "track", "userId": "u1", "event": "Signed Up", field: value}
    with pytest.raises(SpecError) as info:
        validate(event, prefix)
    assert info.value.path == f"{prefix}{field}"
    assert str(info.value).startswith(f"{prefix}{field}: ")


def test_format_timestamp_writes_utc_milliseconds_z():
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2020, 1, 1, 12, 0, tzinfo=plus_two)) == (
        "2020-01-01T10:00:00.000Z"
    )
    # Milliseconds are truncated, not rounded: .276999 stays .276.
    assert format_timestamp(datetime(2015, 2, 2, 0, 30, 8, 276999, tzinfo=UTC)) == (
        "2015-02-02T00:30:08.276Z"
    )


def test_format_timestamp_round_trips_through_parse_timestamp():
    dt = datetime(2015, 2, 2, 0, 30, 8, 276000, tzinfo=UTC)
    assert parse_timestamp(format_timestamp(dt)) == dt
    assert format_timestamp(parse_timestamp("2015-2-02T00:30:08.276Z")) == (
        "2015-02-02T00:30:08.276Z"
    )


INVALID_MESSAGES = [
    pytest.param({"userId": "u1", "event": "e"}, "type", id="missing-type"),
    pytest.param({"type": "purchase", "userId": "u1"}, "type", id="unknown-type"),
    pytest.param({"type": "track", "userId": "u1"}, "event", id="track-without-event"),
    pytest.param({"type": "track", "userId": "u1", "event": "  "}, "event", id="blank-event"),
    pytest.param({"type": "track", "event": "e"}, "userId", id="no-user-or-anonymous-id"),
    pytest.param({"type": "identify", "userId": "", "anonymousId": " "}, "userId", id="blank-ids"),
    pytest.param({"type": "alias", "userId": "u1"}, "previousId", id="alias-without-previousId"),
    pytest.param({"type": "group", "userId": "u1"}, "groupId", id="group-without-groupId"),
    pytest.param({"type": "delete", "anonymousId": "a1"}, "userId", id="delete-without-userId"),
    pytest.param(
        {"type": "track", "userId": "u1", "event": "e", "properties": [1, 2]},
        "properties",
        id="properties-not-object",
    ),
    pytest.param(
        {"type": "identify", "userId": "u1", "traits": "vip"}, "traits", id="traits-not-object"
    ),
    pytest.param(
        {"type": "identify", "userId": "u1", "context": ["ip"]}, "context", id="context-not-object"
    ),
    pytest.param(
        {"type": "track", "userId": "u1", "event": "e", "messageId": {"id": 123}},
        "messageId",
        id="messageId-object",
    ),
    pytest.param({"type": "identify", "userId": {"id": 1}}, "userId", id="userId-object"),
]


@pytest.mark.parametrize(("event", "path"), INVALID_MESSAGES)
@pytest.mark.parametrize("prefix", ["", "batch[3]."])
def test_validate_rejects_invalid_message_with_field_path(event, path, prefix):
    with pytest.raises(SpecError) as info:
        validate(copy.deepcopy(event), prefix)
    assert info.value.path == f"{prefix}{path}"


def test_expand_and_validate_take_phps_empty_arrays_for_empty_objects():
    """analytics-php's json_encode writes an empty `integrations` (or context) as []: a 400
    it does not retry lost the batch. Only an empty one: [1, 2] is still refused above."""
    body = {
        "batch": [{"type": "track", "userId": "u", "event": "e", "integrations": [],
                   "properties": [], "context": []}],
        "context": [],
        "integrations": [],
    }  # fmt: skip
    (message,) = expand(body, None)
    checked = validate(message, "batch[0].")
    assert [checked[k] for k in ("integrations", "properties", "context")] == [{}, {}, {}]
    body["context"] = {"ip": "1.2.3.4"}  # merged into the message's empty one
    body["batch"][0]["context"] = []
    assert validate(expand(body, None)[0])["context"] == {"ip": "1.2.3.4"}


def test_validate_rejects_non_object_message_naming_its_position():
    with pytest.raises(SpecError) as info:
        validate(["track"], "batch[3].")
    assert info.value.path == "batch[3]"


def test_validate_coerces_numeric_ids_to_strings():
    event = validate({"type": "identify", "userId": 12345, "anonymousId": 7, "messageId": 42})
    assert event["userId"] == "12345"
    assert event["anonymousId"] == "7"
    assert event["messageId"] == "42"


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_message_id_is_filled_as_a_missing_one(blank):
    """Refused before (""), or kept (" ") so that every blank id deduplicated into one."""
    event = validate({"type": "track", "userId": "u1", "event": "e", "messageId": blank})
    enrich(event, RECEIVED_AT, new_message_id=lambda: "generated-1")
    assert event["messageId"] == "generated-1"


def test_validate_accepts_partner_spec_delete_with_null_context():
    event = load("partner-spec/delete-delivered.json")
    assert event["context"] is None
    assert validate(event)["userId"] == "507f191e81"


def test_enrich_fills_missing_message_id_and_sets_received_at():
    event = validate({"type": "track", "userId": "u1", "event": "e"})
    enrich(event, RECEIVED_AT, new_message_id=lambda: "generated-1")
    assert event["messageId"] == "generated-1"
    assert event["receivedAt"] == "2024-05-01T12:00:00.000Z"


def test_enrich_fills_message_id_with_unique_default():
    a = enrich({"type": "track", "userId": "u1", "event": "e"}, RECEIVED_AT)
    b = enrich({"type": "track", "userId": "u1", "event": "e"}, RECEIVED_AT)
    assert a["messageId"] and b["messageId"]
    assert a["messageId"] != b["messageId"]


def test_enrich_keeps_given_message_id():
    event = {"type": "track", "userId": "u1", "event": "e", "messageId": "client-42"}
    enrich(event, RECEIVED_AT, new_message_id=lambda: "generated-1")
    assert event["messageId"] == "client-42"


def test_enrich_without_sent_at_keeps_timestamp():
    event = {"type": "track", "userId": "u1", "event": "e", "timestamp": "2024-04-30T08:15:00Z"}
    enrich(event, RECEIVED_AT)
    assert parse_timestamp(event["timestamp"]) == datetime(2024, 4, 30, 8, 15, tzinfo=UTC)


def test_enrich_with_sent_at_corrects_client_clock_skew():
    # The client's clock says it made the call 5 s before sending it; it is an hour slow,
    # so Segment trusts only the 5 s difference: timestamp = receivedAt - 5 s.
    client_timestamp = "2024-05-01T11:00:00.000Z"
    event = {
        "type": "track",
        "userId": "u1",
        "event": "e",
        "timestamp": client_timestamp,
        "sentAt": "2024-05-01T11:00:05.000Z",
    }
    enrich(event, RECEIVED_AT)
    assert parse_timestamp(event["timestamp"]) == RECEIVED_AT - timedelta(seconds=5)
    assert parse_timestamp(event["originalTimestamp"]) == parse_timestamp(client_timestamp)
    assert parse_timestamp(event["sentAt"]) == datetime(2024, 5, 1, 11, 0, 5, tzinfo=UTC)


def test_enrich_skew_correction_handles_offsets_and_sloppy_dates():
    # 2015-2-02T02:30:08.276+02:00 is 00:30:08.276 UTC; sent 1.724 s later by the same clock.
    event = {
        "type": "identify",
        "userId": "u1",
        "timestamp": "2015-2-02T02:30:08.276+02:00",
        "sentAt": "2015-02-02T00:30:10Z",
    }
    enrich(event, RECEIVED_AT)
    assert parse_timestamp(event["timestamp"]) == RECEIVED_AT - timedelta(milliseconds=1724)
    assert parse_timestamp(event["originalTimestamp"]) == datetime(
        2015, 2, 2, 0, 30, 8, 276000, tzinfo=UTC
    )


def test_enrich_writes_sent_at_in_one_format_whether_or_not_it_corrects_a_timestamp():
    sent = "2020-01-01T00:00:10Z"
    alone = enrich({"type": "identify", "userId": "u1", "sentAt": sent}, RECEIVED_AT)
    used = enrich(
        {"type": "identify", "userId": "u1", "sentAt": sent, "timestamp": "2020-01-01T00:00:00Z"},
        RECEIVED_AT,
    )
    assert alone["sentAt"] == used["sentAt"] == "2020-01-01T00:00:10.000Z"
    assert alone["timestamp"] == alone["receivedAt"]  # no timestamp: receivedAt, as before


def test_enrich_without_timestamp_uses_received_at():
    event = enrich({"type": "track", "userId": "u1", "event": "e"}, RECEIVED_AT)
    assert event["timestamp"] == event["receivedAt"] == "2024-05-01T12:00:00.000Z"


def test_enrich_removes_write_key():
    event = {"type": "track", "userId": "u1", "event": "e", "writeKey": "wk_secret"}
    enrich(event, RECEIVED_AT)
    assert "writeKey" not in event


def test_enrich_after_expand_keeps_every_http_api_example_valid():
    for path in HTTP_EXAMPLES:
        for message in expand(json.loads(path.read_text()), endpoint_type(path)):
            enriched = enrich(validate(message), RECEIVED_AT)
            # An enriched event is still a valid one (it is what destinations receive).
            validate(enriched)
            assert enriched["receivedAt"] == "2024-05-01T12:00:00.000Z"


def test_enrich_without_sent_at_writes_timestamp_in_destfnds_format():
    # Kept verbatim when already canonical; rewritten otherwise (other digits, offsets).
    for given, expected in [
        ("2024-04-30T08:15:00.250Z", "2024-04-30T08:15:00.250Z"),
        ("2024-04-30T10:15:00+02:00", "2024-04-30T08:15:00.000Z"),
        ("٢٠٢٤-04-30T08:15:00.250Z", "2024-04-30T08:15:00.250Z"),
    ]:
        event = {"type": "track", "userId": "u1", "event": "e", "timestamp": given}
        enrich(validate(event), RECEIVED_AT)
        assert event["timestamp"] == expected, given
        assert event["originalTimestamp"] == expected, given


@pytest.mark.parametrize(
    ("value", "present"),
    [("u1", True), ("\t \n", False), ("", False), (42, True), (1.5, True)],
)
def test_validate_ids_blank_ones_count_as_missing_numbers_become_strings(value, present):
    event = {"type": "track", "event": "e", "userId": value, "anonymousId": "a1"}
    validate(event)
    if present:
        assert event["userId"] == str(value)
    only = {"type": "track", "event": "e", "userId": value}
    if present:
        validate(only)
    else:
        with pytest.raises(SpecError, match="userId or anonymousId"):
            validate(only)


def test_validate_rejects_an_id_over_1024_characters():
    with pytest.raises(SpecError, match="userId: longer than 1024"):
        validate({"type": "track", "event": "e", "userId": "u" * 1025})
    validate({"type": "track", "event": "e", "userId": "u" * 1024})


def test_parse_timestamp_refuses_text_longer_than_a_timestamp_can_be():
    with pytest.raises(ValueError, match="not an ISO-8601 timestamp"):
        parse_timestamp("2015-12-10" + " " * 100 + "10:00:00Z")


def test_parse_timestamp_accepts_surrounding_and_inner_spaces():
    assert parse_timestamp("  2015-12-10 10:00:00 +01:00 ") == datetime(2015, 12, 10, 9, tzinfo=UTC)


def test_parse_timestamp_of_a_long_run_of_spaces_is_refused_at_once():
    """A denial of service guard, not a speed test: the old pattern backtracked over the
    spaces quadratically (40,000 took 4 s, these 400,000 about 7 minutes) on the event loop,
    freezing ingest and delivery. Run in a child so a regression fails instead of hanging."""
    code = (
        "from destfnd.spec import parse_timestamp\n"
        "spaces = ' ' * 400_000\n"
        "for text in ['2015-12-10' + spaces + 'x', '2015-12-10T00:00:00' + spaces + 'x']:\n"
        "    try:\n"
        "        parse_timestamp(text)\n"
        "    except ValueError as exc:\n"
        "        print(str(exc)[:30])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["not an ISO-8601 timestamp: '20"] * 2


def test_prepared_payloads_hold_no_more_memory_than_their_bytes():
    """orjson's output keeps the buffer it wrote into (4 KB for a small event, about ten
    times a 3 KB one), and a request's payloads wait in memory until their commit: 32
    clients posting batches took the daemon to 1.9 GB. Each payload is now an exact copy."""
    import time
    import tracemalloc

    from destfnd.config import ServerConfig
    from destfnd.ingest_events import Messages

    prepare = Messages(ServerConfig()).prepare
    for pad in (10, 3000):
        body = {"context": {"pad": "x" * pad},
                "batch": [{"type": "track", "userId": "u", "event": "e"}] * 500}  # fmt: skip
        tracemalloc.start()
        try:
            events, _, _, size = prepare(body, None, time.time(), None, ("d",), ())
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert size == sum(len(e.payload) for e in events) and len(events) == 500
        # Each payload's bytes, plus the objects around them (an IncomingEvent, its id).
        assert held < size + 500 * 400, (pad, held, size)
