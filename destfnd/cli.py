"""The `destfnd` command: serve, check-config, stats, deliveries.

Errors reach the user as one clear message and a named exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import structlog

from destfnd import __version__, logs
from destfnd.config import Config, ConfigError, DestinationConfig, load_config, parse_duration
from destfnd.errors import DestfndError
from destfnd.store import Status, StoreBusy, StoreError, open_db, store_error
from destfnd.store import queue as q
from destfnd.store.db import SQL, transaction
from destfnd.store.dedupe import events_with_message_id
from destfnd.store.lock import DatabaseLock
from destfnd.texts import is_text, sendable

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon failed while running
EXIT_USAGE = 2  # argparse's own
EXIT_CONFIG = 3  # the config is invalid
EXIT_STORE = 4  # the database cannot be opened or read
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, as a program the signal had stopped
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a program the signal had stopped
# `deliveries` reads deliveries.invocation_id (migration 003); `stats` reads any schema.
DELIVERIES_SCHEMA = 3


class UsageError(Exception):
    """Arguments that argparse accepts but that do not go together (exit 2, as argparse)."""


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:  # what is still buffered goes out here, where a closed pipe is caught
            if sys.stdout is not None:  # None: started with stdout closed
                sys.stdout.flush()
    except BrokenPipeError:
        # `destfnd deliveries | head`: the reader has what it wanted. Quiet, as other tools;
        # stdout goes to /dev/null so the interpreter's final flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is not None:  # a file the command reads, not its output
            print(f"destfnd: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR
        # Output to a full disk, say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"destfnd: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR


def _run(argv: list[str] | None) -> int:
    # --help, --version and usage errors: SystemExit. An unknown option is told with the
    # command's usage (argparse's parse_args tells it with the top level's).
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        args.usage.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, flag in _TEXT_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not is_text(value):
            # Bytes that are not UTF-8 (a terminal in another encoding): a traceback of
            # SQLite's, which cannot take them, was what it got.
            args.usage.error(f"{flag} '{sendable(value)}': not UTF-8 text")
    # Log lines (a worker's stray output, say) go to stderr, never into a command's output;
    # serve sets its own from the config.
    logs.setup("info", "auto")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"destfnd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        _print_problems("the config is invalid", exc.problems)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"destfnd: {exc}", file=sys.stderr)
        return EXIT_ERROR if isinstance(exc, StoreBusy) else EXIT_STORE
    except DestfndError as exc:
        from destfnd.deliverers import DestinationStartError
        from destfnd.run_function import RunError

        if isinstance(exc, DestinationStartError):  # laid out as check-config's problems
            _print_problems("a destination cannot start", exc.problems)
            # A load that ran out of time may succeed the next time (a cold cache after a
            # reboot): exit 1, which the unit restarts, rather than 3, which it does not.
            return EXIT_ERROR if exc.transient else EXIT_CONFIG
        print(f"destfnd: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, RunError) else EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C (serve has a handler of its own: it stops gracefully)
        return EXIT_INTERRUPTED


# Arguments that are names or ids, compared with what the store holds (UTF-8); paths are not.
_TEXT_ARGUMENTS = (("destination", "--destination"), ("message_id", "--message-id"),
                   ("source", "--from"), ("to", "--to"))  # fmt: skip


def _print_problems(heading: str, problems: list[str]) -> None:
    """One problem per line under the heading."""
    print(f"destfnd: {heading}:", file=sys.stderr)
    for problem in problems:
        _print_item("  ", problem)


def _print_item(prefix: str, text: str) -> None:
    """A problem or warning: the lines of one that has several (a traceback a function printed
    as it failed to load) go deeper, and control characters are escaped, so that text from a
    function cannot pass for problems or warnings of their own."""
    from destfnd.run_function import printable

    first, *more = text.split("\n")
    print(f"{prefix}{printable(first)}", file=sys.stderr)
    for line in more:
        print(f"      {printable(line)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="destfnd", description="Self-hosted Segment destination functions."
    )
    parser.add_argument("--version", action="version", version=f"destfnd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $DESTFND_CONFIG, else config/destfnd.toml)",
        )
        # `destfnd check-config path/to/destfnd.toml` works too: what people type first.
        p.add_argument("config_file", nargs="?", metavar="CONFIG", help="same as --config")
        p.set_defaults(func=func, usage=p)
        return p

    command("serve", cmd_serve, "run the daemon in the foreground (logs to stderr)")
    command("check-config", cmd_check_config, "validate the config; list every problem")
    p = command("stats", cmd_stats, "per destination, how many deliveries are in each status")
    p.add_argument("--json", action="store_true", help="print JSON keyed by destination")
    p = command("deliveries", cmd_deliveries, "recent deliveries with every attempt")
    p.add_argument("--destination", metavar="N", help="only this destination")
    p.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    p.add_argument("--message-id", metavar="ID", help="only the deliveries of this event")
    p.add_argument(
        "--limit",
        type=_limit,
        default=20,
        metavar="K",
        help="at most K (default 20, at most 10000)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array (with each event)")
    p = command(
        "retry", cmd_retry, "make retrying deliveries due now (after fixing what they wait for)"
    )
    p.add_argument("--destination", metavar="N", help="only this destination's")
    p.add_argument("--message-id", metavar="ID", help="only this event's")
    p.add_argument(
        "--status",
        choices=["retrying", "expired", "discarded", "dropped"],
        default="retrying",
        help="which (default retrying); finished ones get one more attempt each",
    )
    p.add_argument("--json", action="store_true", help='print {"due_now": N}')
    p = command(
        "move", cmd_move,
        "give a destination's waiting deliveries to another (after renaming it in the config)",
    )  # fmt: skip
    p.add_argument("--from", dest="source", metavar="OLD", required=True,
                   help="the destination whose deliveries wait (renamed, say)")  # fmt: skip
    p.add_argument("--to", metavar="NEW", required=True, help="a destination of the config")
    p.add_argument("--json", action="store_true", help='print {"moved": N, "left": N}')
    p = command(
        "discard", cmd_discard,
        "discard a destination's waiting deliveries (one removed for good from the config)",
    )  # fmt: skip
    p.add_argument("--destination", metavar="N", required=True, help="whose")
    p.add_argument("--message-id", metavar="ID", help="only this event's")
    p.add_argument("--json", action="store_true", help='print {"discarded": N}')
    p = sub.add_parser(
        "run-function",
        help="run a function file once on an event and print what happened",
        description="Run a function once, like the editor's Run button: prints the outcome, "
        "error type, logs, outgoing requests and, with --insert, the resulting event. "
        "A JSON array of events is a batch: on_batch if the file has one, else each event "
        "through its own handler. Exit code 0 when every event succeeded.",
    )
    p.add_argument("file", metavar="FILE", help="the function file (.py)")
    p.add_argument("--event", metavar="FILE", help="the event as JSON (- for stdin)")
    p.add_argument("--settings", metavar="JSON", help="the settings as a JSON object")
    p.add_argument("--insert", action="store_true", help="run it as an insert function")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="T",
                   help='how long the run may take: seconds or a duration such as "500ms" '
                        "(default 5)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_run_function, usage=p)
    return parser


def _limit(text: str) -> int:
    """1 to 10,000: every delivery listed is held in memory with all its attempts."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 10000, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A number of seconds ("2.5") or a duration as in the config ("500ms", "1m")."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError:
            value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f'must be a number of seconds above 0 or a duration such as "500ms", got {text!r}'
        )
    return value


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config and args.config_file and args.config != args.config_file:
        raise UsageError(f"two config files given: {args.config} and {args.config_file}")
    return args.config or args.config_file


