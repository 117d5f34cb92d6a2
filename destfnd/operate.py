"""The operator's commands on the store, while the daemon runs or not: stats, the Event
Delivery view (`deliveries`), retry, move, discard. Each reads or changes SQLite through
store.backlog on a connection of its own, in short transactions, and prints for people or JSON."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from destfnd.config import Config
from destfnd.errors import UsageError
from destfnd.store import Status, StoreError, backlog, open_db, store_error
from destfnd.store.db import SQL, transaction
from destfnd.store.dedupe import events_with_message_id
from destfnd.store.lock import DatabaseLock

# `deliveries` reads deliveries.invocation_id (migration 003); `stats` reads any schema.
DELIVERIES_SCHEMA = 3


def _read(cfg: Config, *, min_schema: int = 0) -> sqlite3.Connection:
    return open_db(cfg.storage.path, readonly=True, min_schema=min_schema)


def stats(cfg: Config, args: argparse.Namespace) -> None:
    """Per destination, how many deliveries stand in each status, and how many are in flight."""
    conn = _read(cfg)
    configured = [d.name for d in cfg.destinations]
    try:
        counts = backlog.status_counts(conn)
        leased = backlog.leased_counts(conn)
        names = configured + sorted(set(counts) - set(configured))  # removed ones still count
        due = {} if args.json else {n: backlog.earliest_due(conn, n) for n in names}
    except sqlite3.Error as exc:
        raise StoreError(f"{cfg.storage.path}: cannot read: {exc}") from exc
    finally:
        conn.close()
    table = {n: {s.value: counts.get(n, {}).get(s.value, 0) for s in Status} for n in names}
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(table, option=orjson.OPT_INDENT_2) + b"\n")
        return
    now = _now_ms()
    statuses = [s.value for s in Status]
    enabled = {d.name: d.enabled for d in cfg.destinations}
    shown = {
        n: n if enabled.get(n) else f"{n} ({'disabled' if n in enabled else 'not in config'})"
        for n in names
    }
    width = max([len("destination"), *map(len, shown.values())])
    head = "  ".join(f"{s:>9}" for s in statuses)
    print(f"{'destination':<{width}}  {head}  in flight     behind")
    for name in names:
        row = "  ".join(f"{table[name][s]:>9}" for s in statuses)
        behind = _behind(due[name], now)
        print(f"{shown[name]:<{width}}  {row}  {leased.get(name, 0):>9}  {behind:>9}")


def _behind(due_at: int | None, now: int) -> str:
    """How long the earliest waiting delivery has been due ("-": none is due yet): how far
    behind a destination is, 0s when it keeps up."""
    if due_at is None or due_at > now:
        return "-"
    s = (now - due_at) // 1000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


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


def deliveries(cfg: Config, args: argparse.Namespace) -> None:
    """The Event Delivery view: recent deliveries, newest first, each with every attempt."""
    from destfnd.spec import format_ms

    conn = _read(cfg, min_schema=DELIVERIES_SCHEMA)
    try:
        events = ""
        if args.message_id is not None:
            # Within the dedupe window, through its keys; older events: a scan of the events,
            # not of every delivery joined with its event (1.3 s at 4.5M deliveries).
            try:
                ids: list[int] | None = _events_of(conn, cfg, args.message_id)
            except sqlite3.OperationalError:  # a schema the daemon has not migrated yet
                ids = None  # found by the join's `e.message_id`, as before the keys
            if ids is not None:
                events = f"AND d.event_id IN ({','.join(str(int(i)) for i in ids) or 'NULL'})"
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
        return
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


# The commands below change deliveries in short transactions, walking the table in id order
# (its own order: no index to keep, nothing to sort), so the daemon's writer, which may run
# meanwhile, is held up for a few milliseconds at a time.
_CHUNK = 2000  # deliveries changed per transaction
_WINDOW = 20_000  # ids walked per transaction, so one that finds few is short too
# Between two transactions while a daemon runs (or may start), a pause of twice the last one
# (and at least this): its writer waits for the lock in SQLite's busy handler, which tries
# again only every so often (up to 100 ms apart), so transactions back to back kept it out
# until its busy_timeout (5 s) ran out, and ingest answered 503 while a large `discard` ran.
_PAUSE_MIN_S = 0.005


def retry(cfg: Config, args: argparse.Namespace) -> None:
    """Retrying deliveries due now, attempts kept: the daemon (running or next started)
    takes them within a second, instead of at the end of their backoff. Finished ones
    (expired, discarded, dropped) get one more attempt each."""
    event_ids = _event_ids(cfg, args.message_id)
    which = backlog.RetryFilter(args.status, args.destination, event_ids)
    now = _now_ms()

    def bounds(conn: sqlite3.Connection) -> tuple[int, int]:
        if args.status == "retrying":  # among the waiting ones: their index tells where
            return backlog.waiting_bounds(conn, args.destination)
        return 0, backlog.newest_delivery(conn)

    def chunk(conn: sqlite3.Connection, after: int, until: int) -> tuple[list[int], int]:
        ids = backlog.retry_now(conn, which, now, after, until, _CHUNK)
        return ids, len(ids)

    # Paused whether a daemon runs or not: one may start meanwhile (without its lock held, as
    # move and discard hold it, which would fail that start), and would be locked out.
    _, count = _in_chunks(cfg, bounds, chunk, event_ids, pause=True)
    if args.json:
        print(orjson.dumps({"due_now": count}).decode())
    elif count:
        again = "" if args.status == "retrying" else " again: one more attempt each"
        noun = "delivery is" if count == 1 else "deliveries are"
        print(f"{count} {args.status} {noun} due now{again}{_retry_note(cfg, args)}")
    else:
        already = " (those due already are left as they are)" if args.status == "retrying" else ""
        print(f"no {args.status} delivery matched: nothing to do{already}{_retry_note(cfg, args)}")


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
            return _events_of(conn, cfg, message_id)
        except sqlite3.Error as exc:
            raise store_error(f"{cfg.storage.path}: cannot read", exc) from exc


def _events_of(conn: sqlite3.Connection, cfg: Config, message_id: str) -> list[int]:
    """The ids of the stored events of `message_id`: through the dedupe keys, else a scan of
    the events (one older than `dedupe_window`, kept for `retention`)."""
    found = events_with_message_id(conn, [s.name for s in cfg.sources], message_id)
    if not found:
        scan = conn.execute(SQL["events_with_message_id_scan"], (message_id,))
        found = [event_id for (event_id,) in scan]
    return found


def _in_chunks(
    cfg: Config,
    bounds: Callable[[sqlite3.Connection], tuple[int, int]],
    chunk: Callable[[sqlite3.Connection, int, int], tuple[list[int], int]],
    event_ids: list[int] | None,
    *,
    pause: bool,
) -> tuple[int, int]:
    """`chunk(conn, after, until)` over the ids `bounds` gives when it starts (after, until],
    a transaction each, at most _WINDOW ids and _CHUNK deliveries at a time (the deliveries
    of `event_ids`, when given, are found through their index: any ids). `chunk` returns
    the ids it took (in order) and how many it changed. `pause`: a daemon runs or may start,
    so leave its writer room between two. Returns (deliveries taken, changed)."""
    conn = open_db(cfg.storage.path, update=True)
    seen = done = 0
    try:
        after, end = bounds(conn)
        window = _WINDOW if event_ids is None else end
        while after < end:
            until = min(after + window, end)
            began = time.monotonic()
            with transaction(conn):
                ids, changed = chunk(conn, after, until)
            took = time.monotonic() - began
            seen, done = seen + len(ids), done + changed
            after = ids[-1] if len(ids) >= _CHUNK else until
            if pause and after < end:
                time.sleep(max(_PAUSE_MIN_S, 2 * took))
        return seen, done
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
    leased are taken too), those there are when it starts. Returns (deliveries seen,
    `step`'s sum)."""
    with _no_daemon(cfg) as stale:

        def chunk(conn: sqlite3.Connection, after: int, until: int) -> tuple[list[int], int]:
            ids = backlog.unfinished(conn, destination, event_ids, after, _CHUNK, stale, until)
            return ids, step(conn, ids)

        def bounds(conn: sqlite3.Connection) -> tuple[int, int]:
            return backlog.waiting_bounds(conn, destination)

        return _in_chunks(cfg, bounds, chunk, event_ids, pause=not stale)


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


