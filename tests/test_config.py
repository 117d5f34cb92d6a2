"""destfnd.config: the example loads, every kind of mistake is reported with its key path."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from destfnd.config import (
    BatchConfig,
    ConfigError,
    RetryPolicy,
    Secret,
    config_secrets,
    load_config,
    parse_duration,
    parse_size,
)

EXAMPLE = """
[server]
listen = "127.0.0.1:8088"
[storage]
path = "var/destfnd.sqlite3"
retention = "7d"
[[sources]]
name = "web"
write_key = "wk_web_example"
[[sources]]
name = "backend"
write_key = { env = "BACKEND_WRITE_KEY" }
[[destinations]]
name = "crm"
function = "functions/crm.py"
insert_function = "functions/mask_pii.py"
sources = ["web"]
concurrency = 8
timeout = "5s"
memory_limit = "512MB"
settings = { endpoint = "https://api.example.com", apiKey = { env = "CRM_API_KEY" } }
[destinations.batch]
max_events = 20
max_wait = "10s"
[destinations.retry]
max_attempts = 10
max_age = "4h"
backoff_initial = "1s"
backoff_max = "1h"
[[destinations]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:9999/in"
headers = { Authorization = { env = "HOOK_TOKEN" } }
[[destinations]]
name = "archive"
type = "file"
path = "var/events.ndjson"
"""
ENV = {
    "BACKEND_WRITE_KEY": "bk_secret_from_env",
    "CRM_API_KEY": "crm_secret_from_env",
    "HOOK_TOKEN": "Bearer hook_secret_from_env",
}
SOURCE = '[[sources]]\nname = "web"\nwrite_key = "wk_web"\n'
DEST = '[[destinations]]\nname = "crm"\nfunction = "functions/crm.py"\n'
HOOK = '[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:9/in"\n'


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "crm.py").write_text("def on_track(event, settings):\n    pass\n")
    (tmp_path / "functions" / "mask_pii.py").write_text("def on_track(e, s):\n    return e\n")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "destfnd.toml"
    path.write_text(text)
    return path


def problems_of(folder: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(folder, text), environ=ENV if environ is None else environ)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_config_example_loads_with_expected_values(folder: Path) -> None:
    cfg = load_config(write(folder, EXAMPLE), environ=ENV)

    assert cfg.path == folder / "destfnd.toml"
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8088)
    assert cfg.server.max_request_bytes == 500 * 1024
    assert cfg.server.max_event_bytes == 32 * 1024
    assert cfg.server.max_batch_events == 2500
    assert cfg.server.max_decompressed_bytes == 2 * 1024 * 1024
    assert cfg.server.dedupe_window_s == 86400.0
    assert cfg.server.drain_timeout_s == 20.0
    assert cfg.server.trusted_proxies == ("127.0.0.1", "::1")
    assert cfg.storage.path == folder / "var" / "destfnd.sqlite3"
    assert cfg.storage.retention_s == 7 * 86400
    assert cfg.storage.synchronous == "FULL"
    assert (cfg.logging.level, cfg.logging.format) == ("info", "auto")

    assert [s.name for s in cfg.sources] == ["web", "backend"]
    assert cfg.sources[0].write_key == Secret("wk_web_example", "inline")
    assert cfg.sources[1].write_key == Secret("bk_secret_from_env", "env:BACKEND_WRITE_KEY")
    assert [s.fill_ip for s in cfg.sources] == [False, False]

    crm, hook, archive = cfg.destinations
    assert (crm.name, crm.kind) == ("crm", "function")
    assert crm.function == folder / "functions" / "crm.py"
    assert crm.insert_function == folder / "functions" / "mask_pii.py"
    assert crm.sources == ("web",)
    assert crm.enabled is True
    assert crm.concurrency == 8
    assert crm.timeout_s == 5.0
    assert crm.memory_limit_bytes == 512 * 1024 * 1024
    assert crm.settings["endpoint"] == "https://api.example.com"
    assert crm.settings["apiKey"] == Secret("crm_secret_from_env", "env:CRM_API_KEY")
    assert crm.batch == BatchConfig(max_events=20, max_wait_s=10.0)
    assert crm.retry == RetryPolicy(10, 4 * 3600.0, 1.0, 3600.0)
    assert crm.url is None and crm.path is None and crm.headers == ()

    assert (hook.kind, hook.url, hook.function) == ("webhook", "http://127.0.0.1:9999/in", None)
    token = Secret("Bearer hook_secret_from_env", "env:HOOK_TOKEN")
    assert hook.headers == (("Authorization", token),)
    assert hook.sources == ("web", "backend")  # default: every source, in config order
    assert hook.batch is None
    assert hook.retry == RetryPolicy()

    assert (archive.kind, archive.path) == ("file", folder / "var" / "events.ndjson")
    assert archive.sources == ("web", "backend")


def test_config_minimal_file_gets_defaults_and_no_destinations(folder: Path) -> None:
    cfg = load_config(write(folder, SOURCE), environ={})

    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8088)
    assert cfg.storage.path == folder / "var" / "destfnd.sqlite3"
    assert cfg.storage.retention_s == 7 * 86400
    assert cfg.destinations == ()


def test_config_values_are_parsed_and_normalized(folder: Path) -> None:
    text = (
        '[server]\nlisten = "[::1]:9000"\nmax_request_size = "4MB"\nmax_event_size = "64KiB"\n'
        'dedupe_window = "0s"\ndrain_timeout = "1m30s"\n'
        'trusted_proxies = ["10.0.0.0/8", "fd00::1"]\n'
        '[storage]\npath = "/abs/q.db"\nsynchronous = "normal"\n'
        '[logging]\nlevel = "DEBUG"\nformat = "json"\n'
        + SOURCE
        + "fill_ip = true\n"
        + DEST
        + 'enabled = false\ntimeout = "250ms"\nmemory_limit = "1GB"\n'
        + 'integrations_key = "Google Analytics 4"\n'
        "[destinations.batch]\n"
        "[destinations.retry]\nbackoff_multiplier = 1.5\n"
    )
    cfg = load_config(write(folder, text), environ={})

    assert (cfg.server.host, cfg.server.port) == ("::1", 9000)
    assert cfg.server.max_request_bytes == 4 * 1024 * 1024
    assert cfg.server.max_decompressed_bytes == 4 * 1024 * 1024  # never below the request cap
    assert cfg.server.max_event_bytes == 64 * 1024
    assert cfg.server.dedupe_window_s == 0.0
    assert cfg.server.drain_timeout_s == 90.0
    assert cfg.server.trusted_proxies == ("10.0.0.0/8", "fd00::1")
    assert cfg.sources[0].fill_ip is True
    assert cfg.storage.path == Path("/abs/q.db")
    assert cfg.storage.synchronous == "NORMAL"
    assert (cfg.logging.level, cfg.logging.format) == ("debug", "json")
    (dest,) = cfg.destinations
    assert dest.enabled is False
    assert dest.integrations_key == "Google Analytics 4"
    assert dest.timeout_s == 0.25
    assert dest.memory_limit_bytes == 1024**3
    assert dest.batch == BatchConfig()
    assert dest.retry == RetryPolicy(backoff_multiplier=1.5)
    integer = load_config(write(folder, text.replace("1.5", "3")), environ={})
    assert integer.destinations[0].retry.backoff_multiplier == 3.0
    assert type(integer.destinations[0].retry.backoff_multiplier) is float


BAD_CONFIGS = [
    # (id, config text, dotted key path, phrase in the problem)
    ("unknown_top_key", 'colour = "red"\n' + SOURCE, "colour", "unknown key"),
    ("unknown_dest_key", SOURCE + DEST + "concurency = 4\n", "destinations[0].concurency",
     "unknown key (did you mean 'concurrency'?)"),
    ("unknown_server_key", "[server]\nport = 80\n" + SOURCE, "server.port", "unknown key"),
    ("invalid_events_choice", '[server]\ninvalid_events = "drop"\n' + SOURCE,
     "server.invalid_events", "must be one of refuse, skip, got 'drop'"),
    ("unknown_retry_key", SOURCE + DEST + "[destinations.retry]\nmax_attempt = 3\n",
     "destinations[0].retry.max_attempt", "did you mean 'max_attempts'?"),
    ("unknown_batch_key", SOURCE + DEST + "[destinations.batch]\nsize = 3\n",
     "destinations[0].batch.size", "unknown key"),
    ("unknown_secret_key", '[[sources]]\nname = "web"\nwrite_key = { enb = "K" }\n',
     "sources[0].write_key.enb", "did you mean 'env'?"),
    ("server_not_table", 'server = "x"\n' + SOURCE, "server", "must be a table"),
    ("sources_not_array", '[sources]\nname = "web"\n', "sources", "must be an array of tables"),
    ("no_sources", '[server]\nlisten = "127.0.0.1:1"\n', "sources", "at least one"),
    ("source_without_write_key", '[[sources]]\nname = "web"\n', "sources[0].write_key",
     "is required"),
    ("source_without_name", '[[sources]]\nwrite_key = "k"\n', "sources[0].name", "is required"),
    ("source_bad_name", '[[sources]]\nname = "my web"\nwrite_key = "k"\n', "sources[0].name",
     "must use only letters"),
    ("empty_write_key", '[[sources]]\nname = "web"\nwrite_key = ""\n', "sources[0].write_key",
     "must not be empty"),
    ("duplicate_source", SOURCE + '[[sources]]\nname = "web"\nwrite_key = "other"\n',
     "sources[1].name", "duplicate name 'web' (also sources[0])"),
    ("shared_write_key", SOURCE + '[[sources]]\nname = "app"\nwrite_key = "wk_web"\n',
     "sources[1].write_key", "same write key as sources[0]"),
    ("env_missing", '[[sources]]\nname = "web"\nwrite_key = { env = "WEB_WRITE_KEY" }\n',
     "sources[0].write_key", "environment variable WEB_WRITE_KEY is not set"),
    ("env_empty", '[[sources]]\nname = "web"\nwrite_key = { env = "EMPTY" }\n',
     "sources[0].write_key", "environment variable EMPTY is empty"),
    ("secret_two_kinds", '[[sources]]\nname = "web"\nwrite_key = { env = "A", file = "b" }\n',
     "sources[0].write_key", "exactly one of env, file or credential"),
    ("secret_file_missing", '[[sources]]\nname = "web"\nwrite_key = { file = "nope.txt" }\n',
     "sources[0].write_key", "cannot read secret file"),
    ("secret_file_empty", '[[sources]]\nname = "web"\nwrite_key = { file = "empty.txt" }\n',
     "sources[0].write_key", "empty.txt is empty"),
    ("credential_without_dir", '[[sources]]\nname = "web"\nwrite_key = { credential = "wk" }\n',
     "sources[0].write_key", "credential wk needs $CREDENTIALS_DIRECTORY"),
    ("dest_without_name", SOURCE + '[[destinations]]\nfunction = "functions/crm.py"\n',
     "destinations[0].name", "is required"),
    ("duplicate_destination", SOURCE + DEST + DEST, "destinations[1].name",
     "duplicate name 'crm' (also destinations[0])"),
    ("unknown_source", SOURCE + DEST + 'sources = ["web", "mobile"]\n',
     "destinations[0].sources[1]", "unknown source 'mobile'"),
    ("empty_sources", SOURCE + DEST + "sources = []\n", "destinations[0].sources",
     "at least one source"),
    ("sources_not_names", SOURCE + DEST + 'sources = "web"\n', "destinations[0].sources",
     "must be an array of source names"),
    ("unknown_type", SOURCE + '[[destinations]]\nname = "x"\ntype = "lambda"\n',
     "destinations[0].type", "must be one of function, webhook, file"),
    ("function_missing", SOURCE + '[[destinations]]\nname = "x"\n', "destinations[0].function",
     "is required"),
    ("function_file_not_found", SOURCE + '[[destinations]]\nname = "x"\nfunction = "fn/x.py"\n',
     "destinations[0].function", "file not found"),
    ("function_is_a_folder", SOURCE + '[[destinations]]\nname = "x"\nfunction = "functions"\n',
     "destinations[0].function", "not a file"),
    ("insert_function_not_found", SOURCE + DEST + 'insert_function = "functions/nope.py"\n',
     "destinations[0].insert_function", "file not found"),
    # Only what a disabled destination lacks (its function file, a secret) is a warning.
    ("disabled_still_checked", SOURCE + DEST + "enabled = false\nconcurrency = 0\n",
     "destinations[0].concurrency", "must be an integer from 1 to 1024"),
    ("file_is_the_database", SOURCE + '[storage]\npath = "db"\n[[destinations]]\nname = "f"\n'
     'type = "file"\npath = "db"\n', "destinations[0].path", "is the database (storage.path)"),
    ("file_is_the_wal", SOURCE + '[storage]\npath = "db"\n[[destinations]]\nname = "f"\n'
     'type = "file"\npath = "./db-wal"\n', "destinations[0].path",
     "is the database's -wal (storage.path)"),
    ("file_is_the_journal", SOURCE + '[storage]\npath = "db"\n[[destinations]]\nname = "f"\n'
     'type = "file"\npath = "db-journal"\n', "destinations[0].path",
     "is the database's -journal (storage.path)"),
    ("webhook_without_url", SOURCE + '[[destinations]]\nname = "h"\ntype = "webhook"\n',
     "destinations[0].url", "is required"),
    ("webhook_bad_url", SOURCE + HOOK.replace("http://127.0.0.1:9/in", "ftp://host/x"),
     "destinations[0].url", "must be an http:// or https:// URL"),
    ("webhook_url_without_host", SOURCE + HOOK.replace("http://127.0.0.1:9/in", "http:///in"),
     "destinations[0].url", "with a host"),
    # Each was accepted, and every event retried for hours on the HTTP client's error.
    ("webhook_url_port_out_of_range",
     SOURCE + HOOK.replace("http://127.0.0.1:9/in", "http://127.0.0.1:99999/in"),
     "destinations[0].url", "'http://127.0.0.1:99999/in' has no valid port (1-65535)"),
    ("webhook_url_port_zero", SOURCE + HOOK.replace("127.0.0.1:9/", "127.0.0.1:0/"),
     "destinations[0].url", "has no valid port (1-65535)"),
    ("webhook_url_host_with_space",
     SOURCE + HOOK.replace("http://127.0.0.1:9/in", "http://exa mple.com/in"),
     "destinations[0].url", "has no valid host name: 'exa mple.com'"),
    ("webhook_secret_url_bad_port", SOURCE + HOOK.replace('"http://127.0.0.1:9/in"',
     '{ env = "BAD_PORT_URL" }'), "destinations[0].url",
     "env BAD_PORT_URL must hold an http:// or https:// URL with a host"),
    ("url_on_function", SOURCE + DEST + 'url = "http://x/"\n', "destinations[0].url",
     'only allowed with type = "webhook"'),
    ("headers_on_file", SOURCE + '[[destinations]]\nname = "f"\ntype = "file"\npath = "o"\n'
     'headers = { A = "b" }\n', "destinations[0].headers", 'only allowed with type = "webhook"'),
    ("path_on_webhook", SOURCE + HOOK + 'path = "x"\n', "destinations[0].path",
     'only allowed with type = "file"'),
    ("function_on_webhook", SOURCE + HOOK + 'function = "functions/crm.py"\n',
     "destinations[0].function", 'only allowed with type = "function"'),
    ("file_without_path", SOURCE + '[[destinations]]\nname = "f"\ntype = "file"\n',
     "destinations[0].path", "is required"),
    ("header_secret_env_missing", SOURCE + HOOK + 'headers = { "X-Key" = { env = "NOPE" } }\n',
     "destinations[0].headers.X-Key", "environment variable NOPE is not set"),
    ("header_bad_name", SOURCE + HOOK + 'headers = { "Bad Name" = "v" }\n',
     "destinations[0].headers.Bad Name", "not a valid HTTP header name"),
    ("header_line_break", SOURCE + HOOK + 'headers = { A = "b\\r\\nX-Evil: 1" }\n',
     "destinations[0].headers.A", "line breaks"),
    # aiohttp refuses these at each request: every delivery failed, retried until it expired.
    ("header_control_character", SOURCE + HOOK + 'headers = { A = "tok\\u0000en" }\n',
     "destinations[0].headers.A", "control characters (0x00 at index 3)"),
    ("header_delete_character", SOURCE + HOOK + 'headers = { A = "x\\u007f" }\n',
     "destinations[0].headers.A", "control characters (0x7f at index 1)"),
    ("storage_path_nul", '[storage]\npath = "db\\u0000x"\n' + SOURCE, "storage.path",
     "NUL character"),
    ("file_path_nul", SOURCE + '[[destinations]]\nname = "f"\ntype = "file"\n'
     'path = "out\\u0000.ndjson"\n', "destinations[0].path", "NUL character"),
    # A configured Content-Length cut every body to it, and deliveries said delivered.
    ("header_content_length", SOURCE + HOOK + 'headers = { "Content-Length" = "40" }\n',
     "destinations[0].headers.Content-Length", "set by destfnd for each request"),
    ("header_transfer_encoding", SOURCE + HOOK + 'headers = { "transfer-encoding" = "x" }\n',
     "destinations[0].headers.transfer-encoding", "set by destfnd for each request"),
    ("header_upgrade", SOURCE + HOOK + 'headers = { Upgrade = "websocket" }\n',
     "destinations[0].headers.Upgrade", "asks for no other protocol"),
    ("header_content_encoding", SOURCE + HOOK + 'headers = { "Content-Encoding" = "gzip" }\n',
     "destinations[0].headers.Content-Encoding", "sends the JSON as it is"),
    ("settings_secret_missing", SOURCE + DEST + 'settings = { db = { pw = { env = "PW" } } }\n',
     "destinations[0].settings.db.pw", "environment variable PW is not set"),
    ("settings_not_table", SOURCE + DEST + 'settings = "x"\n', "destinations[0].settings",
     "must be a table"),
    ("concurrency_type", SOURCE + DEST + 'concurrency = "8"\n', "destinations[0].concurrency",
     "must be an integer from 1 to 1024, got '8'"),
    ("concurrency_zero", SOURCE + DEST + "concurrency = 0\n", "destinations[0].concurrency",
     "from 1 to 1024, got 0"),
    ("concurrency_bool", SOURCE + DEST + "concurrency = true\n", "destinations[0].concurrency",
     "must be an integer"),
    ("enabled_type", SOURCE + DEST + 'enabled = "yes"\n', "destinations[0].enabled",
     "must be true or false"),
    ("integrations_key_empty", SOURCE + DEST + 'integrations_key = ""\n',
     "destinations[0].integrations_key", "must be a non-empty string"),
    ("timeout_bad_unit", SOURCE + DEST + 'timeout = "5 seconds"\n', "destinations[0].timeout",
     "invalid duration"),
    ("timeout_bare_number", SOURCE + DEST + "timeout = 5\n", "destinations[0].timeout",
     'durations need a unit, e.g. "5s"'),
    ("timeout_zero", SOURCE + DEST + 'timeout = "0s"\n', "destinations[0].timeout",
     "must be greater than 0"),
    ("memory_bad", SOURCE + DEST + 'memory_limit = "lots"\n', "destinations[0].memory_limit",
     "invalid size"),
    ("memory_tiny", SOURCE + DEST + 'memory_limit = "1MB"\n', "destinations[0].memory_limit",
     "must be at least 64MB"),
    ("size_bare_number", '[server]\nmax_request_size = 500000\n' + SOURCE,
     "server.max_request_size", 'sizes need a unit'),
    ("decompressed_below_request", '[server]\nmax_request_size = "1MB"\n'
     'max_decompressed_size = "512KB"\n' + SOURCE, "server.max_decompressed_size",
     "at least server.max_request_size"),
    ("batch_events_high", SOURCE + DEST + "[destinations.batch]\nmax_events = 10001\n",
     "destinations[0].batch.max_events", "from 1 to 10000"),
    ("batch_wait_table", SOURCE + DEST + "[destinations.batch]\nmax_wait = { s = 1 }\n",
     "destinations[0].batch.max_wait", "got a table"),
    ("retry_attempts_zero", SOURCE + DEST + "[destinations.retry]\nmax_attempts = 0\n",
     "destinations[0].retry.max_attempts", "must be an integer >= 1, got 0"),
    ("retry_multiplier_below_1", SOURCE + DEST + "[destinations.retry]\nbackoff_multiplier = 0.5\n",
     "destinations[0].retry.backoff_multiplier", "must be a number from 1 to 100, got 0.5"),
    ("retry_multiplier_text", SOURCE + DEST + '[destinations.retry]\nbackoff_multiplier = "5"\n',
     "destinations[0].retry.backoff_multiplier", "must be a number from 1 to 100, got"),
    ("retry_multiplier_bool", SOURCE + DEST + "[destinations.retry]\nbackoff_multiplier = true\n",
     "destinations[0].retry.backoff_multiplier", "must be a number from 1 to 100, got true"),
    ("retry_multiplier_inf", SOURCE + DEST + "[destinations.retry]\nbackoff_multiplier = inf\n",
     "destinations[0].retry.backoff_multiplier", "must be a number from 1 to 100, got inf"),
    ("retry_multiplier_high", SOURCE + DEST + "[destinations.retry]\nbackoff_multiplier = 101\n",
     "destinations[0].retry.backoff_multiplier", "must be a number from 1 to 100, got 101"),
    ("retry_multiplier_typo", SOURCE + DEST + "[destinations.retry]\nbackoff_multipler = 3\n",
     "destinations[0].retry.backoff_multipler", "did you mean 'backoff_multiplier'?"),
    ("retry_multiplier_nan", SOURCE + DEST + "[destinations.retry]\nbackoff_multiplier = nan\n",
     "destinations[0].retry.backoff_multiplier", "must be a number from 1 to 100, got"),
    ("retry_backoff_order", SOURCE + DEST + '[destinations.retry]\nbackoff_initial = "1m"\n'
     'backoff_max = "30s"\n', "destinations[0].retry.backoff_max", "must be >= backoff_initial"),
    ("retry_initial_above_default_max", SOURCE + DEST + '[destinations.retry]\n'
     'backoff_initial = "2h"\n', "destinations[0].retry.backoff_initial", "<= backoff_max"),
    ("listen_without_port", '[server]\nlisten = "localhost"\n' + SOURCE, "server.listen",
     '"host:port"'),
    ("listen_port_negative", '[server]\nlisten = "127.0.0.1:-1"\n' + SOURCE, "server.listen",
     "port from 0 to 65535"),
    ("listen_port_too_big", '[server]\nlisten = "127.0.0.1:65536"\n' + SOURCE, "server.listen",
     "port from 0 to 65535"),
    ("listen_bare_ipv6", '[server]\nlisten = "::1:8088"\n' + SOURCE, "server.listen",
     '"[::1]:8088"'),
    ("listen_no_host", '[server]\nlisten = ":8088"\n' + SOURCE, "server.listen", "host:port"),
    ("listen_nul", '[server]\nlisten = "local\\u0000host:8088"\n' + SOURCE, "server.listen",
     "host:port"),
    ("logging_level", '[logging]\nlevel = "verbose"\n' + SOURCE, "logging.level",
     "must be one of debug, info, warning, error"),
    ("logging_format", '[logging]\nformat = "xml"\n' + SOURCE, "logging.format",
     "must be one of auto, json, console"),
    ("storage_synchronous", '[storage]\nsynchronous = "OFF"\n' + SOURCE, "storage.synchronous",
     "must be one of FULL, NORMAL"),
    ("source_fill_ip", SOURCE + 'fill_ip = "yes"\n', "sources[0].fill_ip",
     "must be true or false"),
    ("trusted_proxies_not_array", '[server]\ntrusted_proxies = "10.0.0.1"\n' + SOURCE,
     "server.trusted_proxies", 'must be an array of addresses or networks such as ["10.0.0.0/8"]'),
    ("trusted_proxies_bad_entry",
     '[server]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/33"]\n' + SOURCE,
     "server.trusted_proxies[1]", "not an IP address or network: '10.0.0.0/33'"),
    ("trusted_proxies_host_name", '[server]\ntrusted_proxies = ["localhost"]\n' + SOURCE,
     "server.trusted_proxies[0]", "'localhost' (host names are not resolved)"),
    ("trusted_proxies_host_bits", '[server]\ntrusted_proxies = ["10.0.0.5/8"]\n' + SOURCE,
     "server.trusted_proxies[0]", "(10.0.0.5/8 has host bits set)"),
    ("storage_retention", '[storage]\nretention = "forever"\n' + SOURCE, "storage.retention",
     "invalid duration"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "where", "phrase"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_config_bad_value_is_reported_with_its_key_path(
    folder: Path, text: str, where: str, phrase: str
) -> None:
    (folder / "empty.txt").write_text("\n")
    environ = {"EMPTY": "", "BAD_PORT_URL": "https://hooks.example.com:70000/in"}
    problems = problems_of(folder, text, environ=environ)

    matching = [p for p in problems if p.startswith(f"{where}: ")]
    assert matching, f"no problem at {where!r} in {problems}"
    assert any(phrase in p for p in matching), f"{phrase!r} not in {matching}"


def test_config_every_problem_is_reported_at_once(folder: Path) -> None:
    text = (
        '[server]\nlisten = "nowhere"\n[logging]\nlevel = "loud"\n'
        + SOURCE
        + DEST
        + 'concurrency = 0\ntimeout = 5\nsources = ["mobile"]\n'
        '[[destinations]]\nname = "h"\ntype = "webhook"\n'
    )
    problems = problems_of(folder, text)

    wheres = [p.split(": ", 1)[0] for p in problems]
    assert wheres == [
        "server.listen",
        "logging.level",
        "destinations[0].sources[0]",
        "destinations[0].concurrency",
        "destinations[0].timeout",
        "destinations[1].url",
    ]


def test_config_function_not_found_names_the_resolved_path(folder: Path) -> None:
    text = SOURCE + '[[destinations]]\nname = "x"\nfunction = "functions/../fn/missing.py"\n'
    (problem,) = problems_of(folder, text)

    assert problem == f"destinations[0].function: file not found: {folder}/fn/missing.py"


def test_config_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml", environ={})

    assert info.value.problems == [
        f"{tmp_path}/absent.toml: cannot read config: No such file or directory"
    ]


def test_config_toml_syntax_error_gives_line_and_column(folder: Path) -> None:
    (problem,) = problems_of(folder, '[server]\nlisten "127.0.0.1:8088"\n')

    assert problem.startswith(f"{folder}/destfnd.toml: invalid TOML: ")
    assert "line 2, column" in problem


def test_config_listen_port_zero_means_any_free_port(folder: Path) -> None:
    cfg = load_config(write(folder, '[server]\nlisten = "0.0.0.0:0"\n' + SOURCE), environ={})

    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 0)


def test_config_path_defaults_to_env_then_cwd(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(folder, SOURCE)
    assert load_config(environ={"DESTFND_CONFIG": str(path)}).path == path

    (folder / "config").mkdir()
    (folder / "config" / "destfnd.toml").write_text(SOURCE.replace("web", "cwd"))
    monkeypatch.chdir(folder)
    cfg = load_config(environ={})
    assert cfg.path == folder / "config" / "destfnd.toml"
    assert cfg.sources[0].name == "cwd"
    assert cfg.storage.path == folder / "config" / "var" / "destfnd.sqlite3"


def test_config_env_file_and_credential_secrets_resolve(folder: Path) -> None:
    (folder / "secrets").mkdir()
    (folder / "secrets" / "app.key").write_text("from_file\n")
    (folder / "creds").mkdir()
    (folder / "creds" / "cli_key").write_text("from_credential")
    text = (
        '[[sources]]\nname = "web"\nwrite_key = { env = "WEB_KEY" }\n'
        '[[sources]]\nname = "app"\nwrite_key = { file = "secrets/app.key" }\n'
        '[[sources]]\nname = "cli"\nwrite_key = { credential = "cli_key" }\n'
    )
    environ = {"WEB_KEY": "from_env", "CREDENTIALS_DIRECTORY": str(folder / "creds")}
    cfg = load_config(write(folder, text), environ=environ)

    assert [s.write_key for s in cfg.sources] == [
        Secret("from_env", "env:WEB_KEY"),
        Secret("from_file", f"file:{folder}/secrets/app.key"),  # one trailing newline stripped
        Secret("from_credential", "credential:cli_key"),
    ]


def test_config_a_credential_systemd_did_not_load_names_the_unit_line(folder: Path) -> None:
    (folder / "creds").mkdir()  # systemd made the folder, but not this credential
    text = '[[sources]]\nname = "web"\nwrite_key = { credential = "web_key" }\n'
    with pytest.raises(ConfigError) as raised:
        load_config(write(folder, text), environ={"CREDENTIALS_DIRECTORY": str(folder / "creds")})
    (problem,) = raised.value.problems
    assert problem.startswith("sources[0].write_key: cannot read secret file ")
    assert "LoadCredential=web_key:" in problem


def test_config_settings_keep_plain_values_and_nested_secrets(folder: Path) -> None:
    text = (
        SOURCE
        + DEST
        + (
            'settings = { env = "prod", n = 3, flags = [true, { env = "A" }], '
            'db = { user = "u", pw = { env = "PW" }, opts = { env = "x", file = "y" } } }\n'
        )
    )
    (dest,) = load_config(write(folder, text), environ={"PW": "pw_value", "A": "a"}).destinations

    assert dest.settings == {
        "env": "prod",  # the settings table itself is never a secret
        "n": 3,
        "flags": [True, Secret("a", "env:A")],
        "db": {"user": "u", "pw": Secret("pw_value", "env:PW"), "opts": {"env": "x", "file": "y"}},
    }


def test_config_secret_never_shows_its_value(folder: Path) -> None:
    secret = Secret("hunter2", "env:PW")
    assert repr(secret) == str(secret) == f"{secret}" == "Secret(<redacted>)"
    assert "hunter2" not in repr([secret, {"k": secret}])

    cfg = load_config(write(folder, EXAMPLE), environ=ENV)
    for value in ENV.values():
        assert value not in repr(cfg)

    text = (
        '[[sources]]\nname = "a"\nwrite_key = { env = "K1" }\n'
        '[[sources]]\nname = "b"\nwrite_key = { env = "K2" }\n'
        + HOOK
        + 'headers = { A = { env = "K3" } }\n'
    )
    problems = problems_of(folder, text, {"K1": "s3cr3t", "K2": "s3cr3t", "K3": "x\ns3cr3t"})
    assert [p.split(": ", 1)[0] for p in problems] == [
        "sources[1].write_key",
        "destinations[0].headers.A",
    ]
    assert "s3cr3t" not in "\n".join(problems)


def test_config_secrets_lists_env_and_file_values_only(folder: Path) -> None:
    (folder / "pw.txt").write_text("file_secret\n")
    # The last destination becomes a webhook with an inline header and a file secret header.
    text = EXAMPLE.replace(
        'type = "file"\npath = "var/events.ndjson"\n',
        'type = "webhook"\nurl = "https://e.example/x"\n'
        'headers = { "X-Plain" = "inline_header", "X-File" = { file = "pw.txt" } }\n',
    )
    cfg = load_config(write(folder, text), environ=ENV)

    assert config_secrets(cfg) == [
        "bk_secret_from_env",
        "crm_secret_from_env",
        "Bearer hook_secret_from_env",
        "file_secret",
    ]


def test_config_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["a.b: bad", "c: worse"])))

    assert error.problems == ["a.b: bad", "c: worse"]
    assert str(error) == "a.b: bad\nc: worse"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1.5s", 1.5), ("5s", 5.0), ("10m", 600.0), ("4h", 14400.0),
     ("7d", 604800.0), ("1h30m", 5400.0), (" 2 s ", 2.0), ("0s", 0.0), ("1H", 3600.0)],
)  # fmt: skip
def test_config_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [("5", "durations need a unit"), ("1.5", "durations need a unit"), ("", "invalid duration"),
     ("5x", "invalid duration"), ("-1s", "invalid duration"), ("s", "invalid duration"),
     ("1.2.3s", "invalid duration"), ("five seconds", "invalid duration")],
)  # fmt: skip
def test_config_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512B", 512), ("32KB", 32 * 1024), ("512MB", 512 * 1024**2), ("1GB", 1024**3),
     ("2MiB", 2 * 1024**2), ("64KiB", 64 * 1024), ("1GiB", 1024**3), ("1.5KB", 1536),
     ("64kb", 64 * 1024), (" 10 MB ", 10 * 1024**2)],
)  # fmt: skip
def test_config_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [("512", "sizes need a unit"), ("", "invalid size"), ("12XB", "invalid size"),
     ("-1KB", "invalid size"), ("KB", "invalid size"), ("1TB", "invalid size")],
)  # fmt: skip
def test_config_parse_size_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def test_config_a_secret_urls_token_values_and_a_plain_urls_password_are_redacted(tmp_path):
    """A secret url's query value that looks like a token is hidden alone (a redirect's
    Location may carry it to another URL), not one that is words ("application/json"). A
    password in a plain url is hidden from 8 characters ("test" would hide every "test");
    Connection and Keep-Alive headers are a client's to send."""
    from destfnd.config import config_secrets
    from destfnd.redact import Redactor

    config = tmp_path / "destfnd.toml"
    config.write_text(
        '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "s"\ntype = "webhook"\nurl = { env = "HOOK" }\n'
        '[[destinations]]\nname = "pw"\ntype = "webhook"\n'
        'url = "https://bob:hunter2hunter2@h.example/in"\n'
        'headers = { Connection = "close", "Keep-Alive" = "timeout=5" }\n'
        '[[destinations]]\nname = "short"\ntype = "webhook"\nurl = "https://a:test@h.example/"\n'
    )
    hook = "https://h.example/in?token=ABCDEFSECRET99&format=application/json&tz=Europe/Berlin"
    redact = Redactor(config_secrets(load_config(config, environ={"HOOK": hook})))
    assert redact("to https://elsewhere.example/x?t=ABCDEFSECRET99") == (
        "to https://elsewhere.example/x?t=[redacted]"
    )
    assert redact("Content-Type: application/json, Europe/Berlin") == (
        "Content-Type: application/json, Europe/Berlin"
    )
    assert redact("POST https://bob:hunter2hunter2@h.example/in") == (
        "POST https://bob:[redacted]@h.example/in"
    )
    assert redact("a test run") == "a test run"