def cmd_serve(args: argparse.Namespace) -> int:
    from destfnd.daemon import Daemon, install_signal_handlers

    cfg = _load(args)
    logs.setup(cfg.logging.level, cfg.logging.format)
    for warning in cfg.warnings:
        structlog.get_logger("destfnd").warning("config_warning", warning=warning)
    daemon = Daemon(cfg)

    async def run() -> None:
        install_signal_handlers(daemon)
        await daemon.run()

    try:
        import uvloop
    except ImportError:  # optional: uvloop makes the HTTP client about a third faster
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(run())
    except DestfndError:
        raise  # a clear one-line reason (cannot listen, database locked, ...)
    except Exception:  # a long-lived task died: say so once, exit non-zero for systemd
        structlog.get_logger("destfnd").exception("daemon_crashed")
        return EXIT_ERROR
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from destfnd.deliverers import check_destinations
    from destfnd.listen import check_listen

    cfg = _load(args)
    for warning in cfg.warnings:
        _print_item("warning: ", warning)

    async def check() -> tuple[list[str], list[str]]:
        # The listen address first: it is the first thing serve does.
        problems, warnings = await check_listen(cfg.server.host, cfg.server.port)
        found, warned = await check_destinations(cfg)
        return problems + found, warnings + warned

    problems, warnings = asyncio.run(check())
    for warning in warnings:
        _print_item("warning: ", warning)
    if problems:
        raise ConfigError(problems)
    kinds = ", ".join(
        f"{d.name} ({d.kind}{'' if d.enabled else ', disabled'})" for d in cfg.destinations
    )
    kinds = kinds or "none"
    print(f"{cfg.path}: ok")
    print(f"  sources: {', '.join(s.name for s in cfg.sources)}")
    print(f"  destinations: {kinds}")
    print(f"  database: {cfg.storage.path}")
    return EXIT_OK


