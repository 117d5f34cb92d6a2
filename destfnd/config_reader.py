"""Validating a parsed config file into destfnd.config's dataclasses, collecting every problem
with its dotted key path and a "did you mean"; secrets are resolved here, never printed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from destfnd import config_values as cv
from destfnd.config import (
    DESTINATION_KINDS,
    DISABLED_NOTE,
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
)
from destfnd.config_files import Resolver, Unavailable
from destfnd.paths import DATABASE_COMPANIONS

_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers that would make a webhook's request say something else than it is: a configured
# Content-Length cut every body to it, or had the receiver refuse it, while the deliveries
# showed delivered or discarded. (Connection and Keep-Alive are a client's to send.)
_SET_PER_REQUEST = "set by destfnd for each request, to frame its body: leave it out"
_FRAMING_HEADERS = {
    "content-length": _SET_PER_REQUEST,
    "transfer-encoding": _SET_PER_REQUEST,
    "content-encoding": "destfnd sends the JSON as it is, not encoded: leave it out",
    "upgrade": "a POST of an event asks for no other protocol: leave it out",
}

_TOP_KEYS = tuple("server storage logging sources destinations".split())
_SERVER_KEYS = tuple(
    "listen max_request_size max_event_size max_batch_events max_decompressed_size"
    " max_merged_size dedupe_window drain_timeout body_timeout keepalive_timeout"
    " trusted_proxies invalid_events".split()
)
_STORAGE_KEYS = ("path", "retention", "synchronous", "records_max_size")
_LOGGING_KEYS = ("level", "format", "summary_interval")
_SOURCE_KEYS = ("name", "write_key", "fill_ip")
_DESTINATION_KEYS = tuple(
    "name type function insert_function url headers path sources enabled integrations_key"
    " concurrency timeout memory_limit workers settings batch retry".split()
)
_BATCH_KEYS = ("max_events", "max_wait")
_RETRY_KEYS = ("max_attempts", "max_age", "backoff_initial", "backoff_max", "backoff_multiplier")
# Keys that only make sense for one destination type.
_KIND_ONLY_KEYS = {"function": "function", "url": "webhook", "headers": "webhook", "path": "file"}
# Keys of the worker processes that run a destination's function or insert function.
_FUNCTION_ONLY_KEYS = ("memory_limit", "workers", "settings")


class Reader(Resolver):
    """Validates one parsed file, collecting every problem instead of stopping at the first.

    Converters raise ValueError; a bad or missing value becomes its default plus a problem.
    """

    def __init__(self, base: Path, environ: Mapping[str, str], resolve: bool = True) -> None:
        super().__init__(base, environ, resolve)
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._disabled = False  # reading a disabled destination: what it lacks is a warning

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def attempt(self, where: str, conv: Callable[[Any], Any], value: Any, default: Any) -> Any:
        try:
            return conv(value)
        except cv.Problems as exc:
            for problem in exc.problems:
                self.fail(where + problem.at, str(problem))
            return default
        except ValueError as exc:
            where += getattr(exc, "at", "")
            if isinstance(exc, Unavailable) and self._disabled:
                self.warnings.append(f"{where}: {exc}{DISABLED_NOTE}")
            else:
                self.fail(where, str(exc))
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
            self.fail(where, f"must be a table, got {cv.show(raw)}")
            return {}
        for key in raw:
            if key not in allowed:
                self.fail(f"{where}.{key}" if where else key, f"unknown key{cv.hint(key, allowed)}")
        return raw

    def entries(self, top: dict, key: str, allowed: tuple[str, ...]) -> list[tuple[str, dict]]:
        raw = top.get(key, [])
        if not isinstance(raw, list):
            self.fail(key, f"must be an array of tables ([[{key}]]), got {cv.show(raw)}")
            return []
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                out.append((f"{key}[{i}]", self.table(item, f"{key}[{i}]", allowed)))
            else:
                self.fail(f"{key}[{i}]", f"must be a table, got {cv.show(item)}")
        return out

    def config(self, raw: dict[str, Any], cfg_path: Path) -> Config:
        top = self.table(raw, "", _TOP_KEYS)
        server = self.server(self.table(top.get("server"), "server", _SERVER_KEYS))
        t = self.table(top.get("storage"), "storage", _STORAGE_KEYS)
        d, g = StorageConfig(self.path("var/destfnd.sqlite3")), partial(self.get, t, "storage")
        storage = StorageConfig(
            path=g("path", self.file_path, d.path),
            retention_s=g("retention", cv.duration(), d.retention_s),
            synchronous=g("synchronous", cv.choice("FULL", "NORMAL"), d.synchronous),
            records_max_bytes=g("records_max_size", cv.size(MIB), d.records_max_bytes),
        )
        t = self.table(top.get("logging"), "logging", _LOGGING_KEYS)
        levels = cv.choice("debug", "info", "warning", "error")
        d, g = LoggingConfig(), partial(self.get, t, "logging")
        logging = LoggingConfig(
            level=g("level", levels, d.level),
            format=g("format", cv.choice("auto", "json", "console"), d.format),
            summary_interval_s=g("summary_interval", cv.duration(), d.summary_interval_s),
        )
        write_key = partial(self.secret, inline_ok=True)
        sources = tuple(
            SourceConfig(
                name=self.get(t, w, "name", cv.name, required=""),
                write_key=self.get(t, w, "write_key", write_key, required=""),
                fill_ip=self.get(t, w, "fill_ip", cv.boolean, False),
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
        self.not_the_database(storage.path, destinations)
        for i, dest in enumerate(destinations):
            self.batch_memory(f"destinations[{i}]", dest, server.max_event_bytes)
        if storage.retention_s < server.dedupe_window_s:
            kept = cv.duration_text(storage.retention_s)
            window = cv.duration_text(server.dedupe_window_s)
            self.warnings.append(
                f"storage.retention: {kept} is shorter than server.dedupe_window ({window}): "
                f"a copy sent more than {kept} after its event was delivered is delivered again"
            )
        return Config(
            cfg_path, server, storage, logging, sources, destinations, tuple(self.warnings)
        )

    def not_the_database(self, database: Path, destinations: tuple) -> None:
        """A file destination appending to the database or a file SQLite keeps beside it
        would corrupt it (links resolved)."""
        real = os.path.realpath(database)
        own = {real: "the database"}
        own |= {real + end: f"the database's {end}" for end in DATABASE_COMPANIONS}
        same_file = {_identity(name): which for name, which in own.items()}  # hard links
        same_file.pop(None, None)  # (files that do not exist yet)
        for i, dest in enumerate(destinations):
            if dest.kind == "file" and dest.path is not None:
                which = own.get(os.path.realpath(dest.path))
                which = which or same_file.get(_identity(dest.path))
                if which is not None:
                    self.fail(f"destinations[{i}].path", f"is {which} (storage.path)")

    def batch_memory(self, where: str, dest: DestinationConfig, max_event_bytes: int) -> None:
        """A warning when a full batch of the largest events may not fit a worker: passing
        and parsing a batch takes some 16 times its size (a batch of 39 MB failed every
        attempt at the default 512 MB)."""
        runs_code = dest.kind == "function" or dest.insert_function is not None
        if dest.batch is None or not runs_code:
            return
        batch_mb = dest.batch.max_events * max_event_bytes / MIB
        if batch_mb * _BATCH_MEMORY_FACTOR > dest.memory_limit_bytes / MIB:
            self.warnings.append(
                f"{where}.batch.max_events: {dest.batch.max_events} events of up to "
                f"{max_event_bytes // 1024} KB (server.max_event_size) make a batch of up to "
                f"{batch_mb:.0f} MB, which a worker may not manage within memory_limit "
                f"({dest.memory_limit_bytes // MIB} MB): lower max_events or raise memory_limit"
            )

    def server(self, t: dict[str, Any]) -> ServerConfig:
        d, g = ServerConfig(), partial(self.get, t, "server")
        host, port = g("listen", cv.listen, (d.host, d.port))
        request = g("max_request_size", cv.size(), d.max_request_bytes)
        decompressed = g("max_decompressed_size", cv.size(), max(d.max_decompressed_bytes, request))
        if decompressed < request:
            at_least = f"must be at least server.max_request_size ({request} bytes)"
            self.fail("server.max_decompressed_size", at_least)
        # (Twice the decompressed size by default: room for the fields destfnd adds.)
        merged = g("max_merged_size", cv.size(), max(d.max_merged_bytes, 2 * decompressed))
        if merged < decompressed:
            at_least = f"must be at least server.max_decompressed_size ({decompressed} bytes)"
            self.fail("server.max_merged_size", at_least)
        return ServerConfig(
            host=host,
            port=port,
            max_request_bytes=request,
            max_event_bytes=g("max_event_size", cv.size(), d.max_event_bytes),
            max_batch_events=g("max_batch_events", cv.integer(1), d.max_batch_events),
            max_decompressed_bytes=decompressed,
            max_merged_bytes=merged,
            dedupe_window_s=g("dedupe_window", cv.duration(zero_ok=True), d.dedupe_window_s),
            drain_timeout_s=g("drain_timeout", cv.duration(zero_ok=True), d.drain_timeout_s),
            body_timeout_s=g("body_timeout", cv.duration(), d.body_timeout_s),
            keepalive_timeout_s=g("keepalive_timeout", cv.duration(), d.keepalive_timeout_s),
            trusted_proxies=g("trusted_proxies", cv.networks, d.trusted_proxies),
            invalid_events=g("invalid_events", cv.choice("refuse", "skip"), d.invalid_events),
        )

    def destination(
        self, t: dict[str, Any], where: str, known: tuple[str, ...]
    ) -> DestinationConfig:
        # A disabled destination's missing function file or secret is a warning: serve does
        # not start it, and it may be disabled for just that reason.
        self._disabled = t.get("enabled") is False
        try:
            return self._destination(t, where, known)
        finally:
            self._disabled = False

    def _destination(
        self, t: dict[str, Any], where: str, known: tuple[str, ...]
    ) -> DestinationConfig:
        g = partial(self.get, t, where)
        # An invalid type is reported once; None then skips the per-type checks.
        kind = g("type", cv.choice(*DESTINATION_KINDS), None if "type" in t else "function")
        for key, owner in _KIND_ONLY_KEYS.items():
            if key in t and kind is not None and kind != owner:
                only = f'only allowed with type = "{owner}" (this one has type = "{kind}")'
                self.fail(f"{where}.{key}", only)
        if kind is not None and kind != "function" and "insert_function" not in t:
            for key in _FUNCTION_ONLY_KEYS:
                if key in t:
                    only = (f'only used by functions: a destination with type = "{kind}" '
                            "runs none unless it has an insert_function")  # fmt: skip
                    self.fail(f"{where}.{key}", only)
        why = "" if "type" in t else ' (or set type = "webhook" or "file")'
        batch, retry = f"{where}.batch", f"{where}.retry"
        d = DestinationConfig(name="", kind="")
        return DestinationConfig(
            name=g("name", cv.name, required=""),
            kind=kind,
            function=g("function", self.code_file, required=why) if kind == "function" else None,
            insert_function=g("insert_function", self.code_file),
            url=g("url", self.webhook_url, required=' for type = "webhook"')
            if kind == "webhook"
            else None,
            headers=self.headers(t.get("headers", {}), f"{where}.headers")
            if kind == "webhook"
            else (),
            path=g("path", self.file_path, required=' for type = "file"')
            if kind == "file"
            else None,
            sources=g("sources", partial(self.source_names, known), known),
            enabled=g("enabled", cv.boolean, d.enabled),
            integrations_key=g("integrations_key", cv.text, None),
            concurrency=g("concurrency", cv.integer(1, 1024), d.concurrency),
            timeout_s=g("timeout", cv.duration(), d.timeout_s),
            memory_limit_bytes=g("memory_limit", cv.size(64 * MIB), d.memory_limit_bytes),
            workers=g("workers", cv.integer(1, 64), d.workers),
            settings=g("settings", partial(self.settings, where=f"{where}.settings"), {}),
            batch=self.batch(self.table(t["batch"], batch, _BATCH_KEYS), batch)
            if "batch" in t
            else None,
            retry=self.retry(self.table(t.get("retry"), retry, _RETRY_KEYS), retry),
        )

    def batch(self, t: dict[str, Any], where: str) -> BatchConfig:
        d, g = BatchConfig(), partial(self.get, t, where)
        return BatchConfig(
            max_events=g("max_events", cv.integer(1, 10000), d.max_events),
            max_wait_s=g("max_wait", cv.duration(), d.max_wait_s),
        )

    def retry(self, t: dict[str, Any], where: str) -> RetryPolicy:
        d, g = RetryPolicy(), partial(self.get, t, where)
        initial = g("backoff_initial", cv.duration(), d.backoff_initial_s)
        maximum = g("backoff_max", cv.duration(), d.backoff_max_s)
        if maximum < initial and "backoff_max" in t:
            self.fail(f"{where}.backoff_max", f"must be >= backoff_initial ({initial:g}s)")
        elif maximum < initial:
            self.fail(f"{where}.backoff_initial", f"must be <= backoff_max ({maximum:g}s)")
        return RetryPolicy(
            max_attempts=g("max_attempts", cv.integer(1), d.max_attempts),
            max_age_s=g("max_age", cv.duration(), d.max_age_s),
            backoff_initial_s=initial,
            backoff_max_s=maximum,
            backoff_multiplier=g("backoff_multiplier", cv.number(1, 100), d.backoff_multiplier),
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
            raise ValueError(f"must be an array of source names, got {cv.show(value)}")
        if not value:
            raise ValueError("must name at least one source (leave it out for every source)")
        for j, name in enumerate(value):
            if name not in known:
                raise cv.Invalid(f"unknown source {name!r}{cv.hint(name, known)}", f"[{j}]")
        return tuple(dict.fromkeys(value))

    def headers(self, raw: Any, where: str) -> tuple[tuple[str, str | Secret], ...]:
        out = []
        for name, value in self.attempt(where, cv.table, raw, {}).items():
            if not _HEADER_NAME_RE.fullmatch(name):
                self.fail(f"{where}.{name}", "not a valid HTTP header name")
            elif name.lower() in _FRAMING_HEADERS:
                self.fail(f"{where}.{name}", _FRAMING_HEADERS[name.lower()])
            secret = self.attempt(f"{where}.{name}", self.header_value, value, None)
            if secret is not None:
                out.append((name, secret if secret.origin != "inline" else secret.value))
        return tuple(out)

    def webhook_url(self, value: Any) -> str | Secret:
        """A URL, or a secret holding one (a Slack or Zapier hook carries its token in it)."""
        if not isinstance(value, dict):
            return cv.url(value)
        secret = self.secret(value)
        if self.resolve:
            try:
                cv.url(secret.value)
            except ValueError:  # without the value: it is a secret
                what = "must hold an http:// or https:// URL with a host"
                raise ValueError(f"{secret.origin.replace(':', ' ', 1)} {what}") from None
        return secret

    def header_value(self, value: Any) -> Secret:
        secret = self.secret(value, inline_ok=True)
        if "\r" in secret.value or "\n" in secret.value:  # would inject headers
            raise ValueError("header values must not contain line breaks")
        # The HTTP client refuses any other control character but a tab at each request: every
        # delivery failed, retried for hours. (Where, by index: the value may be a secret.)
        bad = next((i for i, c in enumerate(secret.value) if _CONTROL.match(c)), None)
        if bad is not None:
            code = ord(secret.value[bad])
            raise ValueError(f"header values must not contain control characters (0x{code:02x} "
                             f"at index {bad})")  # fmt: skip
        return secret

    def settings(self, value: Any, where: str) -> dict[str, Any]:
        return {k: self.setting(v, f"{where}.{k}") for k, v in cv.table(value).items()}

    def setting(self, value: Any, where: str) -> Any:
        """Settings are plain values, except that a table like { env = "X" } is a Secret."""
        if isinstance(value, dict) and cv.is_secret_ref(value):
            return self.attempt(where, self.secret, value, None)
        if isinstance(value, dict):
            return {k: self.setting(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.setting(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BATCH_MEMORY_FACTOR = 16  # a worker's memory for a batch, in batch sizes (measured: ~13)


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
