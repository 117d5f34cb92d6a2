"""The operator's views of the store, while the daemon runs or not: stats and the Event
Delivery view (`deliveries`). Each reads SQLite on a read-only connection of its own and
prints for people or JSON; the commands that change deliveries are in interventions.py."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time

import orjson

from destfnd.config import Config
from destfnd.store import Status, backlog, open_db, store_error
from destfnd.store.db import SQL
from destfnd.store.dedupe import events_with_message_id

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
        raise store_error(f"{cfg.storage.path}: cannot read", exc, cfg.storage.path) from exc
    finally:
        conn.close()
    table = {n: {s.value: counts.get(n, {}).get(s.value, 0) for s in Status} for n in names}
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(table, option=orjson.OPT_INDENT_2) + b"\n")
        return
    now = now_ms()
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
                ids: list[int] | None = events_of(conn, cfg, args.message_id)
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
        raise store_error(f"{cfg.storage.path}: cannot read", exc, cfg.storage.path) from exc
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


def events_of(conn: sqlite3.Connection, cfg: Config, message_id: str) -> list[int]:
    """The ids of the stored events of `message_id`: through the dedupe keys, else a scan of
    the events (one older than `dedupe_window`, kept for `retention`)."""
    found = events_with_message_id(conn, [s.name for s in cfg.sources], message_id)
    if not found:
        scan = conn.execute(SQL["events_with_message_id_scan"], (message_id,))
        found = [event_id for (event_id,) in scan]
    return found


def now_ms() -> int:
    return int(time.time() * 1000)
