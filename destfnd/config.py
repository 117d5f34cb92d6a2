"""The TOML config file -> frozen dataclasses; every problem is reported with its dotted key path.

Owns parsing, validation and secret resolution; it must never print a secret's value.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = "config/destfnd.toml"
KIB = 1024
MIB = 1024 * KIB
DESTINATION_KINDS = ("function", "webhook", "file")

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DURATION_PART_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|kib|mb|mib|gb|gib)", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}
_SECRET_KEYS = ("env", "file", "credential")

_TOP_KEYS = ("server", "storage", "logging", "sources", "destinations")
_SERVER_KEYS = (
    "listen",
    "max_request_size",
    "max_event_size",
    "max_batch_events",
    "max_decompressed_size",
    "dedupe_window",
    "drain_timeout",
)
_STORAGE_KEYS = ("path", "retention", "synchronous")
_LOGGING_KEYS = ("level", "format")
_SOURCE_KEYS = ("name", "write_key")
_DESTINATION_KEYS = (
    *("name", "type", "function", "insert_function", "url", "headers", "path", "sources"),
    *("enabled", "concurrency", "timeout", "memory_limit", "settings", "batch", "retry"),
)
_BATCH_KEYS = ("max_events", "max_wait")
_RETRY_KEYS = ("max_attempts", "max_age", "backoff_initial", "backoff_max")
# Keys that only make sense for one destination type.
_KIND_ONLY_KEYS = {"function": "function", "url": "webhook", "headers": "webhook", "path": "file"}


class ConfigError(Exception):
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
    max_decompressed_bytes: int = 2 * MIB
    dedupe_window_s: float = 86400.0
    drain_timeout_s: float = 20.0


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path
    retention_s: float = 7 * 86400.0
    synchronous: str = "FULL"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    write_key: Secret


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    max_age_s: float = 4 * 3600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 3600.0


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
    url: str | None = None
    headers: tuple[tuple[str, str | Secret], ...] = ()
    path: Path | None = None
    sources: tuple[str, ...] = ()
    enabled: bool = True
    concurrency: int = 8
    timeout_s: float = 5.0
    memory_limit_bytes: int = 512 * MIB
    settings: dict[str, Any] = field(default_factory=dict)
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


def parse_duration(text: str) -> float:
    """Seconds in a duration string: "250ms", "1.5s", "10m", "4h", "7d" (or "1h30m")."""
    s = str(text).strip()
    try:
        float(s)
    except ValueError:
        pass
    else:
        raise ValueError(f'durations need a unit, e.g. "5s", got {text!r}')
    total, pos = 0.0, 0
    while pos < len(s) or pos == 0:
        m = _DURATION_PART_RE.match(s, pos)
        if m is None:
            raise ValueError(
                f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d), "
                'e.g. "5s" or "250ms"'
            )
        total += float(m[1]) * _DURATION_UNITS[m[2].lower()]
        pos = m.end()
    return total


def parse_size(text: str) -> int:
    """Bytes in a size string: "512B", "32KB", "512MB", "1GB" (1024-based; KiB/MiB/GiB too)."""
    s = str(text).strip()
    try:
        float(s)
    except ValueError:
        pass
    else:
        raise ValueError(f'sizes need a unit, e.g. "512KB", got {text!r}')
    m = _SIZE_RE.fullmatch(s)
    if m is None:
        raise ValueError(
            f'invalid size {text!r}: use a number and a unit (B, KB, MB, GB), e.g. "512KB"'
        )
    return int(float(m[1]) * _SIZE_UNITS[m[2][0].lower()])


def redact(text: str, secrets: Iterable[Secret | str]) -> str:
    """`text` with every occurrence of every secret value replaced by "[redacted]"."""
    values = {s.value if isinstance(s, Secret) else s for s in secrets}
    # Longest first, one pass: a secret that contains another is hidden whole.
    ordered = sorted((v for v in values if v), key=len, reverse=True)
    if not ordered:
        return text
    return re.sub("|".join(map(re.escape, ordered)), "[redacted]", text)


def config_secrets(cfg: Config) -> list[str]:
    """Every secret value in `cfg` that came from env, a file or a credential (inline ones are in
    the file anyway), without duplicates."""
    found: list[Any] = [s.write_key for s in cfg.sources]
    for dest in cfg.destinations:
        found += [value for _, value in dest.headers]
        found += _walk(dest.settings)
    values = (s.value for s in found if isinstance(s, Secret) and s.origin != "inline")
    return list(dict.fromkeys(v for v in values if v))


def reveal_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a destination's settings with each Secret replaced by its value (for the
    function that needs them; never for logs)."""
    return {key: _reveal(value) for key, value in settings.items()}


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read and validate the config; raise ConfigError listing every problem found."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get("DESTFND_CONFIG") or DEFAULT_CONFIG_PATH
    cfg_path = Path(os.path.abspath(Path(path).expanduser()))
    try:
        raw = tomllib.loads(cfg_path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError([f"{cfg_path}: cannot read config: {_why(exc)}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{cfg_path}: cannot read config: not UTF-8 text"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{cfg_path}: invalid TOML: {exc}"]) from exc
    reader = _Reader(cfg_path.parent, env)
    cfg = reader.config(raw, cfg_path)
    if reader.problems:
        raise ConfigError(reader.problems)
    return cfg


class _Reader:
    """Validates one parsed file, collecting problems instead of stopping at the first."""

    def __init__(self, base: Path, environ: Mapping[str, str]) -> None:
        self.base = base
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def config(self, raw: dict[str, Any], cfg_path: Path) -> Config:
        top = self.table(raw, "", _TOP_KEYS)
        server = self.server(self.table(top.get("server"), "server", _SERVER_KEYS))
        storage = self.storage(self.table(top.get("storage"), "storage", _STORAGE_KEYS))
        t = self.table(top.get("logging"), "logging", _LOGGING_KEYS)
        logging = LoggingConfig(
            level=self.choice(t, "logging", "level", ("info", "debug", "warning", "error")),
            format=self.choice(t, "logging", "format", ("auto", "json", "console")),
        )
        sources = tuple(
            SourceConfig(name=self.name(t, w), write_key=self.write_key(t, w))
            for w, t in self.entries(top, "sources", _SOURCE_KEYS, required=True)
        )
        self.unique([s.name for s in sources], "sources")
        keys: dict[str, int] = {}
        for i, src in enumerate(sources):
            if src.write_key is not None and src.write_key.value in keys:
                j = keys[src.write_key.value]
                self.fail(f"sources[{i}].write_key", f"same write key as sources[{j}]")
            elif src.write_key is not None:
                keys[src.write_key.value] = i
        names = tuple(s.name for s in sources if s.name is not None)
        entries = self.entries(top, "destinations", _DESTINATION_KEYS, required=False)
        destinations = tuple(self.destination(t, w, names) for w, t in entries)
        self.unique([d.name for d in destinations], "destinations")
        return Config(cfg_path, server, storage, logging, sources, destinations)

    def server(self, t: dict[str, Any]) -> ServerConfig:
        d = ServerConfig()
        host, port = self.listen(t.get("listen", f"{d.host}:{d.port}"))
        request = self.size(t, "server", "max_request_size", d.max_request_bytes)
        decompressed = self.size(t, "server", "max_decompressed_size", max(2 * MIB, request))
        if decompressed < request:
            at_least = f"must be at least server.max_request_size ({request} bytes)"
            self.fail("server.max_decompressed_size", at_least)
        return ServerConfig(
            host=host,
            port=port,
            max_request_bytes=request,
            max_event_bytes=self.size(t, "server", "max_event_size", d.max_event_bytes),
            max_batch_events=self.integer(t, "server", "max_batch_events", d.max_batch_events, 1),
            max_decompressed_bytes=decompressed,
            dedupe_window_s=self.duration(
                t, "server", "dedupe_window", d.dedupe_window_s, zero_ok=True
            ),
            drain_timeout_s=self.duration(
                t, "server", "drain_timeout", d.drain_timeout_s, zero_ok=True
            ),
        )

    def listen(self, value: Any) -> tuple[str, int]:
        if isinstance(value, str):
            if value.startswith("["):
                host, sep, port = value[1:].partition("]:")
            else:
                host, sep, port = value.rpartition(":")
                sep = "" if ":" in host else sep  # a bare IPv6 address needs brackets
            bad_host = not host or any(c.isspace() or c in "[]/" for c in host)
            if sep and not bad_host and port.isascii() and port.isdigit():
                if 1 <= int(port) <= 65535:
                    return host, int(port)
        self.fail(
            "server.listen",
            'must be "host:port" with a port from 1 to 65535 (IPv6 as "[::1]:8088"), '
            f"got {_show(value)}",
        )
        return ServerConfig.host, ServerConfig.port

    def storage(self, t: dict[str, Any]) -> StorageConfig:
        path = self.string(t, "storage", "path", default="var/destfnd.sqlite3")
        return StorageConfig(
            path=self.resolve(path or "var/destfnd.sqlite3"),
            retention_s=self.duration(t, "storage", "retention", StorageConfig.retention_s),
            synchronous=self.choice(t, "storage", "synchronous", ("FULL", "NORMAL")),
        )

    def destination(
        self, t: dict[str, Any], where: str, source_names: tuple[str, ...]
    ) -> DestinationConfig:
        kind = t.get("type", "function")
        if kind not in DESTINATION_KINDS:
            expected = ' (expected "function", "webhook" or "file")'
            self.fail(f"{where}.type", f"unknown type {_show(kind)}{expected}")
        for key, owner in _KIND_ONLY_KEYS.items():
            if key in t and kind in DESTINATION_KINDS and kind != owner:
                only = f'only allowed with type = "{owner}" (this one has type = "{kind}")'
                self.fail(f"{where}.{key}", only)
        function = url = path = None
        headers: tuple[tuple[str, str | Secret], ...] = ()
        if kind == "function":
            why = "for a function destination"
            why += "" if "type" in t else ' (or set type = "webhook" or "file")'
            function = self.code_file(t, where, "function", required=why)
        elif kind == "webhook":
            url = self.url(t, where)
            headers = self.headers(t.get("headers"), f"{where}.headers")
        elif kind == "file":
            text = self.string(t, where, "path", required='for type = "file"')
            path = self.resolve(text) if text else None
        batch = None
        if "batch" in t:
            bt = self.table(t["batch"], f"{where}.batch", _BATCH_KEYS)
            batch = BatchConfig(
                max_events=self.integer(bt, f"{where}.batch", "max_events", 20, 1, 10000),
                max_wait_s=self.duration(bt, f"{where}.batch", "max_wait", 10.0),
            )
        return DestinationConfig(
            name=self.name(t, where),
            kind=kind,
            function=function,
            insert_function=self.code_file(t, where, "insert_function"),
            url=url,
            headers=headers,
            path=path,
            sources=self.destination_sources(t, where, source_names),
            enabled=self.boolean(t, where, "enabled", True),
            concurrency=self.integer(t, where, "concurrency", 8, 1, 1024),
            timeout_s=self.duration(t, where, "timeout", 5.0),
            memory_limit_bytes=self.size(t, where, "memory_limit", 512 * MIB, minimum=16 * MIB),
            settings=self.settings(t.get("settings"), f"{where}.settings"),
            batch=batch,
            retry=self.retry(self.table(t.get("retry"), f"{where}.retry", _RETRY_KEYS), where),
        )

    def retry(self, t: dict[str, Any], where: str) -> RetryPolicy:
        d, w = RetryPolicy(), f"{where}.retry"
        initial = self.duration(t, w, "backoff_initial", d.backoff_initial_s)
        maximum = self.duration(t, w, "backoff_max", d.backoff_max_s)
        if maximum < initial and "backoff_max" in t:
            self.fail(f"{w}.backoff_max", f"must be >= backoff_initial ({initial:g}s)")
        elif maximum < initial:
            self.fail(f"{w}.backoff_initial", f"must be <= backoff_max ({maximum:g}s)")
        return RetryPolicy(
            max_attempts=self.integer(t, w, "max_attempts", d.max_attempts, 1),
            max_age_s=self.duration(t, w, "max_age", d.max_age_s),
            backoff_initial_s=initial,
            backoff_max_s=maximum,
        )

    def destination_sources(
        self, t: dict[str, Any], where: str, known: tuple[str, ...]
    ) -> tuple[str, ...]:
        if "sources" not in t:
            return known
        value = t["sources"]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            self.fail(f"{where}.sources", f"must be an array of source names, got {_show(value)}")
            return ()
        if not value:
            self.fail(f"{where}.sources", "must name at least one source (leave it out for all)")
        for j, name in enumerate(value):
            if name not in known:
                self.fail(f"{where}.sources[{j}]", f"unknown source {name!r}{_hint(name, known)}")
            elif name in value[:j]:
                self.fail(f"{where}.sources[{j}]", f"source {name!r} is listed twice")
        return tuple(dict.fromkeys(value))

    def url(self, t: dict[str, Any], where: str) -> str | None:
        url = self.string(t, where, "url", required='for type = "webhook"')
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            self.fail(
                f"{where}.url", f"must be an http:// or https:// URL with a host, got {url!r}"
            )
        return url

    def headers(self, raw: Any, where: str) -> tuple[tuple[str, str | Secret], ...]:
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            self.fail(where, f"must be a table of header names to values, got {_show(raw)}")
            return ()
        out: list[tuple[str, str | Secret]] = []
        for name, value in raw.items():
            w = f"{where}.{name}"
            if not _HEADER_NAME_RE.fullmatch(name):
                self.fail(w, "not a valid HTTP header name")
            header = self.secret(value, w, inline_ok=True)
            if header is None:
                continue
            text = header.value
            if "\r" in text or "\n" in text:  # header injection
                self.fail(w, "header values must not contain line breaks")
            out.append((name, header if header.origin != "inline" else text))
        return tuple(out)

    def settings(self, raw: Any, where: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(where, f"must be a table, got {_show(raw)}")
            return {}
        return {key: self.setting(value, f"{where}.{key}") for key, value in raw.items()}

    def setting(self, value: Any, where: str) -> Any:
        if isinstance(value, dict):
            if len(value) == 1 and _is_secret_ref(value):
                return self.secret(value, where)
            return {key: self.setting(v, f"{where}.{key}") for key, v in value.items()}
        if isinstance(value, list):
            return [self.setting(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def write_key(self, t: dict[str, Any], where: str) -> Secret | None:
        if "write_key" not in t:
            self.fail(f"{where}.write_key", "is required")
            return None
        return self.secret(t["write_key"], f"{where}.write_key", inline_ok=True)

    def secret(self, value: Any, where: str, *, inline_ok: bool = False) -> Secret | None:
        if isinstance(value, str) and inline_ok:
            if value:
                return Secret(value, "inline")
            self.fail(where, "must not be empty")
            return None
        if not isinstance(value, dict):
            expected = 'must be a string or a secret such as { env = "NAME" }'
            self.fail(where, f"{expected}, got {_show(value)}")
            return None
        for key in value:
            if key not in _SECRET_KEYS:
                self.fail(f"{where}.{key}", f"unknown key{_hint(key, _SECRET_KEYS)}")
        if len(value) != 1 or not _is_secret_ref(value):
            if all(key in _SECRET_KEYS for key in value):
                self.fail(where, "a secret needs exactly one of env, file or credential (a string)")
            return None
        ((kind, ref),) = value.items()
        if not ref:
            self.fail(f"{where}.{kind}", "must not be empty")
            return None
        if kind == "env":
            text = self.environ.get(ref)
            if not text:
                state = "empty" if text == "" else "not set"
                self.fail(where, f"environment variable {ref} is {state}")
                return None
            return Secret(text, f"env:{ref}")
        if kind == "credential":
            folder = self.environ.get("CREDENTIALS_DIRECTORY")
            if "/" in ref or ref in (".", ".."):
                self.fail(f"{where}.credential", f"must be a credential name, got {ref!r}")
                return None
            if not folder:
                needs = "needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)"
                self.fail(where, f"credential {ref} {needs}")
                return None
            file, origin = Path(folder) / ref, f"credential:{ref}"
        else:
            file = self.resolve(ref)
            origin = f"file:{file}"
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(where, f"cannot read secret file {file}: {_why(exc)}")
            return None
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        if not text:
            self.fail(where, f"secret file {file} is empty")
            return None
        return Secret(text, origin)

    def entries(
        self, top: dict[str, Any], key: str, allowed: tuple[str, ...], *, required: bool
    ) -> list[tuple[str, dict[str, Any]]]:
        raw = top.get(key, [])
        if not isinstance(raw, list):
            self.fail(key, f"must be an array of tables ([[{key}]]), got {_show(raw)}")
            return []
        if required and not raw:
            self.fail(key, f"at least one [[{key}]] entry is required")
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                out.append((f"{key}[{i}]", self.table(item, f"{key}[{i}]", allowed)))
            else:
                self.fail(f"{key}[{i}]", f"must be a table, got {_show(item)}")
        return out

    def unique(self, names: list[str | None], key: str) -> None:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            if name is not None and name in first:
                self.fail(
                    f"{key}[{i}].name", f"duplicate name {name!r} (also {key}[{first[name]}])"
                )
            elif name is not None:
                first[name] = i

    def table(self, raw: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(where, f"must be a table, got {_show(raw)}")
            return {}
        for key in raw:
            if key not in allowed:
                path = f"{where}.{key}" if where else key
                self.fail(path, f"unknown key{_hint(key, allowed)}")
        return raw

    def name(self, t: dict[str, Any], where: str) -> str | None:
        name = self.string(t, where, "name", required="")
        if name is not None and not _NAME_RE.fullmatch(name):
            charset = "must use only letters, digits, '_', '.' and '-'"
            self.fail(f"{where}.name", f"{charset}, got {name!r}")
            return None
        return name

    def string(
        self,
        t: dict[str, Any],
        where: str,
        key: str,
        *,
        default: str | None = None,
        required: str | None = None,
    ) -> str | None:
        if key not in t:
            if required is not None:
                self.fail(f"{where}.{key}", f"is required {required}".rstrip())
            return default
        value = t[key]
        if not isinstance(value, str) or not value:
            self.fail(f"{where}.{key}", f"must be a non-empty string, got {_show(value)}")
            return default
        return value

    def choice(self, t: dict[str, Any], where: str, key: str, options: tuple[str, ...]) -> str:
        """The option `t[key]` names (case-insensitively); options[0] is the default."""
        value = t.get(key, options[0])
        if isinstance(value, str):
            for option in options:
                if option.lower() == value.lower():
                    return option
        self.fail(f"{where}.{key}", f"must be one of {', '.join(options)}, got {_show(value)}")
        return options[0]

    def boolean(self, t: dict[str, Any], where: str, key: str, default: bool) -> bool:
        value = t.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{where}.{key}", f"must be true or false, got {_show(value)}")
            return default
        return value

    def integer(
        self, t: dict[str, Any], where: str, key: str, default: int, lo: int, hi: int | None = None
    ) -> int:
        value = t.get(key, default)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            self.fail(f"{where}.{key}", f"must be an integer {bounds}, got {_show(value)}")
            return default
        return value

    def duration(
        self, t: dict[str, Any], where: str, key: str, default: float, *, zero_ok: bool = False
    ) -> float:
        if key not in t:
            return default
        value = t[key]
        try:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f'must be a duration such as "5s", got {_show(value)}')
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(f"{where}.{key}", str(exc))
            return default
        if seconds <= 0 and not zero_ok:
            self.fail(f"{where}.{key}", f"must be greater than 0, got {value!r}")
            return default
        return seconds

    def size(self, t: dict[str, Any], where: str, key: str, default: int, minimum: int = 1) -> int:
        if key not in t:
            return default
        value = t[key]
        try:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f'must be a size such as "512KB", got {_show(value)}')
            size = parse_size(value)
        except ValueError as exc:
            self.fail(f"{where}.{key}", str(exc))
            return default
        if size < minimum:
            at_least = f"{minimum // MIB}MB" if minimum >= MIB else f"{minimum}B"
            self.fail(f"{where}.{key}", f"must be at least {at_least}, got {value!r}")
            return default
        return size

    def code_file(
        self, t: dict[str, Any], where: str, key: str, required: str | None = None
    ) -> Path | None:
        text = self.string(t, where, key, required=required)
        if text is None:
            return None
        path = self.resolve(text)
        if not path.exists():
            self.fail(f"{where}.{key}", f"file not found: {path}")
        elif not path.is_file():
            self.fail(f"{where}.{key}", f"not a file: {path}")
        return path

    def resolve(self, text: str) -> Path:
        return Path(os.path.abspath(self.base / Path(text).expanduser()))


def _is_secret_ref(value: dict[str, Any]) -> bool:
    return len(value) == 1 and all(
        k in _SECRET_KEYS and isinstance(v, str) for k, v in value.items()
    )


def _walk(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _walk(v)]
    return [value]


def _reveal(value: Any) -> Any:
    if isinstance(value, Secret):
        return value.value
    if isinstance(value, Mapping):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reveal(v) for v in value]
    return value


def _hint(word: Any, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"