def _read(cfg: Config, *, min_schema: int = 0) -> sqlite3.Connection:
    return open_db(cfg.storage.path, readonly=True, min_schema=min_schema)


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = load_config(_config_path(args), resolve_secrets=False)
    conn = _read(cfg)
    try:
        counts = q.status_counts(conn)
        leased = q.leased_counts(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"{cfg.storage.path}: cannot read: {exc}") from exc
    finally:
        conn.close()
    configured = [d.name for d in cfg.destinations]
    names = configured + sorted(set(counts) - set(configured))  # removed ones still count
    table = {n: {s.value: counts.get(n, {}).get(s.value, 0) for s in Status} for n in names}
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(table, option=orjson.OPT_INDENT_2) + b"\n")
        return EXIT_OK
    statuses = [s.value for s in Status]
    enabled = {d.name: d.enabled for d in cfg.destinations}
    shown = {
        n: n if enabled.get(n) else f"{n} ({'disabled' if n in enabled else 'not in config'})"
        for n in names
    }
    width = max([len("destination"), *map(len, shown.values())])
    print(f"{'destination':<{width}}  " + "  ".join(f"{s:>9}" for s in statuses) + "  in flight")
    for name in names:
        row = "  ".join(f"{table[name][s]:>9}" for s in statuses)
        print(f"{shown[name]:<{width}}  {row}  {leased.get(name, 0):>9}")
    return EXIT_OK


_DELIVERIES = """
SELECT d.id, d.destination, d.status, d.attempts, d.created_at, d.next_at, d.finished_at,
       d.last_error_type, d.last_error, e.message_id,
       json_extract(CAST(e.payload AS TEXT), '$.type'), d.leased, e.payload
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE (:destination IS NULL OR d.destination = :destination)
  AND (:status IS NULL OR d.status = :status)
  AND (:message_id IS NULL OR e.message_id = :message_id) {events}
ORDER BY d.id DESC LIMIT :limit
"""

# Every attempt that did not deliver has its row; the delivering one is the delivery itself.
_ATTEMPTS = """
SELECT a.attempt, a.at, a.status, a.error_type, a.error, i.duration_ms, i.version, i.logs,
       i.requests
FROM attempts a LEFT JOIN invocations i ON i.id = a.invocation_id
WHERE a.delivery_id = :id
UNION ALL
SELECT d.attempts, d.finished_at, d.status, NULL, NULL, i.duration_ms, i.version, i.logs,
       i.requests
FROM deliveries d LEFT JOIN invocations i ON i.id = d.invocation_id
WHERE d.id = :id AND d.status = 'delivered'
ORDER BY 1
"""
_ATTEMPT_KEYS = ("attempt", "at", "status", "error_type", "error", "duration_ms", "version",
                 "logs", "requests")  # fmt: skip


def _print_attempt(a: dict) -> None:
    from destfnd.run_function import printable, request_lines

    if a["error_type"]:
        error = f" ({a['error_type']}: {printable(a['error'])})"
    else:
        error = f" ({printable(a['error'])})" if a["error"] else ""
    outcome = a["status"] + error
    # No duration once the attempt's record is pruned (retention or records_max_size).
    took = f", {a['duration_ms']} ms" if a["duration_ms"] is not None else ""
    version = f", version {a['version']}" if a["version"] else ""
    when = f" at {a['at']}" if a["at"] else ""  # none for an unrecorded one
    print(f"    attempt {a['attempt']}{when}: {outcome}{took}{version}")
    if a["logs"]:
        print("      logs:")
        for line in a["logs"].rstrip("\n").splitlines():
            print(f"        {printable(line)}")
    for req in a["requests"]:
        print("\n".join(request_lines(req, "      ")))