def test_config_unresolved_secrets_load_without_their_environment(tmp_path):
    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[[sources]]\nname = "a"\nwrite_key = { env = "A_KEY" }\n'
        '[[sources]]\nname = "b"\nwrite_key = { credential = "b_key" }\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert any("A_KEY is not set" in p for p in exc.value.problems)
    cfg = load_config(path, environ={}, resolve_secrets=False)
    assert [s.write_key.origin for s in cfg.sources] == ["env:A_KEY", "credential:b_key"]


def test_config_a_file_destination_hard_linked_to_the_database_is_refused(tmp_path):
    """A file destination's lines must never go into the SQLite file, by any name."""
    (tmp_path / "db").write_bytes(b"")
    (tmp_path / "events.ndjson").hardlink_to(tmp_path / "db")
    path = tmp_path / "destfnd.toml"
    path.write_text(
        SOURCE + '[storage]\npath = "db"\n[[destinations]]\nname = "f"\ntype = "file"\n'
        'path = "events.ndjson"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["destinations[0].path: is the database (storage.path)"]


def _redactor_of_secret_urls(tmp_path, *urls: str):
    """The redactor serve makes of a config with a webhook for each of `urls`, a secret."""
    from destfnd.config import config_secrets
    from destfnd.redact import Redactor

    config = tmp_path / "destfnd.toml"
    config.write_text(SOURCE + "".join(
        f'[[destinations]]\nname = "d{i}"\ntype = "webhook"\nurl = {{ env = "URL_{i}" }}\n'
        for i in range(len(urls))
    ))  # fmt: skip
    cfg = load_config(config, environ={f"URL_{i}": url for i, url in enumerate(urls)})
    return Redactor(config_secrets(cfg))


def test_config_a_secret_url_is_redacted_in_its_forms_but_not_its_short_parts(tmp_path):
    """A secret webhook url is hidden also as the HTTP client normalizes it, and its path and
    query alone when long enough to be a token; not "/api" or "json" alone, which would mangle
    another destination's URL or a Content-Type ("application/[redacted]")."""
    redact = _redactor_of_secret_urls(
        tmp_path, "https://HOOKS.example.com/services/T000/B000/XXXXsekrit",
        "http://127.0.0.1:9/api?json",
    )  # fmt: skip
    assert redact("POST https://hooks.example.com/services/T000/B000/XXXXsekrit") == (
        "POST [redacted]"
    )
    assert redact("Cannot POST /services/T000/B000/XXXXsekrit") == "Cannot POST [redacted]"
    assert redact("http://127.0.0.1:9/api?json") == "[redacted]"
    assert redact("http://127.0.0.1:9/api/track application/json") == (
        "http://127.0.0.1:9/api/track application/json"
    )


def test_config_a_secret_url_token_in_its_host_or_password_is_redacted(tmp_path):
    """A token in the host (subdomain hooks) shows alone in the HTTP client's errors
    ("cannot connect to HOST:443"); a password in the URL, in the client's repr of it."""
    redact = _redactor_of_secret_urls(
        tmp_path, "https://eo1a2b3c4d5e6f7.m.pipedream.net",
        "https://user:hunter2-pw@hooks.example.com/in",
    )  # fmt: skip
    assert redact("Cannot connect to host eo1a2b3c4d5e6f7.m.pipedream.net:443") == (
        "Cannot connect to host [redacted].m.pipedream.net:443"
    )
    assert redact("auth hunter2-pw failed at hooks.example.com") == (
        "auth [redacted] failed at hooks.example.com"
    )