def move(cfg: Config, args: argparse.Namespace) -> None:
    """A renamed destination's backlog waits under its old name: it goes to the new one."""
    if args.to not in {d.name for d in cfg.destinations}:
        raise UsageError(f"move: no destination {args.to!r} in {cfg.path}")
    if args.to == args.source:
        raise UsageError("move: --from and --to name the same destination")
    seen, moved = _unfinished_chunks(
        cfg, args.source, None, lambda conn, ids: backlog.move(conn, ids, args.to, _now_ms())
    )
    left = seen - moved
    if args.json:
        print(orjson.dumps({"moved": moved, "left": left}).decode())
        return
    noun = "delivery" if moved == 1 else "deliveries"
    print(f"{moved} waiting {noun} of {args.source} moved to {args.to}, due now")
    if not next(d for d in cfg.destinations if d.name == args.to).enabled:
        print(f"note: {args.to} is disabled: they wait, due, until it is enabled and the daemon "
              "restarted")  # fmt: skip
    if left:
        print(f"note: {left} left with {args.source}: {args.to} has a delivery of those events "
              f"already (destfnd discard --destination {args.source} finishes them)")  # fmt: skip


def discard(cfg: Config, args: argparse.Namespace) -> None:
    """A destination removed for good leaves its backlog waiting (and its events kept)."""
    event_ids = _event_ids(cfg, args.message_id)
    reason = "discarded by the operator (destfnd discard)"
    _, count = _unfinished_chunks(
        cfg,
        args.destination,
        event_ids,
        lambda conn, ids: backlog.discard(conn, ids, _now_ms(), reason),
    )
    if args.json:
        print(orjson.dumps({"discarded": count}).decode())
        return
    if not count:  # a mistyped name or id says so, as retry's "nothing to do" does
        from destfnd.run_function import printable

        of_event = f" of event {printable(args.message_id)}" if args.message_id else ""
        print(f"no waiting delivery of {printable(args.destination)}{of_event}: nothing to do")
        return
    noun = "delivery" if count == 1 else "deliveries"
    print(f"{count} waiting {noun} of {args.destination} discarded")


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
