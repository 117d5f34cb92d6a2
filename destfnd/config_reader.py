"""Validating a parsed config file into destfnd.config's dataclasses, collecting every problem
with its dotted key path and a "did you mean"; secrets are resolved here, never printed.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from destfnd.config import (
    DESTINATION_KINDS,
    MIB,
    BatchConfig,
    Config,
    DestinationConfig,
    LoggingConfig,
    RetryPolicy,
    Secret,
    ServerConfig,
    SourceConfig,
    StorageConfig,
    _why,
    parse_duration,
    parse_size,
)

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

_SECRET_KEYS = ("env", "file", "credential")
_TOP_KEYS = tuple("server storage logging sources destinations".split())
_SERVER_KEYS = tuple(
    "listen max_request_size max_event_size max_batch_events max_decompressed_size"
    " dedupe_window drain_timeout".split()
)
_STORAGE_KEYS = ("path", "retention", "synchronous", "records_max_size")
_LOGGING_KEYS = ("level", "format", "summary_interval")
_SOURCE_KEYS = ("name", "write_key")
_DESTINATION_KEYS = tuple(
    "name type function insert_function url headers path sources enabled concurrency timeout"
    " memory_limit workers settings batch retry".split()
)
_BATCH_KEYS = ("max_events", "max_wait")
_RETRY_KEYS = ("max_attempts", "max_age", "backoff_initial", "backoff_max")
# Keys that only make sense for one destination type.
_KIND_ONLY_KEYS = {"function": "function", "url": "webhook", "headers": "webhook", "path": "file"}


class _Invalid(ValueError):
    """A value's problem; `at` extends the key path (".env") when a nested key is at fault."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.at = at


