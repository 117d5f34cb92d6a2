"""What one invocation did: its logs and outgoing requests, for the Event Delivery view.

The worker sets `current` around each call; print(), logging and fetch() append to it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from destfnd.outcome import clip, clip_error
from destfnd.redact import Redactor

LOG_LIMIT = 16 * 1024  # characters of logs kept per invocation
BODY_LIMIT = 4 * 1024  # characters of each request and response body kept
MAX_REQUESTS = 50  # requests recorded per invocation (all are counted)
# What else of a request is kept: a function can fetch a URL of megabytes, 50 times.
URL_LIMIT = 2048  # characters of a URL
HEADER_LIMIT = 512  # characters of a header's value
MAX_HEADERS = 64  # headers each way
REQUESTS_LIMIT = 256 * 1024  # characters of recorded requests per invocation, about
# Of a body, decoded past BODY_LIMIT before it is redacted: a secret across the cut is whole.
_BODY_MARGIN = 4096

# The secrets of the worker's destination (set when it starts): redacted from what is
# recorded before it is cut short, since a secret cut in two is no longer found by the
# daemon, which redacts it all again.
redactor = Redactor()
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)


@dataclass
class CallRecord:
    logs: list[str] = field(default_factory=list)
    log_chars: int = 0
    truncated: bool = False
    requests: list[dict] = field(default_factory=list)
    request_count: int = 0
    request_chars: int = 0
    out_of_memory: bool = False  # a handler of the call ran out of memory (memory_limit)
    stage: str = ""  # the one running now, "insert" or "function": told if the call times out

    def log(self, text: str) -> None:
        if self.truncated or not text:
            return
        text = redactor(text)
        room = LOG_LIMIT - self.log_chars
        if len(text) > room:
            text = text[:room] + "\n[logs truncated]\n"
            self.truncated = True
        self.logs.append(text)
        self.log_chars += len(text)

    def request(self, entry: dict) -> None:
        """Record one request (bodies as bytes), within the limits, secrets redacted."""
        self.request_count += 1
        if len(self.requests) >= MAX_REQUESTS or self.request_chars >= REQUESTS_LIMIT:
            return
        kept = {key: _kept(key, value) for key, value in entry.items()}
        size = sum(_chars(v) for v in kept.values())
        if self.requests and self.request_chars + size > REQUESTS_LIMIT:
            self.request_chars = REQUESTS_LIMIT  # full: no later one either, however small
            return
        self.request_chars += size
        self.requests.append(kept)

    def text(self) -> str:
        return "".join(self.logs)


current: ContextVar[CallRecord | None] = ContextVar("destfnd_call_record", default=None)


def bounded(requests: list[dict]) -> tuple[list[dict], int]:
    """Recorded requests of several calls (a batch's split) within one call's limits: those
    kept, and how many were left out."""
    kept: list[dict] = []
    chars = 0
    for entry in requests[:MAX_REQUESTS]:
        chars += sum(_chars(v) for v in entry.values())
        if kept and chars > REQUESTS_LIMIT:
            break
        kept.append(entry)
    return kept, len(requests) - len(kept)


def safe_headers(headers: object) -> dict[str, str]:
    items = list(headers.items()) if hasattr(headers, "items") else []
    kept = {
        clip(str(k), HEADER_LIMIT): "[redacted]"
        if str(k).lower() in SENSITIVE_HEADERS
        else clip(redactor(str(v)), HEADER_LIMIT)
        for k, v in items[:MAX_HEADERS]
    }
    if len(items) > MAX_HEADERS:
        kept["..."] = f"[{len(items) - MAX_HEADERS} more headers not recorded]"
    return kept


def clip_body(data: bytes) -> str:
    """The start of a body for the record, secrets redacted: BODY_LIMIT characters of it,
    decoding no more than what the redaction needs."""
    window = BODY_LIMIT + max(_BODY_MARGIN, redactor.longest)  # a long key file's: whole
    decoded = data[: 4 * window].decode("utf-8", "replace")  # (a character: 4 bytes at most)
    text = redactor(decoded[:window])
    if len(data) <= 4 * window and len(decoded) <= window and len(text) <= BODY_LIMIT:
        return text
    return f"{text[:BODY_LIMIT]}... [{len(data)} bytes in all]"


def clip_text(text: str) -> str:
    """An error or a URL for the record, secrets redacted, then cut as errors are."""
    return clip_error(redactor(text))


def _kept(key: str, value: Any) -> Any:
    if key == "method":  # any text a function gives
        return clip(str(value), 32)
    if key in ("url", "redirected_to"):
        return clip(redactor(str(value)), URL_LIMIT)
    if key == "error":
        return clip_text(str(value))
    if isinstance(value, bytes):  # a body
        return clip_body(value)
    return value


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):  # headers (from a worker's reply: whatever it holds)
        return sum(len(str(k)) + len(str(v)) for k, v in value.items())
    return 8
