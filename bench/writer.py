"""The SQLite writer's work per event, without HTTP: groups of single-event requests, as
ingest hands them over, stored by `queue.insert_many` on a real file, in one process and
thread. Far steadier than the daemon's figures (no event loop, no load generator, no second
thread on the core), so a change to the store can be judged here first.

Prints microseconds of CPU and wall per event for destfnd's insert path, next to a same-run
baseline on a fresh file: the same event rows alone (one `executemany`, no delivery rows, no
dedupe), so the difference is what the deliveries and the dedupe keys cost.
`--breakdown` adds the wall time of each kind of statement of the insert path (COMMIT
includes the fsync's wait).

    python bench/writer.py [--groups 1500] [--group-size 60] [--synchronous FULL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
from load import _EVENT, _MID  # bench/ is on sys.path: run as a script

from destfnd import spec
from destfnd.store import Dedupe, IncomingEvent, open_db
from destfnd.store import queue as q
from destfnd.store.db import SQL

SOURCE, DESTINATIONS, WINDOW_MS = "web", ("hook",), 24 * 3600 * 1000


def requests(groups: int, size: int, t0: int) -> list[list[q.IngestRequest]]:
    """Enriched as ingest enriches them (spec.check + spec.enrich), fresh UUID messageIds."""
    out = []
    for g in range(groups):
        now = t0 + g
        at = datetime.fromtimestamp(now / 1000, UTC)
        group = []
        for _ in range(size):
            message = orjson.loads(_EVENT.replace(_MID, str(uuid.uuid4()).encode()))
            spec.enrich(message, at, times=spec.check(message, ""))
            event = IncomingEvent(message["messageId"], orjson.dumps(message))
            group.append(q.IngestRequest(SOURCE, [event], DESTINATIONS, now, now - WINDOW_MS))
        out.append(group)
    return out


class Timed:
    """A connection whose statements are timed by their first words (for --breakdown)."""

    def __init__(self, conn) -> None:
        self.conn, self.spent = conn, Counter()

    def _timed(self, method, sql, *args):
        started = time.perf_counter()
        cursor = getattr(self.conn, method)(sql, *args)
        rows = cursor.fetchall() if sql.lstrip().upper().startswith("SELECT") else None
        words = [w for line in sql.splitlines() if not line.startswith("--") for w in line.split()]
        self.spent[" ".join(words[:3])] += time.perf_counter() - started
        return _Done(rows, cursor.rowcount)

    def execute(self, sql, *args):
        return self._timed("execute", sql, *args)

    def executemany(self, sql, rows):
        return self._timed("executemany", sql, rows)


class _Done:
    def __init__(self, rows, rowcount) -> None:
        self.rows, self.rowcount = rows or [], rowcount

    def __iter__(self):
        return iter(self.rows)

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return self.rows


def insert_path(conn, dedupe, group) -> None:
    q.insert_many(conn, group, dedupe)


def rows_only(conn, dedupe, group) -> None:
    (last,) = conn.execute(SQL["max_event_id"]).fetchone()
    conn.executemany(
        SQL["insert_event"],
        [
            (last + 1 + i, r.source, r.events[0].message_id, r.now, 1, r.events[0].payload)
            for i, r in enumerate(group)
        ],
    )


def run(name, store, work, db: Path, args) -> dict:
    conn = open_db(db, synchronous=args.synchronous)
    dedupe = Dedupe.load(conn)
    timed = Timed(conn) if args.breakdown and store is insert_path else None
    cpu = wall = 0.0
    for i, group in enumerate(work):
        measured = i >= args.warmup
        c = timed if timed is not None and measured else conn
        c0, w0 = time.thread_time(), time.perf_counter()
        c.execute("BEGIN IMMEDIATE")
        store(c, dedupe, group)
        c.execute("COMMIT")
        f0 = time.perf_counter()
        while dedupe.pending():  # the writer runs these slices between groups: counted too
            if not dedupe.step(conn):
                break
        if c is timed:
            timed.spent["dedupe flush/filter slices"] += time.perf_counter() - f0
        if measured:
            cpu += time.thread_time() - c0
            wall += time.perf_counter() - w0
    conn.close()
    events = (len(work) - args.warmup) * args.group_size
    result = {
        "name": name,
        "events": events,
        "cpu_us_per_event": round(cpu / events * 1e6, 2),
        "wall_us_per_event": round(wall / events * 1e6, 2),
        "events_per_s": round(events / wall),
    }
    if timed is not None:
        result["breakdown_us_per_event"] = {
            k: round(v / events * 1e6, 2) for k, v in timed.spent.most_common()
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=1500, help="measured groups (after warm-up)")
    p.add_argument("--warmup", type=int, default=200, help="groups before measuring")
    p.add_argument("--group-size", type=int, default=60, help="requests per group")
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    p.add_argument("--breakdown", action="store_true", help="time each kind of statement")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    total = args.groups + args.warmup
    work = requests(total, args.group_size, 1_700_000_000_000)
    with tempfile.TemporaryDirectory(prefix="destfnd-writer-bench-") as tmp:
        results = [
            run("event rows alone (baseline)", rows_only, work, Path(tmp) / "a.sqlite3", args),
            run("destfnd insert_many", insert_path, work, Path(tmp) / "b.sqlite3", args),
        ]
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(results) + b"\n")
        return
    print(
        f"{args.groups} groups of {args.group_size} single-event requests "
        f"(+{args.warmup} warm-up), synchronous={args.synchronous}, one fresh file each"
    )
    for r in results:
        print(
            f"  {r['name']:<28} {r['cpu_us_per_event']:6.2f} us CPU/event  "
            f"{r['wall_us_per_event']:6.2f} us wall/event  {r['events_per_s']:>8,} events/s"
        )
        for k, v in r.get("breakdown_us_per_event", {}).items():
            print(f"      {v:6.2f} us wall  {k}")
    base, ours = results
    ratio = ours["cpu_us_per_event"] / base["cpu_us_per_event"]
    print(f"  insert_many / baseline, CPU per event: {ratio:.2f}x")


if __name__ == "__main__":
    main()