def _with_unrecorded(history: list[dict], attempts: int, in_flight: bool) -> list[dict]:
    """The history with a line for each counted attempt that has no record: one the daemon
    held (running, or queued for a free slot) when it crashed or was killed: counted when
    leased, recorded when it ends; or the one it holds now."""
    recorded = {a["attempt"] for a in history}
    missing = [n for n in range(1, attempts + 1) if n not in recorded]
    if not missing:
        return history
    for n in missing:
        running = in_flight and n == attempts
        history.append({
            **dict.fromkeys(_ATTEMPT_KEYS), "attempt": n, "requests": [],
            "status": "in flight" if running else "interrupted",
            "error": None if running else "no record: the daemon stopped while holding it",
        })  # fmt: skip
    return sorted(history, key=lambda a: a["attempt"])


def cmd_deliveries(args: argparse.Namespace) -> int:
    from destfnd.spec import format_ms

    cfg = load_config(_config_path(args), resolve_secrets=False)
    conn = _read(cfg, min_schema=DELIVERIES_SCHEMA)
    try:
        events = ""
        if args.message_id is not None:
            # Within the dedupe window, through its keys; older events: a scan of the events.
            sources = [s.name for s in cfg.sources]
            try:
                ids = events_with_message_id(conn, sources, args.message_id)
            except sqlite3.OperationalError:  # a schema the daemon has not migrated yet
                ids = []
            if ids:
                events = f"AND d.event_id IN ({','.join(str(int(i)) for i in ids)})"
        rows = conn.execute(
            _DELIVERIES.format(events=events),
            {"destination": args.destination, "status": args.status,
             "message_id": args.message_id, "limit": max(args.limit, 0)},
        ).fetchall()  # fmt: skip
        attempts = {row[0]: conn.execute(_ATTEMPTS, {"id": row[0]}).fetchall() for row in rows}
    except sqlite3.Error as exc:
        raise StoreError(f"{cfg.storage.path}: cannot read: {exc}") from exc
    finally:
        conn.close()
    keys = ("id", "destination", "status", "attempts", "created_at", "next_at", "finished_at",
            "error_type", "error", "message_id", "type", "in_flight", "event")  # fmt: skip
    records = []
    for row in rows:
        rec = dict(zip(keys, row, strict=True))
        for key in ("created_at", "next_at", "finished_at"):
            if rec[key] is not None:
                rec[key] = format_ms(rec[key])
        # Leased: its attempt is running (its next_at is only the lease's end), or was when
        # the daemon stopped without giving it back (it runs again at the next start).
        rec["in_flight"] = bool(rec["in_flight"])
        # The event as stored (and as the function gets it, before any insert function):
        # to look at a rejected one, or to run it again with `run-function --event -`.
        rec["event"] = orjson.Fragment(rec["event"])
        if rec["status"] not in (Status.PENDING, Status.RETRYING) or rec["in_flight"]:
            rec["next_at"] = None
        rec["history"] = []  # every recorded attempt: the Event Delivery view
        for attempt in attempts[rec["id"]]:
            a = dict(zip(_ATTEMPT_KEYS, attempt, strict=True))
            a["at"] = format_ms(a["at"])
            a["requests"] = orjson.loads(a["requests"]) if a["requests"] else []
            rec["history"].append(a)
        rec["history"] = _with_unrecorded(rec["history"], rec["attempts"], rec["in_flight"])
        records.append(rec)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(records, option=orjson.OPT_INDENT_2) + b"\n")
        return EXIT_OK
    from destfnd.run_function import printable

    for rec in records:
        line = (f"{rec['created_at']}  {rec['destination']}  {rec['status']:<9}  "
                f"attempts={rec['attempts']}  {printable(rec['type'])}  "
                f"{printable(rec['message_id'])}")  # fmt: skip
        if rec["error_type"]:
            line += f"\n    {rec['error_type']}: {printable(rec['error'])}"
        elif rec["error"]:  # a reason with no error type: discarded by the operator
            line += f"\n    {printable(rec['error'])}"
        if rec["next_at"]:
            line += f"\n    next attempt at {rec['next_at']}"
        print(line)
        for a in rec["history"]:
            _print_attempt(a)
    if not records:
        print("no deliveries")
    names = {d.name for d in cfg.destinations}
    if args.destination and args.destination not in names:
        known = ", ".join(sorted(names)) or "none"
        print(f"note: no destination {args.destination!r} in the config ({known})", file=sys.stderr)
    return EXIT_OK


