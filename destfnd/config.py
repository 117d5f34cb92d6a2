"""The config: frozen dataclasses, the duration and size units, and `load_config`, which reads
the TOML file and has destfnd.config_reader validate it (every problem with its dotted key
path). Nothing here may print a secret's value.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from destfnd.errors import DestfndError

DEFAULT_CONFIG_PATH = "config/destfnd.toml"
KIB = 1024
MIB = 1024 * KIB
# Beyond server.max_request_size and one event: a batch's sentAt, context and sequence.
REQUEST_ENVELOPE_BYTES = 4 * KIB
# Enrichment adds messageId, receivedAt, timestamp, originalTimestamp: this much room is left
# beyond max_event_bytes, so an event the client kept under the limit is not refused after.
ENRICH_ALLOWANCE_BYTES = 512
DESTINATION_KINDS = ("function", "webhook", "file")

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)\s*"
_DURATION_PART_RE = re.compile(_NUMBER + "(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_RE = re.compile(rf"(?:\s*{_NUMBER}(?:ms|s|m|h|d))+", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(_NUMBER + "(b|kb|kib|mb|mib|gb|gib)", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}


class ConfigError(DestfndError):
    """The config file is invalid."""

    problems: list[str]

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


@dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """A value that must never be printed; `origin` is "env:NAME", "file:PATH",
    "credential:NAME" (systemd `LoadCredential=`) or "inline"."""

    value: str
    origin: str = "inline"

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8088
    max_request_bytes: int = 500 * KIB
    max_event_bytes: int = 32 * KIB
    max_batch_events: int = 2500
    max_decompressed_bytes: int = 2 * MIB  # gzip bodies, after decompression
    # A request's events once a batch's context and integrations are merged into each: a
    # body of 140 KB (a 31 KB context, 2,500 tiny messages) made 79 MB of events.
    max_merged_bytes: int = 8 * MIB
    dedupe_window_s: float = 86400.0
    drain_timeout_s: float = 20.0
    # A request's body must arrive within body_timeout (408 past it); a connection with no
    # request on it is closed after keepalive_timeout (nginx's defaults: 60 s and 75 s).
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    # Whose X-Forwarded-For is believed when filling context.ip (addresses or networks). By
    # default this host only, as uvicorn and gunicorn do: a TLS proxy on the same host (the
    # README's setup for https) passes the client's address on.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # "refuse": an invalid event refuses its whole request (400). "skip": it is left out and
    # the rest stored, with 200, as Segment's API does (SDKs drop a batch answered 400).
    invalid_events: str = "refuse"

    @property
    def request_limit_bytes(self) -> int:
        """The body size refused with 413: max_request_size, with room for one more event
        and a batch's envelope. analytics-java 3.0-3.1 sends a batch only once an event has
        taken it past 500 KB, analytics-ruby's can pass it by its envelope, and both drop a
        batch answered 4xx without retrying it."""
        return self.max_request_bytes + self.max_event_bytes + REQUEST_ENVELOPE_BYTES

    @property
    def decompressed_limit_bytes(self) -> int:
        """A gzip body's size once decompressed: max_decompressed_size, and never less than
        what a body that is not gzip may be (max_decompressed_size may equal the request's)."""
        return max(self.max_decompressed_bytes, self.request_limit_bytes)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path
    retention_s: float = 7 * 86400.0
    synchronous: str = "FULL"
    records_max_bytes: int = 1024 * MIB  # logs and requests of attempts, oldest pruned first


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"
    summary_interval_s: float = 60.0  # per-destination delivery_summary lines


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    write_key: Secret
    fill_ip: bool = False  # set context.ip from the request when an event has none


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    max_age_s: float = 4 * 3600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 3600.0
    # Each wait this many times the one before (up to backoff_max): with 5, the defaults'
    # ten attempts span about 3 hours of max_age's 4, as Segment's do (with 2, 5 minutes).
    backoff_multiplier: float = 5.0


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_events: int = 20
    max_wait_s: float = 10.0


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    name: str
    kind: str
    function: Path | None = None
    insert_function: Path | None = None
    url: str | Secret | None = None  # a Secret: the URL holds a token (Slack, Zapier)
    headers: tuple[tuple[str, str | Secret], ...] = ()
    path: Path | None = None
    sources: tuple[str, ...] = ()
    enabled: bool = True
    integrations_key: str | None = None  # its name in events' `integrations` (None: `name`)
    concurrency: int = 8
    timeout_s: float = 5.0
    memory_limit_bytes: int = 512 * MIB
    workers: int = 1  # worker processes running this destination's functions
    settings: dict[str, Any] = field(default_factory=dict, hash=False)  # keeps the config hashable
    batch: BatchConfig | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig
    storage: StorageConfig
    logging: LoggingConfig
    sources: tuple[SourceConfig, ...]
    destinations: tuple[DestinationConfig, ...]
    # What a disabled destination lacks (a function file, a secret): serve does not start it.
    warnings: tuple[str, ...] = ()


# After a problem of a disabled destination: a warning, since serve does not start it.
DISABLED_NOTE = " (the destination is disabled: serve does not start it)"


def parse_duration(text: str) -> float:
    """Seconds in a duration string: "250ms", "1.5s", "10m", "4h", "7d" (or "1h30m")."""
    s = _with_unit(text, "durations", "5s")
    if not _DURATION_RE.fullmatch(s):
        units = 'a unit (ms, s, m, h, d), e.g. "5s" or "250ms"'
        raise ValueError(f"invalid duration {text!r}: use a number and {units}")
    return sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_PART_RE.findall(s))