class Reader:
    """Validates one parsed file, collecting every problem instead of stopping at the first.

    Converters raise ValueError; a bad or missing value becomes its default plus a problem.
    """

    def __init__(self, base: Path, environ: Mapping[str, str], resolve: bool = True) -> None:
        self.base = base
        self.environ = environ
        self.resolve = resolve
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def attempt(self, where: str, conv: Callable[[Any], Any], value: Any, default: Any) -> Any:
        try:
            return conv(value)
        except ValueError as exc:
            self.fail(where + getattr(exc, "at", ""), str(exc))
            return default

    def get(
        self,
        t: dict[str, Any],
        where: str,
        key: str,
        conv: Callable[[Any], Any],
        default: Any = None,
        required: str | None = None,
    ) -> Any:
        """`conv(t[key])`; `required` (a hint, maybe "") makes a missing key a problem."""
        if key in t:
            return self.attempt(f"{where}.{key}", conv, t[key], default)
        if required is not None:
            self.fail(f"{where}.{key}", f"is required{required}")
        return default

    def table(self, raw: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(where, f"must be a table, got {_show(raw)}")
            return {}
        for key in raw:
            if key not in allowed:
                self.fail(f"{where}.{key}" if where else key, f"unknown key{_hint(key, allowed)}")
        return raw

    def entries(self, top: dict, key: str, allowed: tuple[str, ...]) -> list[tuple[str, dict]]:
        raw = top.get(key, [])
        if not isinstance(raw, list):
            self.fail(key, f"must be an array of tables ([[{key}]]), got {_show(raw)}")
            return []
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                out.append((f"{key}[{i}]", self.table(item, f"{key}[{i}]", allowed)))
            else:
                self.fail(f"{key}[{i}]", f"must be a table, got {_show(item)}")
        return out

    def config(self, raw: dict[str, Any], cfg_path: Path) -> Config:
        top = self.table(raw, "", _TOP_KEYS)
        server = self.server(self.table(top.get("server"), "server", _SERVER_KEYS))
        t = self.table(top.get("storage"), "storage", _STORAGE_KEYS)
        d, g = StorageConfig(self.path("var/destfnd.sqlite3")), partial(self.get, t, "storage")
        storage = StorageConfig(
            path=g("path", self.path, d.path),
            retention_s=g("retention", _duration(), d.retention_s),
            synchronous=g("synchronous", _choice("FULL", "NORMAL"), d.synchronous),
            records_max_bytes=g("records_max_size", _size(MIB), d.records_max_bytes),
        )
        t = self.table(top.get("logging"), "logging", _LOGGING_KEYS)
        levels = _choice("debug", "info", "warning", "error")
        d, g = LoggingConfig(), partial(self.get, t, "logging")
        logging = LoggingConfig(
            level=g("level", levels, d.level),
            format=g("format", _choice("auto", "json", "console"), d.format),
            summary_interval_s=g("summary_interval", _duration(), d.summary_interval_s),
        )
        write_key = partial(self.secret, inline_ok=True)
        sources = tuple(
            SourceConfig(
                name=self.get(t, w, "name", _name, required=""),
                write_key=self.get(t, w, "write_key", write_key, required=""),
            )
            for w, t in self.entries(top, "sources", _SOURCE_KEYS)
        )
        if not sources and isinstance(top.get("sources", []), list):
            self.fail("sources", "at least one [[sources]] entry is required")
        self.unique("sources", [s.name for s in sources])
        seen: dict[str, int] = {}
        for i, source in enumerate(sources):
            if source.write_key is None or not source.write_key.value:
                continue  # unresolved (resolve_secrets=False): nothing to compare
            if source.write_key.value in seen:
                where = f"sources[{seen[source.write_key.value]}]"
                self.fail(f"sources[{i}].write_key", f"same write key as {where}")
            else:
                seen[source.write_key.value] = i
        known = tuple(s.name for s in sources if s.name is not None)
        destinations = tuple(
            self.destination(t, w, known)
            for w, t in self.entries(top, "destinations", _DESTINATION_KEYS)
        )
        self.unique("destinations", [d.name for d in destinations])
        return Config(cfg_path, server, storage, logging, sources, destinations)

    def server(self, t: dict[str, Any]) -> ServerConfig:
        d, g = ServerConfig(), partial(self.get, t, "server")
        host, port = g("listen", _listen, (d.host, d.port))
        request = g("max_request_size", _size(), d.max_request_bytes)
        decompressed = g("max_decompressed_size", _size(), max(d.max_decompressed_bytes, request))
        if decompressed < request:
            at_least = f"must be at least server.max_request_size ({request} bytes)"
            self.fail("server.max_decompressed_size", at_least)
        return ServerConfig(
            host=host,
            port=port,
            max_request_bytes=request,
            max_event_bytes=g("max_event_size", _size(), d.max_event_bytes),
            max_batch_events=g("max_batch_events", _integer(1), d.max_batch_events),
            max_decompressed_bytes=decompressed,
            dedupe_window_s=g("dedupe_window", _duration(zero_ok=True), d.dedupe_window_s),
            drain_timeout_s=g("drain_timeout", _duration(zero_ok=True), d.drain_timeout_s),
        )

    def destination(
        self, t: dict[str, Any], where: str, known: tuple[str, ...]
    ) -> DestinationConfig:
        g = partial(self.get, t, where)
        # An invalid type is reported once; None then skips the per-type checks.
        kind = g("type", _choice(*DESTINATION_KINDS), None if "type" in t else "function")
        for key, owner in _KIND_ONLY_KEYS.items():
            if key in t and kind is not None and kind != owner:
                only = f'only allowed with type = "{owner}" (this one has type = "{kind}")'
                self.fail(f"{where}.{key}", only)
        why = "" if "type" in t else ' (or set type = "webhook" or "file")'
        batch, retry = f"{where}.batch", f"{where}.retry"
        d = DestinationConfig(name="", kind="")
        return DestinationConfig(
            name=g("name", _name, required=""),
            kind=kind,
            function=g("function", self.code_file, required=why) if kind == "function" else None,
            insert_function=g("insert_function", self.code_file),
            url=g("url", _url, required=' for type = "webhook"') if kind == "webhook" else None,
            headers=self.headers(t.get("headers", {}), f"{where}.headers")
            if kind == "webhook"
            else (),
            path=g("path", self.path, required=' for type = "file"') if kind == "file" else None,
            sources=g("sources", partial(self.source_names, known), known),
            enabled=g("enabled", _boolean, d.enabled),
            concurrency=g("concurrency", _integer(1, 1024), d.concurrency),
            timeout_s=g("timeout", _duration(), d.timeout_s),
            memory_limit_bytes=g("memory_limit", _size(64 * MIB), d.memory_limit_bytes),
            workers=g("workers", _integer(1, 64), d.workers),
            settings=g("settings", partial(self.settings, where=f"{where}.settings"), {}),
            batch=self.batch(self.table(t["batch"], batch, _BATCH_KEYS), batch)
            if "batch" in t
            else None,
            retry=self.retry(self.table(t.get("retry"), retry, _RETRY_KEYS), retry),
        )

    def batch(self, t: dict[str, Any], where: str) -> BatchConfig:
        d, g = BatchConfig(), partial(self.get, t, where)
        return BatchConfig(
            max_events=g("max_events", _integer(1, 10000), d.max_events),
            max_wait_s=g("max_wait", _duration(), d.max_wait_s),
        )

    def retry(self, t: dict[str, Any], where: str) -> RetryPolicy:
        d, g = RetryPolicy(), partial(self.get, t, where)
        initial = g("backoff_initial", _duration(), d.backoff_initial_s)
        maximum = g("backoff_max", _duration(), d.backoff_max_s)
        if maximum < initial and "backoff_max" in t:
            self.fail(f"{where}.backoff_max", f"must be >= backoff_initial ({initial:g}s)")
        elif maximum < initial:
            self.fail(f"{where}.backoff_initial", f"must be <= backoff_max ({maximum:g}s)")
        return RetryPolicy(
            max_attempts=g("max_attempts", _integer(1), d.max_attempts),
            max_age_s=g("max_age", _duration(), d.max_age_s),
            backoff_initial_s=initial,
            backoff_max_s=maximum,
        )

    def unique(self, key: str, names: list[str | None]) -> None:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            if name is not None and name in first:
                self.fail(
                    f"{key}[{i}].name", f"duplicate name {name!r} (also {key}[{first[name]}])"
                )
            elif name is not None:
                first[name] = i

    def source_names(self, known: tuple[str, ...], value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"must be an array of source names, got {_show(value)}")
        if not value:
            raise ValueError("must name at least one source (leave it out for every source)")
        for j, name in enumerate(value):
            if name not in known:
                raise _Invalid(f"unknown source {name!r}{_hint(name, known)}", f"[{j}]")
        return tuple(dict.fromkeys(value))

    def headers(self, raw: Any, where: str) -> tuple[tuple[str, str | Secret], ...]:
        out = []
        for name, value in self.attempt(where, _table, raw, {}).items():
            if not _HEADER_NAME_RE.fullmatch(name):
                self.fail(f"{where}.{name}", "not a valid HTTP header name")
            secret = self.attempt(f"{where}.{name}", self.header_value, value, None)
            if secret is not None:
                out.append((name, secret if secret.origin != "inline" else secret.value))
        return tuple(out)

    def header_value(self, value: Any) -> Secret:
        secret = self.secret(value, inline_ok=True)
        if "\r" in secret.value or "\n" in secret.value:  # would inject headers
            raise ValueError("header values must not contain line breaks")
        return secret

    def settings(self, value: Any, where: str) -> dict[str, Any]:
        return {k: self.setting(v, f"{where}.{k}") for k, v in _table(value).items()}

    def setting(self, value: Any, where: str) -> Any:
        """Settings are plain values, except that a table like { env = "X" } is a Secret."""
        if isinstance(value, dict) and _is_secret_ref(value):
            return self.attempt(where, self.secret, value, None)
        if isinstance(value, dict):
            return {k: self.setting(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.setting(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def secret(self, value: Any, inline_ok: bool = False) -> Secret:
        if isinstance(value, str) and value and inline_ok:
            return Secret(value, "inline")
        if not isinstance(value, dict):
            kinds = "a string or " if inline_ok else ""
            example = '{ env = "NAME" }'
            raise ValueError(f"must be {kinds}a secret such as {example}, got {_show(value)}")
        for key in value:
            if key not in _SECRET_KEYS:
                raise _Invalid(f"unknown key{_hint(key, _SECRET_KEYS)}", f".{key}")
        if not _is_secret_ref(value) or not next(iter(value.values())):
            raise ValueError("a secret needs exactly one of env, file or credential (non-empty)")
        ((kind, ref),) = value.items()
        if not self.resolve:
            return Secret("", f"{kind}:{ref}")
        if kind == "env":
            if self.environ.get(ref):
                return Secret(self.environ[ref], f"env:{ref}")
            state = "empty" if ref in self.environ else "not set"
            raise ValueError(f"environment variable {ref} is {state}")
        if kind == "credential":
            folder = self.environ.get("CREDENTIALS_DIRECTORY")
            if "/" in ref or ref in (".", ".."):
                raise _Invalid(f"must be a credential name, got {ref!r}", ".credential")
            if not folder:
                needs = "needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)"
                raise ValueError(f"credential {ref} {needs}")
            file, origin = Path(folder, ref), f"credential:{ref}"
        else:
            file = self.path(ref)
            origin = f"file:{file}"
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read secret file {file}: {_why(exc)}") from None
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        if not text:
            raise ValueError(f"secret file {file} is empty")
        return Secret(text, origin)

    def path(self, value: Any) -> Path:
        """A path from the config, relative to the config file's folder."""
        return Path(os.path.abspath(self.base / Path(_text(value)).expanduser()))

    def code_file(self, value: Any) -> Path:
        path = self.path(value)
        if not path.is_file():
            raise ValueError(f"{'not a file' if path.exists() else 'file not found'}: {path}")
        return path


def _check(
    ok: Callable[[Any], Any], expected: str, then: Callable[[Any], Any] = lambda v: v
) -> Callable[[Any], Any]:
    """A converter: `then(value)` if `ok(value)`, else ValueError("<expected>, got <value>")."""

    def conv(value: Any) -> Any:
        if ok(value):
            return then(value)
        raise ValueError(f"{expected}, got {_show(value)}")

    return conv


_boolean = _check(lambda v: isinstance(v, bool), "must be true or false")
_text = _check(lambda v: isinstance(v, str) and v, "must be a non-empty string")
_table = _check(lambda v: isinstance(v, dict), "must be a table")
_charset = "must use only letters, digits, '_', '.' and '-'"
_name = _check(lambda v: isinstance(v, str) and _NAME_RE.fullmatch(v), _charset)
_measure = _check(lambda v: type(v) in (str, int, float), 'must be a string such as "5s"')


def _integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
    in_range = lambda v: type(v) is int and lo <= v and (hi is None or v <= hi)  # noqa: E731
    return _check(in_range, f"must be an integer {bounds}")


def _choice(*options: str) -> Callable[[Any], str]:
    by_lower = {option.lower(): option for option in options}
    known = lambda v: isinstance(v, str) and v.lower() in by_lower  # noqa: E731
    return _check(known, f"must be one of {', '.join(options)}", lambda v: by_lower[v.lower()])


def _duration(zero_ok: bool = False) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        seconds = parse_duration(_measure(value))
        if seconds > 0 or zero_ok:
            return seconds
        raise ValueError(f"must be greater than 0, got {value!r}")

    return conv


def _size(minimum: int = 1) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        size = parse_size(_measure(value))
        if size >= minimum:
            return size
        at_least = f"{minimum // MIB}MB" if minimum >= MIB else f"{minimum}B"
        raise ValueError(f"must be at least {at_least}, got {value!r}")

    return conv


def _listen(value: Any) -> tuple[str, int]:
    host, sep, port = "", "", ""
    if isinstance(value, str) and value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    elif isinstance(value, str):
        host, sep, port = value.rpartition(":")
        sep = "" if ":" in host else sep  # a bare IPv6 address needs brackets
    if sep and host and not any(c.isspace() or c in "[]/" for c in host):
        # Port 0 asks the kernel for a free port (the bound one is logged in daemon_ready).
        if port.isascii() and port.isdigit() and 0 <= int(port) <= 65535:
            return host, int(port)
    expected = 'must be "host:port" with a port from 0 to 65535 (IPv6 as "[::1]:8088")'
    raise ValueError(f"{expected}, got {_show(value)}")


def _url(value: Any) -> str:
    try:
        parts = urlsplit(_text(value))
        if parts.scheme in ("http", "https") and parts.hostname:
            return value
    except ValueError:  # urlsplit rejects some malformed hosts, e.g. "http://[::1"
        pass
    raise ValueError(f"must be an http:// or https:// URL with a host, got {_show(value)}")


def _is_secret_ref(value: dict[str, Any]) -> bool:
    """A table like { env = "NAME" }: exactly one secret key, with a string."""
    if len(value) != 1:
        return False
    [(key, ref)] = value.items()
    return key in _SECRET_KEYS and isinstance(ref, str)


def _hint(word: Any, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return "a table" if isinstance(value, dict) else "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"
