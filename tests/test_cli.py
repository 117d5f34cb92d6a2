"""The `destfnd` command as a user runs it: exit codes and messages, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import pytest
from support import config_text, run_cli

REPO = Path(__file__).resolve().parents[1]


def test_cli_check_config_accepts_the_bundled_example(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    result = run_cli("check-config", "--config", str(tmp_path / "config" / "destfnd.toml"))
    assert result.returncode == 0, result.stderr
    assert "archive (file)" in result.stdout and "hello (function)" in result.stdout
    assert "hook (webhook, disabled)" in result.stdout


async def test_cli_the_bundled_example_serves_and_delivers(make_daemon, tmp_path, session):
    """The quick start: the example config, as shipped, takes an event to both destinations."""
    from support import post

    shutil.copytree(REPO / "config", tmp_path / "config")
    config = (tmp_path / "config" / "destfnd.toml").read_text()
    daemon = make_daemon(config.replace("127.0.0.1:8088", "127.0.0.1:0"))
    daemon.config.unlink()
    daemon.config = tmp_path / "config" / "destfnd.toml"
    daemon.config.write_text(config.replace("127.0.0.1:8088", "127.0.0.1:0"))
    await daemon.start()
    event = {"userId": "019mr8mf4r", "event": "Item Purchased", "writeKey": "wk_web_example"}
    assert (await post(session, f"{daemon.url}/v1/track", event, auth=False))[0] == 200
    archive = tmp_path / "var" / "events.ndjson"
    for _ in range(200):
        done = daemon.stats()["hello"]["delivered"] == 1 and archive.exists()
        if done and archive.read_text():
            break
        await asyncio.sleep(0.05)
    archived = orjson.loads(archive.read_text().splitlines()[0])
    assert archived["event"] == "Item Purchased"
    assert archived["context"] == {"ip": "127.0.0.1"}  # the example's source has fill_ip = true
    (row,) = orjson.loads(daemon.cli("deliveries", "--destination", "hello", "--json").stdout)
    assert row["history"][0]["logs"] == "hello: Item Purchased by 019mr8mf4r\n"
    # The event itself, as stored: to look at, or to run again with run-function --event -.
    assert row["event"]["event"] == "Item Purchased"
    assert row["event"]["messageId"] == row["message_id"]
    assert "writeKey" not in row["event"]
    # Found by its messageId (through the dedupe keys, no scan): one delivery per destination.
    found = orjson.loads(
        daemon.cli("deliveries", "--message-id", row["message_id"], "--json").stdout
    )
    assert sorted(r["destination"] for r in found) == ["archive", "hello"]
    assert orjson.loads(daemon.cli("deliveries", "--message-id", "nope", "--json").stdout) == []
    assert await daemon.terminate() == 0
    # Records pruned for size (storage.records_max_size) leave the attempt without its record:
    # it is still listed, without a made-up duration.
    db = sqlite3.connect(tmp_path / "var" / "destfnd.sqlite3")
    with db:
        assert db.execute("DELETE FROM invocations").rowcount >= 1
    db.close()
    out = daemon.cli("deliveries", "--destination", "hello").stdout
    assert "attempt 1 at " in out and ": delivered" in out
    assert "None" not in out


def test_cli_check_config_accepts_the_systemd_example(tmp_path):
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "web_write_key").write_text("wk_from_credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds"), "PATH": "/usr/bin:/bin"}
    result = run_cli(
        "check-config", "--config", str(REPO / "config" / "destfnd.systemd.toml"), env=env
    )
    assert result.returncode == 0, result.stderr
    assert "wk_from_credential" not in result.stdout + result.stderr


BAD = [
    ("unknown-key", '[server]\nlisten = "127.0.0.1:1"\nlistn = "x"\n', "server.listn",
     "did you mean"),
    ("bad-duration", '[storage]\nretention = "7"\n', "storage.retention", "unit"),
    ("zero-body-timeout", '[server]\nbody_timeout = "0s"\n', "server.body_timeout", "0"),
    ("no-sources", "", "sources", "at least one"),
    ("webhook-no-url", '[[destinations]]\nname = "h"\ntype = "webhook"\n',
     "destinations[0].url", "required"),
    ("unknown-source", '[[destinations]]\nname = "h"\ntype = "webhook"\n'
     'url = "http://127.0.0.1:1/"\nsources = ["nope"]\n', "destinations[0].sources", "nope"),
    ("missing-env", '[[destinations]]\nname = "h"\ntype = "webhook"\nurl = "http://x/"\n'
     'headers = { Authorization = { env = "DESTFND_TEST_UNSET" } }\n',
     "destinations[0].headers.Authorization", "DESTFND_TEST_UNSET"),
    ("bad-toml", "[server\n", "invalid TOML", "line 1"),
    ("function-missing", '[[destinations]]\nname = "f"\nfunction = "nope.py"\n',
     "destinations[0].function", "file not found"),
    ("function-syntax", '[[destinations]]\nname = "f"\nfunction = "bad_syntax.py"\n',
     "destinations[0].function", "bad_syntax.py:2: SyntaxError"),
    ("function-import", '[[destinations]]\nname = "f"\nfunction = "bad_import.py"\n',
     "destinations[0].function", "ModuleNotFoundError: No module named 'no_such_pkg'"),
    ("insert-function-syntax", '[[destinations]]\nname = "f"\nfunction = "needs_key.py"\n'
     'insert_function = "bad_syntax.py"\nsettings = { apiKey = "k" }\n',
     "destinations[0].insert_function: ", "bad_syntax.py:2: SyntaxError"),
    ("function-no-handler", '[[destinations]]\nname = "f"\nfunction = "no_handler.py"\n',
     "destinations[0].function", "defines no handler"),
    ("function-misspelled", '[[destinations]]\nname = "f"\nfunction = "misspelled.py"\n',
     "destinations[0].function", "defines no handler (on_track, "),
    ("function-misspelled-hint", '[[destinations]]\nname = "f"\nfunction = "misspelled.py"\n',
     "destinations[0].function", "; did you mean on_track? (it has onTrack)"),
    ("function-one-argument", '[[destinations]]\nname = "f"\nfunction = "one_arg.py"\n',
     "destinations[0].function",
     "one_arg.py:3: on_track(event) cannot be called as on_track(event, settings)"),
    ("function-batch-arguments", '[[destinations]]\nname = "f"\nfunction = "batch_args.py"\n',
     "destinations[0].function",
     "on_batch(events, settings, mode) cannot be called as on_batch(events, settings)"),
    ("function-settings", '[[destinations]]\nname = "f"\nfunction = "needs_key.py"\n'
     'settings = { apiKey = 5 }\n', "destinations[0].settings.apiKey", "must be string"),
    ("function-required", '[[destinations]]\nname = "f"\nfunction = "needs_key.py"\n',
     "destinations[0].settings.apiKey", "required by SETTINGS in needs_key.py"),
    # As in Segment, where a required setting cannot be saved empty: it passed.
    ("function-required-empty", '[[destinations]]\nname = "f"\nfunction = "needs_key.py"\n'
     'settings = { apiKey = " " }\n', "destinations[0].settings.apiKey",
     "required by SETTINGS in needs_key.py, and empty"),
    ("settings-decl-unknown-field", '[[destinations]]\nname = "f"\nfunction = "bad_decl.py"\n',
     "destinations[0].settings.region",
     "SETTINGS['region'] in bad_decl.py has an unknown field 'requird' (did you mean 'required'?)"),
    ("settings-decl-unknown-type", '[[destinations]]\nname = "f"\nfunction = "bad_decl.py"\n',
     "destinations[0].settings.region", "unknown type 'strin' (did you mean string? use string"),
    ("settings-decl-type-not-a-string",
     '[[destinations]]\nname = "f"\nfunction = "list_type.py"\n',
     "destinations[0].settings.k", "unknown type ['string'] (did you mean string? use string"),
    # Segment's settings editor's word: a hint, as for a key one letter off.
    ("settings-decl-segments-type", '[[destinations]]\nname = "f"\nfunction = "map_type.py"\n',
     "destinations[0].settings.fields",
     "unknown type 'Text Map' (did you mean object? use string, number"),
    ("handler-generator", '[[destinations]]\nname = "f"\nfunction = "gen.py"\n',
     "destinations[0].function",
     "gen.py:1: on_track is a generator (it has yield): a handler returns (or raises)"),
    ("handler-generator-partial", '[[destinations]]\nname = "f"\nfunction = "gen_partial.py"\n',
     "destinations[0].function", "gen_partial.py: on_track is a generator (it has yield)"),
    ("handler-not-callable", '[[destinations]]\nname = "f"\nfunction = "not_callable.py"\n',
     "destinations[0].function", "on_track is not a function (it is int)"),
    ("javascript-function", '[[destinations]]\nname = "f"\nfunction = "crm.js"\n',
     "destinations[0].function", "JavaScript functions are not supported yet"),
    ("webhook-settings", '[[destinations]]\nname = "h"\ntype = "webhook"\n'
     'url = "http://127.0.0.1:1/"\nsettings = { apiKey = "k" }\n', "destinations[0].settings",
     'only used by functions: a destination with type = "webhook" runs none'),
    ("file-path-directory", '[[destinations]]\nname = "a"\ntype = "file"\npath = "."\n',
     "destinations[0].path", "is a directory, not a file"),
    ("storage-path-directory", '[storage]\npath = "."\n', "storage.path",
     "is a directory, not a file"),
    # Past 100 years serve crashed: OverflowError, "Python int too large for SQLite INTEGER".
    ("duration-too-long", '[storage]\nretention = "9999999999999d"\n', "storage.retention",
     "must be at most 36500d (100 years), got '9999999999999d'"),
    ("duration-overflowing", '[[destinations]]\nname = "h"\ntype = "webhook"\n'
     f'url = "http://127.0.0.1:1/"\n[destinations.retry]\nmax_age = "{"9" * 400}s"\n',
     "destinations[0].retry.max_age", "must be at most 36500d (100 years), got '99999"),
    ("trusted-proxies-each", '[server]\ntrusted_proxies = ["bad", 5]\n',
     "server.trusted_proxies[1]", 'must be a string such as "10.0.0.0/8", got 5'),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "where", "phrase"), BAD, ids=[b[0] for b in BAD])
def test_cli_check_config_lists_problems_with_key_paths(tmp_path, case, text, where, phrase):
    files = {
        "bad_syntax.py": "def on_track(event, settings):\n    return event +\n",
        "bad_import.py": "import no_such_pkg\n\ndef on_track(event, settings):\n    pass\n",
        "no_handler.py": "def helper():\n    pass\n",
        "misspelled.py": "def onTrack(event, settings):\n    pass\n",
        "one_arg.py": "X = 1\n\ndef on_track(event):\n    pass\n",
        "batch_args.py": "async def on_batch(events, settings, mode):\n    pass\n",
        "needs_key.py": 'SETTINGS = {"apiKey": {"type": "string", "required": True}}\n'
        "def on_track(event, settings):\n    pass\n",
        "not_callable.py": "on_track = 5\n\ndef on_identify(event, settings):\n    pass\n",
        "bad_decl.py": 'SETTINGS = {"region": {"type": "strin", "requird": True}}\n'
        "def on_track(event, settings):\n    pass\n",
        "list_type.py": 'SETTINGS = {"k": {"type": ["string"]}}\n'
        "def on_track(event, settings):\n    pass\n",
        "map_type.py": 'SETTINGS = {"fields": {"type": "Text Map"}}\n'
        "def on_track(event, settings):\n    pass\n",
        "crm.js": "async function onTrack(event, settings) {}\n",
        "gen.py": "async def on_track(event, settings):\n    yield event\n",
        "gen_partial.py": "import functools\n\ndef gen(event, settings, extra):\n"
        "    yield event\n\non_track = functools.partial(gen, extra=1)\n",
    }
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    source = '[[sources]]\nname = "web"\nwrite_key = "k"\n' if case != "no-sources" else ""
    path = tmp_path / "destfnd.toml"
    path.write_text(text + "\n" + source if case != "bad-toml" else text)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert where in result.stderr and phrase in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_check_config_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[server]\nlisten = "nowhere"\n[storage]\nretention = "soon"\n'
        '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "h"\ntype = "webhook"\nconcurrency = 0\n'
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 3
    for where in ("server.listen", "storage.retention", "destinations[0].url",
                  "destinations[0].concurrency"):  # fmt: skip
        assert where in result.stderr, result.stderr


def test_cli_serve_refuses_a_bad_config_with_the_exit_code_the_unit_does_not_restart(tmp_path):
    """The unit relies on serve's own checks: exit 3 with every problem, which
    RestartPreventExitStatus keeps from a restart loop. An ExecStartPre check would fail the
    start with an exit status systemd does not compare with that list: a restart every 2 s."""
    from destfnd.cli import EXIT_CONFIG, EXIT_STORE

    unit = (REPO / "systemd" / "destfnd.service").read_text()
    lines = [line.strip() for line in unit.splitlines() if not line.lstrip().startswith("#")]
    execs = [line for line in lines if line.startswith("Exec")]
    assert len(execs) == 1 and execs[0].startswith("ExecStart=") and " serve " in execs[0]
    prevent = next(line for line in lines if line.startswith("RestartPreventExitStatus="))
    assert {str(EXIT_CONFIG), str(EXIT_STORE)} <= set(prevent.split("=", 1)[1].split())
    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\nlistn = "x"\n[storage]\nretention = "soon"\n'
        '[[sources]]\nname = "web"\nwrite_key = "k"\n'
    )
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == EXIT_CONFIG, (result.stdout, result.stderr)
    assert "server.listn" in result.stderr and "storage.retention" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file_is_one_clear_line(tmp_path):
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 3
    assert "cannot read config" in result.stderr and "Traceback" not in result.stderr


def test_cli_stats_before_the_daemon_ever_ran_says_so(tmp_path):
    path = tmp_path / "destfnd.toml"
    path.write_text('[[sources]]\nname = "web"\nwrite_key = { env = "NOT_NEEDED_FOR_STATS" }\n')
    result = run_cli("stats", "--json", "--config", str(path))
    assert result.returncode == 4
    assert "no database yet" in result.stderr and "Traceback" not in result.stderr


def test_cli_default_config_path_comes_from_the_environment(tmp_path):
    path = tmp_path / "elsewhere.toml"
    path.write_text('[[sources]]\nname = "web"\nwrite_key = "k"\n')
    import os

    result = run_cli("check-config", env={**os.environ, "DESTFND_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout


def test_cli_stats_json_keyed_by_destination_with_every_status(tmp_path):
    from destfnd.config import load_config
    from destfnd.store import open_db

    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "h"\ntype = "webhook"\nurl = "http://127.0.0.1:1/"\n'
    )
    open_db(load_config(path).storage.path).close()
    result = run_cli("stats", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    statuses = ("pending", "retrying", "delivered", "discarded", "dropped", "expired")
    assert orjson.loads(result.stdout) == {"h": dict.fromkeys(statuses, 0)}


async def test_cli_serve_refuses_a_busy_port_and_a_second_daemon_clearly(make_daemon, tmp_path):

    from support import config_text

    daemon = await make_daemon(config_text(tmp_path / "db.sqlite3", "")).start()
    port = int(daemon.url.rsplit(":", 1)[1])
    second = run_cli("serve", "--config", str(daemon.config))
    assert second.returncode == 1
    assert "another destfnd is already serving this database" in second.stderr
    assert "Traceback" not in second.stderr
    # The same file through a symbolic link is the same database (it was served twice, and
    # every event delivered twice).
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "link.sqlite3").symlink_to(tmp_path / "db.sqlite3")
    linked = tmp_path / "other" / "linked.toml"
    linked.write_text(config_text(tmp_path / "other" / "link.sqlite3", ""))
    third = run_cli("serve", "--config", str(linked))
    assert third.returncode == 1
    assert "another destfnd is already serving this database" in third.stderr
    # And through a hard link (another name of the same file: it would also have had a WAL
    # of its own, and corrupted the file), refused before SQLite opened it.
    os.link(tmp_path / "db.sqlite3", tmp_path / "other" / "hard.sqlite3")
    hard = tmp_path / "other" / "hard.toml"
    hard.write_text(config_text(tmp_path / "other" / "hard.sqlite3", ""))
    through_hard_link = run_cli("serve", "--config", str(hard))
    assert through_hard_link.returncode == 1, through_hard_link.stderr
    assert "another destfnd is already serving this database" in through_hard_link.stderr
    assert not (tmp_path / "other" / "hard.sqlite3-wal").exists()
    # A database whose folder cannot be made: one line, exit 4 (it was a traceback).
    (tmp_path / "a-file").write_text("")
    nowhere = tmp_path / "nowhere.toml"
    nowhere.write_text(config_text(tmp_path / "a-file" / "db.sqlite3", ""))
    fourth = run_cli("serve", "--config", str(nowhere))
    assert fourth.returncode == 4, fourth.stderr
    assert "cannot create the database's lock file" in fourth.stderr
    assert "Traceback" not in fourth.stderr

    busy = tmp_path / "busy.toml"
    busy.write_text(
        daemon.config.read_text()
        .replace("127.0.0.1:0", f"127.0.0.1:{port}")
        .replace("db.sqlite3", "other.sqlite3")
    )
    result = run_cli("serve", "--config", str(busy))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await daemon.terminate() == 0


def test_cli_check_config_tries_the_listen_address(tmp_path):
    """check-config binds the listen address as serve would, and lets it go: an address of
    no interface here, or a name that does not resolve, is a problem (serve would exit 1);
    a port in use is a warning, since the daemon checked may be the one using it."""
    config = tmp_path / "destfnd.toml"

    def check(listen: str) -> subprocess.CompletedProcess:
        config.write_text(
            f'[server]\nlisten = "{listen}"\n[storage]\npath = "db.sqlite3"\n'
            '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        )
        return run_cli("check-config", "--config", str(config))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = check(f"127.0.0.1:{port}")
        assert not list(tmp_path.glob("db.sqlite3*"))  # check-config creates nothing
        # What it says is what serve says (serve's test above checks that it cannot start).
        serve = run_cli("serve", "--config", str(config))
    assert in_use.returncode == 0, in_use.stderr
    assert in_use.stderr == (
        f"warning: server.listen: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another process listens there now: a destfnd already running?)\n"
    )
    assert serve.returncode == 1
    assert serve.stderr.endswith(in_use.stderr.removeprefix("warning: server.listen: "))
    # Nothing was left bound: the same port is free for serve once the other process is gone.
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))
    free = check(f"127.0.0.1:{port}")
    assert free.returncode == 0 and free.stderr == "", free.stderr

    elsewhere = check("192.0.2.1:8088")  # TEST-NET-1: on no interface here
    assert elsewhere.returncode == 3, elsewhere.stderr
    assert (
        "  server.listen: cannot listen on 192.0.2.1:8088: Cannot assign requested address "
        "(no network interface of this machine has that address)\n"
    ) in elsewhere.stderr

    try:
        socket.getaddrinfo("destfnd-no-such-host.invalid", 8088)
    except socket.gaierror as exc:
        expected = exc.strerror
        temporary = exc.errno == socket.EAI_AGAIN
    else:
        pytest.skip("this host's resolver answers for .invalid names")
    unresolved = check("destfnd-no-such-host.invalid:8088")
    assert unresolved.returncode == (0 if temporary else 3), unresolved.stderr
    assert (
        "server.listen: cannot listen on destfnd-no-such-host.invalid:8088: cannot resolve "
        f"'destfnd-no-such-host.invalid': {expected}\n"
    ) in unresolved.stderr


def test_cli_config_path_may_be_given_without_the_flag(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[sources]]\nname = "web"\nwrite_key = "k"\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout
    both = run_cli("check-config", str(path), "--config", str(tmp_path / "other.toml"))
    assert both.returncode == 2 and "two config files given" in both.stderr  # usage
    # Without any, the default is read from the working directory: the error says how to
    # give one.
    env = {k: v for k, v in os.environ.items() if k != "DESTFND_CONFIG"}
    none = subprocess.run([sys.executable, "-m", "destfnd", "stats"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert none.returncode == 3
    assert "give --config PATH or set DESTFND_CONFIG" in none.stderr


def test_cli_output_into_a_closed_pipe_exits_quietly(tmp_path):
    """`destfnd deliveries | head -1`: the reader stops early. No BrokenPipeError traceback,
    whether the failing write comes while printing (a long listing), at the final flush (a
    short one, still buffered) or from argparse (--version); exit 141 as a program SIGPIPE
    stopped. The pipe's reading end is closed before the command starts, so every write fails:
    the test does not depend on timing."""
    import subprocess
    import sys

    from destfnd.config import load_config
    from destfnd.store import Dedupe, IncomingEvent, open_db
    from destfnd.store import queue as q

    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "h"\ntype = "webhook"\nurl = "http://127.0.0.1:1/"\n'
    )
    conn = open_db(load_config(path).storage.path)
    events = [IncomingEvent(f"m{i}", orjson.dumps({"type": "track", "messageId": f"m{i}"}))
              for i in range(2_000)]  # fmt: skip
    conn.execute("BEGIN IMMEDIATE")
    q.insert_events(conn, Dedupe.load(conn), "web", events, ("h",), 1, 0)
    conn.execute("COMMIT")
    conn.close()
    # Block-buffered stdout, as on a machine without PYTHONUNBUFFERED.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    config = ("--config", str(path))
    for args in (("deliveries", "--limit", "2000", *config), ("stats", *config), ("--version",)):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "destfnd", *args],
                stdout=write_end,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert (result.returncode, result.stderr.decode()) == (141, ""), args


def test_cli_version_and_bad_limit():
    from destfnd import __version__

    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"destfnd {__version__}\n")
    for limit in ("0", "-1", "ten", "10001"):  # 200,000 took 530 MB: all held in memory
        result = run_cli("deliveries", "--limit", limit)
        assert result.returncode == 2
        assert f"--limit: must be a whole number from 1 to 10000, got '{limit}'" in result.stderr
    # An unknown option is told with its command's usage, not the top level's.
    for command in ("stats", "run-function"):
        result = run_cli(command, "x.py", "--bogus")
        assert result.returncode == 2
        assert result.stderr.startswith(f"usage: destfnd {command} "), result.stderr
        assert f"destfnd {command}: error: unrecognized arguments: --bogus" in result.stderr


def _check_crm(tmp_path, code: str, destination: str = "") -> subprocess.CompletedProcess:
    """check-config of a config whose one destination runs `code` as crm.py."""
    (tmp_path / "crm.py").write_text(code)
    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
        f'[[destinations]]\nname = "crm"\nfunction = "crm.py"\n{destination}'
    )
    return run_cli("check-config", "--config", str(path))


def test_cli_check_config_checks_a_file_destinations_path_without_creating_it(tmp_path):
    """serve opens (and creates) a file destination's path at start and exits 3 if it cannot;
    check-config says so beforehand, creating nothing. A FIFO is refused rather than opened:
    opening one with no reader held serve for good, SIGTERM included; so is a terminal, whose
    writes can block as long."""
    (tmp_path / "a-file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    (tmp_path / "to-nowhere").symlink_to(tmp_path / "gone" / "out.ndjson")
    (tmp_path / "to-new").symlink_to(tmp_path / "new-target.ndjson")
    (tmp_path / "dir-link").symlink_to(tmp_path / "gone")
    t = tmp_path
    cases = [
        # (path, enabled, problem or None)
        ("new/deeper/out.ndjson", True, None),
        ("to-new", True, None),
        ("a-file/out.ndjson", True, f"{t}/a-file/out.ndjson: cannot create it: {t}/a-file is "
         "not a folder"),
        ("a-file/x/out.ndjson", False, f"{t}/a-file/x/out.ndjson: cannot create it: {t}/a-file "
         "is not a folder"),
        ("fifo", True, f"{t}/fifo: is a FIFO; a file destination needs a regular file"),
        ("sock", True, f"{t}/sock: is a socket; a file destination needs a regular file"),
        ("/dev/null", True, None),
        ("/dev/tty", True, "/dev/tty: is a device other than /dev/null and the like; a file "
         "destination needs a regular file"),
        ("to-nowhere", True, f"{t}/to-nowhere: cannot create it: it links to "
         f"{t}/gone/out.ndjson, in no folder"),
        ("dir-link/out.ndjson", True, f"{t}/dir-link/out.ndjson: cannot create it: {t}/dir-link "
         "is not a folder"),
    ]  # fmt: skip
    try:
        for path, enabled, problem in cases:
            config = tmp_path / "destfnd.toml"
            config.write_text(
                '[server]\nlisten = "127.0.0.1:0"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
                f'[[destinations]]\nname = "archive"\ntype = "file"\npath = "{path}"\n'
                f"enabled = {'true' if enabled else 'false'}\n"
            )
            result = run_cli("check-config", "--config", str(config))
            if problem is None:
                assert result.returncode == 0, (path, result.stderr)
                assert result.stderr == ""
            elif enabled:
                assert result.returncode == 3, (path, result.stderr)
                expected = f"  destinations[0].path: {problem}\n"
                assert expected in result.stderr, (path, result.stderr)
                served = subprocess.run(
                    [sys.executable, "-m", "destfnd", "serve", "--config", str(config)],
                    capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                assert served.returncode == 3, (path, served.stderr)
                assert "  destinations[0].path: " in served.stderr, (path, served.stderr)
            else:
                assert result.returncode == 0, (path, result.stderr)
                assert result.stderr == (
                    f"warning: destinations[0].path: {problem} (the destination is disabled: "
                    "serve does not start it)\n"
                )
    finally:
        listener.close()
    # Nothing created.
    assert not (tmp_path / "new").exists() and not (tmp_path / "new-target.ndjson").exists()


def test_cli_check_config_as_root_runs_function_files_as_nobody():
    """The README has the operator run `sudo destfnd check-config` (to read the credentials):
    a function file's module code then runs as nobody, as under the unit's dynamic user, not
    as root; and a module that user cannot read is a warning saying why (serve's user may)."""
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    base = Path(tempfile.mkdtemp(prefix="destfnd-nobody-"))  # not under pytest's 0700 folder
    try:
        base.chmod(0o777)
        marker = base / "uid"
        (base / "fn.py").write_text(
            f"import os\nopen({str(marker)!r}, 'w').write(str(os.geteuid()))\n"
            "def on_track(event, settings):\n    pass\n"
        )
        config = base / "destfnd.toml"
        config.write_text(
            f'[storage]\npath = "{base}/db.sqlite3"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
            '[[destinations]]\nname = "fn"\nfunction = "fn.py"\n'
        )
        result = run_cli("check-config", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert marker.read_text() == str(pwd.getpwnam("nobody").pw_uid)
        # A module beside it that nobody may not read: the problem says what to look at.
        (base / "fn.py").write_text("import helper\ndef on_track(event, settings):\n    pass\n")
        (base / "helper.py").write_text("X = 1\n")
        (base / "helper.py").chmod(0o600)
        result = run_cli("check-config", "--config", str(config))
        assert result.returncode == 0, result.stderr  # serve's user may read it: a warning
        assert "warning: destinations[0].function:" in result.stderr, result.stderr
        assert "PermissionError" in result.stderr, result.stderr
        assert "loads function files as user nobody" in result.stderr
        # A function that is wrong whoever loads it is still a problem: an error of its
        # own, or a module that root cannot find either.
        for code, error in (("raise RuntimeError('broken')\n", "RuntimeError: broken"),
                            ("import no_such_module_here\n", "No module named"),
                            ("import json.no_such_part\n", "No module named")):  # fmt: skip
            (base / "fn.py").write_text(code)
            result = run_cli("check-config", "--config", str(config))
            assert result.returncode == 3, result.stderr
            assert error in result.stderr and "user nobody" not in result.stderr
        # Telling the two apart runs nothing as root: a module the function names is looked
        # for, never imported (setuptools' import hook imported a `setuptools` beside it).
        ran = base / "ran-as-root"
        (base / "setuptools").mkdir()
        (base / "setuptools" / "__init__.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
        (base / "setuptools" / "_distutils").mkdir()
        (base / "setuptools" / "_distutils" / "__init__.py").write_text("")
        (base / "fn.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'distutils'\")\n"
            "def on_track(event, settings):\n    pass\n"
        )
        result = run_cli("check-config", "--config", str(config))
        assert not ran.exists(), result.stderr
    finally:
        shutil.rmtree(base)


def test_cli_run_as_root_on_the_daemons_database_leaves_its_lock_to_the_daemons_user():
    """`sudo destfnd discard` on a database the daemon's user owns: the lock file it takes
    is that user's (a root-owned one kept the daemon from starting again, exit 4), and a
    symbolic link put at the lock's name (by that user, or a function running as it) is not
    followed (root created an empty file where it led)."""
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    from destfnd.store import open_db

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="destfnd-lock-"))
    try:
        state = base / "state"
        state.mkdir()
        open_db(state / "db.sqlite3").close()
        for item in (state, *state.iterdir()):
            os.chown(item, nobody.pw_uid, nobody.pw_gid)
        config = base / "destfnd.toml"
        config.write_text(
            f'[storage]\npath = "{state}/db.sqlite3"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
        )
        result = run_cli("discard", "--config", str(config), "--destination", "gone")
        assert result.returncode == 0, result.stderr
        lock = state / "db.sqlite3.lock"
        assert (lock.stat().st_uid, lock.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
        lock.unlink()
        # A hard link to root's file at the lock's name: used as the lock, not given away.
        victim = base / "roots-file"
        victim.write_text("root's")
        victim.chmod(0o600)
        os.link(victim, lock)
        result = run_cli("discard", "--config", str(config), "--destination", "gone")
        assert result.returncode == 0, result.stderr
        assert (victim.stat().st_uid, victim.stat().st_mode & 0o777) == (0, 0o600)
        lock.unlink()
        target = base / "made-by-root"
        lock.symlink_to(target)
        result = run_cli("discard", "--config", str(config), "--destination", "gone")
        assert result.returncode == 0, result.stderr  # as with a daemon running: not stale
        assert not target.exists()
        # What serve says of it (exit 4).
        from destfnd.store import StoreError
        from destfnd.store.lock import DatabaseLock

        with pytest.raises(StoreError, match=r"db\.sqlite3\.lock is a symbolic link"):
            DatabaseLock(state / "db.sqlite3")
        assert not target.exists()
    finally:
        shutil.rmtree(base)


def _unprivileged() -> list[str]:
    """argv that runs destfnd as this user, or as nobody when the tests run as root (who may
    read and write anywhere); skips the test if it cannot."""
    argv = [sys.executable, "-m", "destfnd"]
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, without setpriv to run destfnd as nobody")
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*setpriv, sys.executable, "-c", "import destfnd"], capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if probe.returncode != 0:  # an interpreter under root's home (pyenv's shared libpython)
        pytest.skip(f"this Python cannot run as nobody: {probe.stderr.strip()[:200]}")
    return [*setpriv, *argv]


def test_cli_a_database_this_user_may_not_write_beside_says_so():
    """SQLite's "attempt to write a readonly database" did not say that it is this user's
    permissions, nor on what: stats on a database whose folder it may not write (SQLite's
    -wal and -shm files go there) names the folder and the user."""
    argv = _unprivileged()
    from destfnd.store import open_db

    base = Path(tempfile.mkdtemp(prefix="destfnd-perm-"))  # not under pytest's private folder
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        open_db(state / "db.sqlite3").close()
        (state / "db.sqlite3").chmod(0o644)
        state.chmod(0o755 if os.geteuid() == 0 else 0o555)  # (root writes it anyway)
        config = base / "destfnd.toml"
        config.write_text(
            f'[storage]\npath = "{state}/db.sqlite3"\n[[sources]]\nname = "web"\nwrite_key = "k"\n'
        )
        config.chmod(0o644)
        stats = subprocess.run(
            [*argv, "stats", "--config", str(config)], capture_output=True, text=True,
            timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        (base / "state").chmod(0o755)
        shutil.rmtree(base)
    assert stats.returncode == 4, stats.stderr
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert stats.stderr.startswith(f"destfnd: {state}/db.sqlite3: cannot open the database: "), (
        stats.stderr
    )
    assert stats.stderr.rstrip().endswith(
        f"({state} is not writable by this user (uid {uid}); SQLite makes the database's -wal "
        "and -shm files there)"
    ), stats.stderr


def test_cli_check_config_findings_that_depend_on_permissions_are_warnings():
    """check-config may run as another user than serve (root, for a service with a dynamic
    user): what it cannot write is a warning, saying so, not a problem. Run as nobody when
    the tests run as root (which may write anywhere)."""
    argv = [*_unprivileged(), "check-config", "--config"]
    base = Path(tempfile.mkdtemp(prefix="destfnd-perm-"))  # not under pytest's private folder
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        config = base / "destfnd.toml"
        config.write_text(
            '[server]\nlisten = "127.0.0.1:1"\n'  # a port only root may bind, as a rule
            f'[storage]\npath = "{locked}/db/destfnd.sqlite3"\n'
            '[[sources]]\nname = "web"\nwrite_key = "k"\n'
            f'[[destinations]]\nname = "archive"\ntype = "file"\npath = "{locked}/out.ndjson"\n'
        )
        config.chmod(0o644)
        result = subprocess.run(
            [*argv, str(config)], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        # A database this user cannot even look for: stats says so (it said "cannot write
        # the output", exit 1).
        private = base / "private"
        private.mkdir(mode=0o700)
        if os.geteuid() != 0:
            private.chmod(0o000)
        config.write_text(
            f'[storage]\npath = "{private}/destfnd.sqlite3"\n'
            '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        )
        stats = subprocess.run(
            [*argv[: argv.index("check-config")], "stats", "--config", str(config)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        if (base / "private").exists():
            (base / "private").chmod(0o700)
        shutil.rmtree(base)
    assert stats.returncode == 4, stats.stderr
    assert stats.stderr == (
        f"destfnd: {private}/destfnd.sqlite3: cannot read the database: Permission denied\n"
    )
    assert result.returncode == 0, result.stderr
    note = "(for the user running check-config; serve's user may differ)"
    expected = [
        f"warning: storage.path: {locked}/db/destfnd.sqlite3: cannot create it: no permission "
        f"to write in {locked} {note}",
        f"warning: destinations[0].path: {locked}/out.ndjson: cannot create it: no permission "
        f"to write in {locked} {note}",
    ]
    low_ports = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if not low_ports.exists() or int(low_ports.read_text()) > 1:  # port 1 needs privilege
        expected.insert(
            0,
            "warning: server.listen: cannot listen on 127.0.0.1:1: Permission denied "
            f"(a port below 1024 needs root or CAP_NET_BIND_SERVICE) {note}",
        )
    assert result.stderr.splitlines() == expected


def test_cli_check_config_checks_the_database_path_without_creating_it(tmp_path):
    """serve cannot open its database under a file, or on a FIFO (where it hung in open(),
    SIGTERM included): check-config says so first, and serve exits 4 at once."""
    (tmp_path / "a-file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "locked.sqlite3").write_text("")
    os.mkfifo(tmp_path / "locked.sqlite3.lock")
    os.mkfifo(tmp_path / "new.sqlite3.lock")  # and no database yet
    (tmp_path / "wal.sqlite3").write_text("")
    os.mkfifo(tmp_path / "wal.sqlite3-wal")
    (tmp_path / "to-nowhere").symlink_to(tmp_path / "gone")
    (tmp_path / "linked.sqlite3").write_text("")
    (tmp_path / "linked.sqlite3-wal").symlink_to(tmp_path / "gone")  # SQLite would not follow
    (tmp_path / "lockln.sqlite3").write_text("")
    (tmp_path / "lockln.sqlite3.lock").symlink_to(tmp_path / "a-file")  # nor destfnd's lock
    t = tmp_path
    cases = [
        ("new/db.sqlite3", None, None),
        ("a-file/db.sqlite3", f"{t}/a-file/db.sqlite3: cannot create it: {t}/a-file is not a "
         "folder", f"cannot create the database's lock file: {t}/a-file is not a folder"),
        ("fifo", f"{t}/fifo: not a regular file", "cannot open the database: not a regular file"),
        ("locked.sqlite3", f"{t}/locked.sqlite3: {t}/locked.sqlite3.lock is not a regular file",
         "cannot create the database's lock file: not a regular file"),
        ("new.sqlite3", f"{t}/new.sqlite3: {t}/new.sqlite3.lock is not a regular file",
         "cannot create the database's lock file: not a regular file"),
        ("wal.sqlite3", f"{t}/wal.sqlite3: {t}/wal.sqlite3-wal is not a regular file",
         f"cannot open the database: {t}/wal.sqlite3-wal is not a regular file"),
        ("to-nowhere/db.sqlite3", f"{t}/to-nowhere/db.sqlite3: cannot create it: {t}/to-nowhere "
         "is not a folder", f"cannot create the database's lock file: {t}/to-nowhere is not a "
         "folder"),
        ("linked.sqlite3", f"{t}/linked.sqlite3: {t}/linked.sqlite3-wal is a symbolic link "
         "(remove it)", f"cannot open the database: {t}/linked.sqlite3-wal is not a regular file"),
        ("lockln.sqlite3", f"{t}/lockln.sqlite3: {t}/lockln.sqlite3.lock is a symbolic link "
         "(remove it)", f"cannot create the database's lock file: {t}/lockln.sqlite3.lock is a "
         "symbolic link (remove it)"),
    ]  # fmt: skip
    for path, problem, served in cases:
        config = tmp_path / "destfnd.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\n[storage]\npath = "{path}"\n'
            '[[sources]]\nname = "web"\nwrite_key = "k"\n'
            '[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:9/"\n'
        )
        result = run_cli("check-config", "--config", str(config))
        if problem is None:
            assert result.returncode == 0, (path, result.stderr)
            continue
        assert result.returncode == 3, (path, result.stderr)
        assert f"  storage.path: {problem}\n" in result.stderr, (path, result.stderr)
        serve = run_cli("serve", "--config", str(config))
        assert serve.returncode == 4, (path, serve.stderr)
        assert served in serve.stderr, (path, serve.stderr)
    assert not (tmp_path / "new").exists()  # nothing created


def test_cli_check_config_a_functions_text_cannot_pass_for_another_warning(tmp_path):
    result = _check_crm(
        tmp_path,
        'raise RuntimeError("boom\\nwarning: destinations[5].path: forged")\n',
        "enabled = false\n",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("warning: ")] == [lines[0]], lines
    assert lines[0].startswith("warning: destinations[0].function: ") and "boom" in lines[0]
    assert lines[1] == (
        "      warning: destinations[5].path: forged (the destination is disabled: serve does "
        "not start it)"
    )


def test_cli_check_config_warns_of_a_misspelled_handler(tmp_path):
    """A file with real handlers and one misspelled: it loads (a missing handler is allowed:
    Unsupported Event Type), but check-config points the misspelling out."""
    result = _check_crm(
        tmp_path,
        "from destfnd.functions import fetch\n\n"  # imported names are not the user's
        "def on_track(event, settings, *extra):\n    pass\n\n"
        "def on_identfy(event, settings):\n    pass\n\n"
        "def on_start():\n    pass\n\n"
        "def on_tracked(event):\n    pass\n\n"  # a helper, not a misspelling
        "class OnTrack:\n    pass\n\n"
        "import functools\n\n"
        "def with_client(f):\n"
        "    @functools.wraps(f)\n"
        "    def wrapper(event, settings):\n"
        "        return f(event, settings, 'client')\n"
        "    return wrapper\n\n"
        "@with_client\n"  # called as (event, settings), whatever f takes
        "def on_page(event, settings, client):\n    pass\n",
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: destinations[0].function: did you mean on_identify? (it has on_identfy)"
    ]


def test_cli_stats_table_marks_disabled_and_removed_destinations(tmp_path):
    from destfnd.config import load_config
    from destfnd.store import Dedupe, IncomingEvent, open_db
    from destfnd.store import queue as q

    path = tmp_path / "destfnd.toml"
    path.write_text(
        '[[sources]]\nname = "web"\nwrite_key = "k"\n'
        '[[destinations]]\nname = "h"\ntype = "webhook"\nurl = "http://127.0.0.1:1/"\n'
        '[[destinations]]\nname = "off"\ntype = "webhook"\nurl = "http://127.0.0.1:1/"\n'
        "enabled = false\n"
    )
    conn = open_db(load_config(path).storage.path)
    conn.execute("BEGIN IMMEDIATE")
    event = [IncomingEvent("m1", orjson.dumps({"type": "track", "messageId": "m1"}))]
    q.insert_events(conn, Dedupe.load(conn), "web", event, ("h", "gone"), 1, 0)
    conn.execute("COMMIT")
    conn.close()
    result = run_cli("stats", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[-3:] == ["in", "flight", "behind"]
    rows = {line.rsplit(None, 8)[0]: line.split()[-8] for line in lines[1:]}
    assert rows == {"h": "1", "off (disabled)": "0", "gone (not in config)": "1"}  # pending
    # How long the earliest waiting delivery has been due: since 1970 here (next_at 1 ms).
    behind = {line.rsplit(None, 8)[0]: line.split()[-1] for line in lines[1:]}
    assert behind["off (disabled)"] == "-"
    assert re.fullmatch(r"2\d{4}d\d\dh", behind["h"]), behind
    assert behind["gone (not in config)"] == behind["h"]


async def test_cli_deliveries_escapes_control_characters(make_daemon, tmp_path, session):
    """A sender's messageId and a remote server's answer end up in `deliveries`: printed,
    they must not recolour the terminal or forge lines of the output."""
    from support import Reply, Sink, config_text, post, webhook

    forged = "\n2026-01-01T00:00:00.000Z  hook  delivered  attempts=1  track  forged"
    async with Sink(lambda n, r: Reply(400, body="\x1b[2Jwiped" + forged)) as sink:
        daemon = await make_daemon(config_text(tmp_path / "db", webhook("hook", sink.url))).start()
        event = {"userId": "u1", "event": "e",
                 "messageId": "ansi-\x1b[31mRED\x1b[0m\u202edesrever" + forged}  # fmt: skip
        assert (await post(session, f"{daemon.url}/v1/track", event))[0] == 200
        for _ in range(200):
            if daemon.stats()["hook"]["discarded"] == 1:
                break
            await asyncio.sleep(0.05)
    result = daemon.cli("deliveries")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b" not in out
    assert "\u202e" not in out  # a right-to-left override, shown rather than obeyed
    assert "ansi-\\x1b[31mRED\\x1b[0m\\u202edesrever\\n2026-01-01" in out
    assert "response body: \\x1b[2Jwiped\\n2026-01-01" in out
    assert [line for line in out.splitlines() if line.startswith("2026-01-01")] == []
    # --json is JSON: the values as they are.
    (row,) = orjson.loads(daemon.cli("deliveries", "--json").stdout)
    assert row["message_id"] == event["messageId"]


def test_cli_check_config_warns_of_settings_no_settings_declares(tmp_path):
    result = _check_crm(
        tmp_path,
        'SETTINGS = {"region": {"type": "string"}}\n\ndef on_track(event, settings):\n    pass\n',
        'settings = { regoin = "eu" }\n',
    )
    assert result.returncode == 0, result.stderr  # a warning: the function may read it anyway
    assert (
        "warning: destinations[0].settings.regoin: not declared in the SETTINGS of crm.py "
        "(did you mean 'region'? the function gets it all the same)"
    ) in result.stderr


def test_settings_a_key_an_insert_function_without_settings_reads_is_said_to_be_its_own():
    """The warning named the SETTINGS it is missing from as if there were only those."""
    import types

    from destfnd.sandbox.runtime import check_settings

    function = types.ModuleType("crm")
    function.SETTINGS = {"apiKey": {"type": "string", "secret": True}}  # type: ignore[attr-defined]
    insert = types.ModuleType("enrich")
    settings = {"apiKey": "k", "internalDomains": ["example.com"]}
    problems, secrets, warnings, _ = check_settings(
        [("/f/crm.py", function), ("/f/enrich.py", insert)], settings
    )
    assert (problems, secrets) == ([], ["apiKey"])
    assert warnings == [
        "settings.internalDomains: not declared in the SETTINGS of crm.py; enrich.py declares "
        "none (the function gets it all the same)"
    ]


def test_cli_a_disabled_destination_may_lack_its_function_file_and_secrets(tmp_path):
    """A destination disabled because its function or its secret is not there yet: serve does
    not start it, so check-config warns (exit 0) and serve starts; stats and deliveries, which
    run no function, do not look for it. All three exited 3."""
    config = tmp_path / "destfnd.toml"
    config.write_text(
        config_text(tmp_path / "db.sqlite3", "")
        + '[[destinations]]\nname = "old"\nenabled = false\nfunction = "gone.py"\n'
        'settings = { apiKey = { env = "DESTFND_TEST_UNSET" } }\n'
        '[[destinations]]\nname = "archive"\ntype = "file"\npath = "out.ndjson"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "DESTFND_TEST_UNSET"}
    check = run_cli("check-config", "--config", str(config), env=env)
    assert check.returncode == 0, check.stderr
    note = "(the destination is disabled: serve does not start it)"
    assert check.stderr.splitlines() == [
        f"warning: destinations[0].function: file not found: {tmp_path}/gone.py {note}",
        "warning: destinations[0].settings.apiKey: environment variable DESTFND_TEST_UNSET "
        f"is not set {note}",
    ]
    stats = run_cli("stats", "--config", str(config), env=env)
    assert (stats.returncode, stats.stderr) == (
        4,
        f"destfnd: {tmp_path}/db.sqlite3: no database yet (has the daemon ever started?)\n",
    )
    # Enabled, the same config is refused (exit 3), as serve would refuse it.
    config.write_text(config.read_text().replace("enabled = false\n", ""))
    refused = run_cli("check-config", "--config", str(config), env=env)
    assert refused.returncode == 3
    assert f"  destinations[0].function: file not found: {tmp_path}/gone.py\n" in refused.stderr


def test_cli_serve_on_a_database_another_process_locks_exits_1(tmp_path):
    """A lock held past the busy timeout (a maintenance script, a sqlite3 shell) is passing:
    exit 1, which the unit restarts, not 4 ("cannot be opened"), which leaves it down."""
    db = tmp_path / "db.sqlite3"
    config = tmp_path / "destfnd.toml"
    config.write_text(config_text(db, ""))
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("CREATE TABLE held (x)")
        holder.execute("BEGIN EXCLUSIVE")
        result = run_cli("serve", "--config", str(config))
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(
        f"destfnd: {db}: cannot open the database: database is locked (another process holds "
        "a lock on it; trying again later may succeed)\n"
    ), result.stderr


def test_cli_check_config_warns_of_a_retention_shorter_than_the_dedupe_window(tmp_path):
    config = tmp_path / "destfnd.toml"
    config.write_text(config_text(tmp_path / "db.sqlite3", "").replace(
        "[storage]\n", '[storage]\nretention = "90m"\n'
    ))  # fmt: skip
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "warning: storage.retention: 90m is shorter than server.dedupe_window (1d): a copy sent "
        "more than 90m after its event was delivered is delivered again\n"
    )
    config.write_text(config.read_text().replace('"90m"', '"1d"'))
    assert run_cli("check-config", "--config", str(config)).stderr == ""


async def test_cli_retry_makes_retrying_deliveries_due_now(make_daemon, tmp_path, session):
    """After fixing the endpoint, a delivery waiting out its backoff (up to backoff_max, an
    hour by default) can be retried now; attempts are kept. There was no way but to wait."""
    from support import Reply, Sink, post, webhook

    async with Sink(lambda n, r: Reply(500 if n < 2 else 200)) as sink:
        slow = {"backoff_initial": "10m", "backoff_max": "1h"}
        config = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url, retry=slow))
        daemon = await make_daemon(config).start()
        for i in range(2):
            event = {"userId": "u", "event": "E", "messageId": f"m-{i}"}
            assert (await post(session, f"{daemon.url}/v1/track", event))[0] == 200
        await sink.wait_for(lambda: len(sink.requests) == 2)
        one = daemon.cli("retry", "--message-id", "m-0")
        assert (one.returncode, one.stdout) == (0, "1 retrying delivery is due now\n"), one.stderr
        await sink.wait_for(lambda: len(sink.requests) == 3)
        rest = daemon.cli("retry", "--destination", "hook", "--json")
        assert orjson.loads(rest.stdout) == {"due_now": 1}, rest.stderr
        await sink.wait_for(lambda: len(sink.requests) == 4)
        for _ in range(100):
            if daemon.stats()["hook"]["delivered"] == 2:
                break
            await asyncio.sleep(0.05)
        assert daemon.stats()["hook"]["delivered"] == 2
        nothing = daemon.cli("retry")
        assert nothing.stdout == (
            "no retrying delivery matched: nothing to do (those due already are left as they are)\n"
        )
        # A name not in the config is said to be so (a typo looked like "nothing to do").
        typo = daemon.cli("retry", "--destination", "hok")
        assert typo.stdout.endswith(f"\nnote: no destination 'hok' in {daemon.config}\n")
        rows = orjson.loads(daemon.cli("deliveries", "--json").stdout)
        assert sorted(r["attempts"] for r in rows) == [2, 2]  # attempts kept, and counted
        assert await daemon.terminate() == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["deliveries", "--message-id", "caf\udce9"],
        ["retry", "--message-id", "caf\udce9"],
        ["deliveries", "--destination", "caf\udce9"],
        ["discard", "--destination", "caf\udce9"],
        ["move", "--from", "caf\udce9", "--to", "hook"],
    ],
)
def test_cli_a_name_or_id_in_bytes_that_are_not_utf8_is_a_usage_error(tmp_path, argv):
    """From a terminal in another encoding: SQLite's UnicodeEncodeError came as a traceback."""
    from support import webhook

    config = tmp_path / "destfnd.toml"
    config.write_text(config_text(tmp_path / "db.sqlite3", webhook("hook", "http://127.0.0.1:9")))
    result = run_cli(*argv, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.endswith(f"error: {argv[1]} 'caf\\xe9': not UTF-8 text\n")


async def _sent_and_discarded(daemon, session, sink, message_ids: list[str]) -> None:
    """Track events posted to `daemon`, whose webhook `hook` answers 404 (at `sink`): once
    each is discarded."""
    from support import post

    for message_id in message_ids:
        event = {"userId": "u", "event": "E", "messageId": message_id}
        assert (await post(session, f"{daemon.url}/v1/track", event))[0] == 200
    await sink.wait_for(lambda: len(sink.requests) == len(message_ids))
    for _ in range(100):  # 5 s at most
        if daemon.stats()["hook"]["discarded"] == len(message_ids):
            return
        await asyncio.sleep(0.05)


async def test_cli_retry_gives_finished_deliveries_one_more_attempt(make_daemon, tmp_path, session):
    """After fixing what discarded them (a 404 from a wrong path, a function's bug), the
    discarded deliveries are sent once more; one that fails again is finished again."""
    from support import Reply, Sink, webhook

    fixed = {"ok": False}
    async with Sink(lambda n, r: Reply(200 if fixed["ok"] else 404)) as sink:
        config = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        daemon = await make_daemon(config).start()
        await _sent_and_discarded(daemon, session, sink, ["m-0", "m-1", "m-2"])
        none = daemon.cli("retry", "--status", "expired")
        assert none.stdout == "no expired delivery matched: nothing to do\n"
        one = daemon.cli("retry", "--status", "discarded", "--message-id", "m-0")
        assert one.stdout == "1 discarded delivery is due now again: one more attempt each\n"
        await sink.wait_for(lambda: len(sink.requests) == 4)  # still 404: discarded again
        fixed["ok"] = True
        rest = daemon.cli("retry", "--status", "discarded", "--json")
        assert orjson.loads(rest.stdout) == {"due_now": 3}, rest.stderr
        for _ in range(100):
            if daemon.stats()["hook"]["delivered"] == 3:
                break
            await asyncio.sleep(0.05)
        stats = daemon.stats()["hook"]
        assert (stats["delivered"], stats["discarded"]) == (3, 0)
        rows = orjson.loads(daemon.cli("deliveries", "--json").stdout)
        attempts = {r["message_id"]: [a["status"] for a in r["history"]] for r in rows}
        assert attempts["m-0"] == ["discarded", "discarded", "delivered"]
        assert attempts["m-1"] == ["discarded", "delivered"]
        assert await daemon.terminate() == 0


async def test_cli_retry_by_message_id_finds_an_event_older_than_the_dedupe_window(
    make_daemon, tmp_path, session
):
    """Events are kept for `retention` (7 days), their dedupe keys for `dedupe_window` (a
    day): past the window, `retry --message-id` matched nothing ("nothing to do") while
    `deliveries --message-id` listed the delivery. It is found by a scan, as there."""
    from support import Reply, Sink, webhook

    async with Sink(lambda n, r: Reply(404)) as sink:
        config = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        daemon = await make_daemon(config).start()
        await _sent_and_discarded(daemon, session, sink, ["old-0", "old-1"])
        assert await daemon.terminate() == 0
    # What the daemon's sweep leaves once the window has passed: no keys, all flushed.
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    with db:
        db.execute("DELETE FROM message_ids")
        db.execute("UPDATE dedupe_state SET flushed_through = (SELECT max(id) FROM events)")
    db.close()
    listed = orjson.loads(daemon.cli("deliveries", "--message-id", "old-0", "--json").stdout)
    assert [r["message_id"] for r in listed] == ["old-0"]
    again = daemon.cli("retry", "--status", "discarded", "--message-id", "old-0", "--json")
    assert orjson.loads(again.stdout) == {"due_now": 1}, again.stderr
    assert daemon.stats()["hook"]["discarded"] == 1
    none = daemon.cli("retry", "--status", "discarded", "--message-id", "never-sent", "--json")
    assert orjson.loads(none.stdout) == {"due_now": 0}


def test_cli_check_config_warns_of_batches_too_big_for_a_workers_memory(tmp_path):
    """1,300 events of up to 32 KB (39 MB of them) failed every attempt in a worker at the
    default memory_limit, the worker exiting as it parsed the batch; nothing warned."""
    (tmp_path / "fn.py").write_text("def on_batch(events, settings):\n    pass\n")
    config = tmp_path / "destfnd.toml"

    def check(max_events: int, memory: str) -> subprocess.CompletedProcess:
        dest = (f'[[destinations]]\nname = "f"\nfunction = "fn.py"\nmemory_limit = "{memory}"\n'
                f"[destinations.batch]\nmax_events = {max_events}\n")  # fmt: skip
        config.write_text(config_text(tmp_path / "db.sqlite3", dest))
        return run_cli("check-config", "--config", str(config))

    big = check(1300, "512MB")
    assert big.returncode == 0, big.stderr
    assert big.stderr == (
        "warning: destinations[0].batch.max_events: 1300 events of up to 32 KB "
        "(server.max_event_size) make a batch of up to 41 MB, which a worker may not manage "
        "within memory_limit (512 MB): lower max_events or raise memory_limit\n"
    )
    assert check(1000, "512MB").stderr == ""
    assert check(1300, "1GB").stderr == ""


async def test_cli_serve_says_when_its_database_file_is_empty(make_daemon, tmp_path):
    """SQLite takes an empty file for a new database: a database truncated by a disk's
    problem became an empty queue, silently."""
    db = tmp_path / "db.sqlite3"
    db.touch()
    daemon = await make_daemon(config_text(db, "")).start()
    warned = [r for r in daemon.log_records() if r.get("event") == "database_file_empty"]
    assert warned and warned[0]["path"] == str(db), warned
    assert await daemon.terminate() == 0
    again = await make_daemon(config_text(db, "")).start()  # now a database: no warning
    assert "database_file_empty" not in {r.get("event") for r in again.log_records()}
    assert await again.terminate() == 0
    # Nor for a new one, which the daemon's lock made empty before SQLite wrote it: every
    # new storage.path was said to be a truncated database.
    new = await make_daemon(config_text(tmp_path / "new.sqlite3", "")).start()
    assert "database_file_empty" not in {r.get("event") for r in new.log_records()}


def test_cli_a_failed_first_start_leaves_no_empty_database(tmp_path):
    """A first start that fails before SQLite writes (its port in use) left the empty file its
    lock had made: `stats` then said "no database yet", and the next start warned of an
    empty database file, as of one a disk had truncated."""
    db = tmp_path / "var" / "db.sqlite3"
    config = tmp_path / "destfnd.toml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = config_text(db, "").replace("127.0.0.1:0", f"127.0.0.1:{port}")
        assert f"127.0.0.1:{port}" in text
        config.write_text(text)
        failed = run_cli("serve", "--config", str(config))
    assert failed.returncode == 1 and "Address already in use" in failed.stderr, failed.stderr
    assert not db.exists() and not Path(f"{db}-wal").exists()
    assert "no database yet" in run_cli("stats", "--config", str(config)).stderr


def test_cli_refuses_another_applications_database(tmp_path):
    """storage.path mistyped to another application's SQLite file: destfnd's tables were added
    to it and its journal mode made WAL, silently. Now every command refuses it, untouched."""
    db = tmp_path / "crm.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as other:
        other.execute("CREATE TABLE customers (id INTEGER)")
        other.commit()
    before = db.read_bytes()
    config = tmp_path / "destfnd.toml"
    config.write_text(config_text(db, ""))
    checked = run_cli("check-config", "--config", str(config))
    assert checked.returncode == 3, checked.stderr
    assert "not a destfnd database (it holds the tables customers" in checked.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crm.sqlite3", "destfnd.toml"]
    for command in ("serve", "stats", "deliveries"):
        done = run_cli(command, "--config", str(config))
        assert done.returncode != 0, (command, done.stderr)
        assert "not a destfnd database (it holds the tables customers" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert db.read_bytes() == before and not Path(f"{db}-wal").exists()


def test_cli_stats_behind_reads_as_a_duration():
    from destfnd.operate import _behind

    now = 10**13
    cases = {None: "-", now + 1: "-", now: "0s", now - 59_999: "59s", now - 60_000: "1m00s",
             now - 3_599_000: "59m59s", now - 3_600_000: "1h00m", now - 86_399_000: "23h59m",
             now - 86_400_000: "1d00h", now - 10 * 86_400_000 - 3_600_000: "10d01h"}  # fmt: skip
    assert {due: _behind(due, now) for due in cases} == cases