def parse_size(text: str) -> int:
    """Bytes in a size string: "512B", "32KB", "512MB", "1GB" (1024-based; KiB/MiB/GiB too)."""
    m = _SIZE_RE.fullmatch(_with_unit(text, "sizes", "512KB"))
    if m is None:
        units = 'a unit (B, KB, MB, GB), e.g. "512KB"'
        raise ValueError(f"invalid size {text!r}: use a number and {units}")
    return int(float(m[1]) * _SIZE_UNITS[m[2][0].lower()])


def _secrets(cfg: Config) -> list[Secret]:
    """Every Secret of the config: write keys, headers, settings (nested ones too)."""
    found: list[Any] = [s.write_key for s in cfg.sources]
    for dest in cfg.destinations:
        found += [value for _, value in dest.headers] + _walk(dest.settings) + [dest.url]
    return [s for s in found if isinstance(s, Secret)]


def config_secrets(cfg: Config) -> list[str]:
    """Every secret value that came from env, a file or a credential, without duplicates
    (inline values are not secrets: they are in the file anyway). A webhook `url` that is a
    secret comes also in the other forms its parts are shown in (normalized as the HTTP
    client writes it in its errors; its path and query alone, and its query's values, as a
    server may echo them). A password in a plain `url` is one too: shown, it would be the
    only secret of the Event Delivery view's records not redacted."""
    values = [s.value for s in _secrets(cfg) if s.origin != "inline"]
    for dest in cfg.destinations:
        if isinstance(dest.url, Secret) and dest.url.value:
            values += _url_forms(dest.url.value)
        elif isinstance(dest.url, str):
            # (From 8 characters: "test" in `admin:test@` would hide every "test" shown.)
            values += [p for p in _url_password(dest.url) if len(p) >= 8]
    return list(dict.fromkeys(values))


# A secret url's path or query alone is redacted only from this length: a shorter one
# ("/api", "?json") is no token, and redacting it everywhere would mangle other text.
_URL_PART_SECRET_CHARS = 12
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+=%-]+")
_LETTER_AND_DIGIT = re.compile(r"[A-Za-z].*\d|\d.*[A-Za-z]")


def _url_forms(text: str) -> list[str]:
    from yarl import URL

    try:
        url = URL(text)
        whole = [str(url), url.human_repr()]
        parts = [url.path_qs, url.raw_path_qs, url.path, url.raw_path, url.query_string,
                 url.raw_query_string]  # fmt: skip
        # A token may be in the host (`https://eo1a2b3c4d5e6f.m.pipedream.net`), which the
        # HTTP client's errors show alone ("cannot connect to HOST"): its labels, but the
        # domain's own two; and a password in the URL.
        parts += (url.host or "").split(".")[:-2]
        # A query's values that look like tokens, alone: a redirect's Location may carry one
        # to another URL (not "application/json" or "Europe/Amsterdam": shown everywhere).
        values = [v for v in url.query.values() if isinstance(v, str)]
        values += [p.partition("=")[2] for p in url.raw_query_string.split("&")]
        parts += [v for v in values if _TOKEN_RE.fullmatch(v) and _LETTER_AND_DIGIT.search(v)]
    except (ValueError, TypeError):
        return []
    long = [part for part in parts if len(part) >= _URL_PART_SECRET_CHARS]
    return whole + _url_password(text) + long


def _url_password(text: str) -> list[str]:
    """The password in a URL, as written and decoded (%-escapes), if it has one."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(text).password
    except ValueError:
        return []
    return list(dict.fromkeys([password, unquote(password)])) if password else []


def secret_env_names(cfg: Config) -> tuple[str, ...]:
    """The environment variables the config reads secrets from (`{ env = "NAME" }`): kept
    from function workers, which get their own settings, resolved, and no other's."""
    return env_names(_secrets(cfg))


def env_names(secrets: Iterable[Secret]) -> tuple[str, ...]:
    """The environment variables `secrets` were read from, each once."""
    return tuple(dict.fromkeys(s.origin[4:] for s in secrets if s.origin.startswith("env:")))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    resolve_secrets: bool = True,
) -> Config:
    """Read and validate the config; raise ConfigError listing every problem found.

    `path` defaults to $DESTFND_CONFIG, else config/destfnd.toml; `environ` to os.environ.
    With `resolve_secrets=False` secret references are checked but not read (their value is
    ""): for commands such as `stats` that need no secret and may run without the daemon's
    environment or systemd credentials.
    """
    env = os.environ if environ is None else environ
    given = path is not None or bool(env.get("DESTFND_CONFIG"))
    if path is None:
        path = env.get("DESTFND_CONFIG") or DEFAULT_CONFIG_PATH
    cfg_path = Path(os.path.abspath(Path(path).expanduser()))
    try:
        raw = tomllib.loads(cfg_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        hint = (
            ""
            if given
            else f" (the default, {DEFAULT_CONFIG_PATH}; give --config PATH or set DESTFND_CONFIG)"
        )
        raise ConfigError([f"{cfg_path}: cannot read config: {_why(exc)}{hint}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{cfg_path}: invalid TOML: {exc}"]) from exc
    from destfnd.config_reader import Reader  # the reader imports this module's types

    reader = Reader(cfg_path.parent, env, resolve_secrets)
    cfg = reader.config(raw, cfg_path)
    if reader.problems:
        raise ConfigError(reader.problems)
    return cfg


def _with_unit(text: Any, what: str, example: str) -> str:
    s = str(text).strip()
    try:
        float(s)
    except ValueError:
        return s
    raise ValueError(f'{what} need a unit, e.g. "{example}", got {text!r}')


def secrets_in(value: Any) -> list[Secret]:
    """The Secrets among the leaves of `value` (settings: nested tables and arrays too)."""
    return [leaf for leaf in _walk(value) if isinstance(leaf, Secret)]


def _walk(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _walk(v)]
    return [value]


def _why(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