_RETRY_CHUNK = 5000  # deliveries per transaction: the daemon's writer waits at most this long


def cmd_retry(args: argparse.Namespace) -> int:
    """Retrying deliveries due now, attempts kept: the daemon (running or next started)
    takes them within a second, instead of at the end of their backoff. Finished ones
    (expired, discarded, dropped) get one more attempt each."""
    cfg = load_config(_config_path(args), resolve_secrets=False)
    event_ids = _event_ids(cfg, args.message_id)
    which = q.RetryFilter(args.status, args.destination, event_ids)
    now = _now_ms()

    def chunk(conn: sqlite3.Connection, after: int) -> tuple[list[int], int]:
        ids = q.retry_now(conn, which, now, after, _RETRY_CHUNK)
        return ids, len(ids)

    _, count = _in_chunks(cfg, chunk)
    if args.json:
        print(orjson.dumps({"due_now": count}).decode())
    elif count:
        again = "" if args.status == "retrying" else " again: one more attempt each"
        noun = "delivery is" if count == 1 else "deliveries are"
        print(f"{count} {args.status} {noun} due now{again}{_retry_note(cfg, args)}")
    else:
        already = " (those due already are left as they are)" if args.status == "retrying" else ""
        print(f"no {args.status} delivery matched: nothing to do{already}{_retry_note(cfg, args)}")
    return EXIT_OK


def _now_ms() -> int:
    return int(time.time() * 1000)


def _event_ids(cfg: Config, message_id: str | None) -> list[int] | None:
    """The stored events of `message_id` (from any source), or None: no filter. Within the
    dedupe window through its keys; older events (kept for `retention`) by a scan, as
    `deliveries --message-id` finds them: they matched nothing ("nothing to do")."""
    if message_id is None:
        return None
    # As the command will write: a schema the daemon has not migrated yet is said so.
    with contextlib.closing(open_db(cfg.storage.path, update=True)) as conn:
        try:
            found = events_with_message_id(conn, [s.name for s in cfg.sources], message_id)
            if not found:
                scan = conn.execute(SQL["events_with_message_id_scan"], (message_id,))
                found = [event_id for (event_id,) in scan]
        except sqlite3.Error as exc:
            raise store_error(f"{cfg.storage.path}: cannot read", exc) from exc
        return found


def _in_chunks(
    cfg: Config, chunk: Callable[[sqlite3.Connection, int], tuple[list[int], int]]
) -> tuple[int, int]:
    """`chunk(conn, after)` until it takes fewer than _RETRY_CHUNK deliveries, a transaction
    each, so the daemon's writer, which may run meanwhile, is not held up for long. `chunk`
    returns the ids it took (in order, from `after` on) and how many it changed. Returns
    (deliveries taken, changed)."""
    conn = open_db(cfg.storage.path, update=True)
    seen = done = 0
    try:
        after = 0
        while True:
            with transaction(conn):
                ids, changed = chunk(conn, after)
            seen, done = seen + len(ids), done + changed
            if len(ids) < _RETRY_CHUNK:
                return seen, done
            after = ids[-1]
    except sqlite3.Error as exc:
        so_far = f" ({done} done before that)" if done else ""
        raise store_error(f"{cfg.storage.path}: cannot write{so_far}", exc) from exc
    finally:
        conn.close()


def _unfinished_chunks(
    cfg: Config, destination: str, event_ids: list[int] | None, step: Callable
) -> tuple[int, int]:
    """`step(conn, ids)` on each chunk of `destination`'s waiting deliveries not in flight
    (those a running daemon has are left alone; with none running, those a killed one left
    leased are taken too). Returns (deliveries seen, `step`'s sum)."""
    until: list[int] = []  # the newest delivery at the start: not those ingested meanwhile
    with _no_daemon(cfg) as stale:

        def chunk(conn: sqlite3.Connection, after: int) -> tuple[list[int], int]:
            if not until:
                until.append(q.newest_delivery(conn))
            ids = q.unfinished(conn, destination, event_ids, after, _RETRY_CHUNK, stale, until[0])
            return ids, step(conn, ids)

        return _in_chunks(cfg, chunk)


