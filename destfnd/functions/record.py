"""What one invocation did: its logs and outgoing requests, for the Event Delivery view.

The worker sets `current` around each call; print(), logging and fetch() append to it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

LOG_LIMIT = 16 * 1024  # characters of logs kept per invocation
BODY_LIMIT = 4 * 1024  # characters of each request and response body kept
MAX_REQUESTS = 50  # requests recorded per invocation (all are counted)
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
    out_of_memory: bool = False  # a handler of the call ran out of memory (memory_limit)

    def log(self, text: str) -> None:
        if self.truncated or not text:
            return
        room = LOG_LIMIT - self.log_chars
        if len(text) > room:
            text = text[:room] + "\n[logs truncated]\n"
            self.truncated = True
        self.logs.append(text)
        self.log_chars += len(text)

    def request(self, entry: dict) -> None:
        self.request_count += 1
        if len(self.requests) < MAX_REQUESTS:
            self.requests.append(entry)

    def text(self) -> str:
        return "".join(self.logs)


current: ContextVar[CallRecord | None] = ContextVar("destfnd_call_record", default=None)


def safe_headers(headers: object) -> dict[str, str]:
    items = headers.items() if hasattr(headers, "items") else []
    return {
        str(k): "[redacted]" if str(k).lower() in SENSITIVE_HEADERS else str(v) for k, v in items
    }
