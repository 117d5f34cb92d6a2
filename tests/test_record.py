"""What a function's call keeps of its outgoing requests (the worker's side of the Event
Delivery view): bounded, secrets redacted before anything is cut."""

from __future__ import annotations

from destfnd.functions import record
from destfnd.redact import Redactor


def test_call_record_keeps_requests_within_bounds():
    rec = record.CallRecord()
    rec.request({"method": "M" * 1000, "url": "http://x/", "duration_ms": 1.0})
    assert rec.requests[0]["method"] == "M" * 32 + "... [1,000 characters in all]"
    headers = record.safe_headers({f"h{i}": "v" * 5000 for i in range(100)})
    assert len(headers) == record.MAX_HEADERS + 1
    assert headers["..."] == "[36 more headers not recorded]"
    assert headers["h0"] == "v" * 512 + "... [5,000 characters in all]"
    big = {"method": "GET", "url": "http://x/" + "u" * 10_000, "request_headers": headers,
           "response_headers": headers, "request_body": b"b" * 100_000}  # fmt: skip
    for _ in range(20):
        rec.request(big)
    assert rec.request_count == 21
    assert 1 < len(rec.requests) < 21
    assert rec.request_chars <= record.REQUESTS_LIMIT
    kept = rec.requests[1]
    assert kept["url"].endswith("... [10,009 characters in all]") and len(kept["url"]) < 2100
    assert kept["request_body"] == "b" * record.BODY_LIMIT + "... [100000 bytes in all]"


def test_call_record_redacts_a_long_secret_whole_across_a_body_cut():
    """A secret longer than the usual margin (a PEM key) across the cut of a body."""
    key = "K" * 6000
    saved, record.redactor = record.redactor, Redactor([key])
    try:
        body = b"x" * (record.BODY_LIMIT - 10) + key.encode() + b"tail"
        rec = record.CallRecord()
        rec.request({"method": "POST", "url": "http://x/", "request_body": body})
        assert "KKK" not in rec.requests[0]["request_body"]
    finally:
        record.redactor = saved


def test_call_record_redacts_a_secret_across_a_body_cut_after_multibyte_text():
    """The margin past the cut is in characters: counted in bytes, text of two-byte
    characters before the secret left its start in the clear."""
    saved, record.redactor = record.redactor, Redactor(["S3CRET-value-123456"])
    try:
        body = ("é" * 4090 + "S3CRET-value-123456" + "x" * 5000).encode()
        rec = record.CallRecord()
        rec.request({"method": "POST", "url": "http://x/", "request_body": body})
        kept = rec.requests[0]["request_body"]
        assert "S3C" not in kept and kept.startswith("é" * 4090 + "[redac"), kept[4080:]
    finally:
        record.redactor = saved