@contextlib.contextmanager
def _no_daemon(cfg: Config) -> Iterator[bool]:
    """True if no daemon serves the database: its lock is then held meanwhile, so none starts
    (released after SQLite's connection: closing a descriptor of the file drops this
    process's locks on it). False if one does, or if that cannot be told."""
    path = Path(cfg.storage.path)
    if not path.is_file():  # no database: open_db says so (the lock would make the file)
        yield False
        return
    try:
        lock = DatabaseLock(path)
    except StoreError:  # held by a daemon (DatabaseInUse), or cannot be taken
        yield False
        return
    try:
        yield True
    finally:
        lock.close()


def cmd_move(args: argparse.Namespace) -> int:
    """A renamed destination's backlog waits under its old name: it goes to the new one."""
    cfg = load_config(_config_path(args), resolve_secrets=False)
    if args.to not in {d.name for d in cfg.destinations}:
        raise UsageError(f"move: no destination {args.to!r} in {cfg.path}")
    if args.to == args.source:
        raise UsageError("move: --from and --to name the same destination")
    seen, moved = _unfinished_chunks(
        cfg, args.source, None, lambda conn, ids: q.move(conn, ids, args.to, _now_ms())
    )
    left = seen - moved
    if args.json:
        print(orjson.dumps({"moved": moved, "left": left}).decode())
        return EXIT_OK
    noun = "delivery" if moved == 1 else "deliveries"
    print(f"{moved} waiting {noun} of {args.source} moved to {args.to}, due now")
    if not next(d for d in cfg.destinations if d.name == args.to).enabled:
        print(f"note: {args.to} is disabled: they wait, due, until it is enabled and the daemon "
              "restarted")  # fmt: skip
    if left:
        print(f"note: {left} left with {args.source}: {args.to} has a delivery of those events "
              f"already (destfnd discard --destination {args.source} finishes them)")  # fmt: skip
    return EXIT_OK


def cmd_discard(args: argparse.Namespace) -> int:
    """A destination removed for good leaves its backlog waiting (and its events kept)."""
    cfg = load_config(_config_path(args), resolve_secrets=False)
    event_ids = _event_ids(cfg, args.message_id)
    reason = "discarded by the operator (destfnd discard)"
    _, count = _unfinished_chunks(
        cfg, args.destination, event_ids, lambda conn, ids: q.discard(conn, ids, _now_ms(), reason)
    )
    if args.json:
        print(orjson.dumps({"discarded": count}).decode())
        return EXIT_OK
    if not count:  # a mistyped name or id says so, as retry's "nothing to do" does
        from destfnd.run_function import printable

        of_event = f" of event {printable(args.message_id)}" if args.message_id else ""
        print(f"no waiting delivery of {printable(args.destination)}{of_event}: nothing to do")
        return EXIT_OK
    noun = "delivery" if count == 1 else "deliveries"
    print(f"{count} waiting {noun} of {args.destination} discarded")
    return EXIT_OK


def _retry_note(cfg: Config, args: argparse.Namespace) -> str:
    """What `retry --destination N` should know of N beside the count."""
    if args.destination is None:
        return ""
    found = [d for d in cfg.destinations if d.name == args.destination]
    if not found:
        return f"\nnote: no destination {args.destination!r} in {cfg.path}"
    if not found[0].enabled:
        return (
            f"\nnote: {args.destination} is disabled: its deliveries wait, due, until it is "
            "enabled and the daemon restarted"
        )
    return ""


def cmd_run_function(args: argparse.Namespace) -> int:
    from destfnd import run_function as rf

    rf.check_file(Path(args.file))
    events, batch = rf.read_events(args.event, sys.stdin.isatty())
    settings = rf.parse_settings(args.settings)
    memory_limit = DestinationConfig(name="", kind="").memory_limit_bytes  # as a destination's
    result = asyncio.run(
        rf.run(Path(args.file), events, batch, settings.values, insert=args.insert,
               timeout_s=args.timeout, memory_limit_bytes=memory_limit,
               secrets=settings.secrets, hidden_env=settings.hidden_env)
    )  # fmt: skip
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(rf.render(result, batch, args.insert))
    return EXIT_OK if result.ok else EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
