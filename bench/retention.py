"""Steady state under retention: the database file stops growing once pruning keeps pace, and
the daemon's memory stays flat, while events arrive and are delivered without a pause.

Runs the real daemon (`python -m destfnd serve`) with short windows (`storage.retention`,
`server.dedupe_window` and the destination's `max_age`, which with `retention` keeps attempt
records: 1 minute by default; pruning runs every minute), one webhook
destination to a local sink that answers at once, and a paced load of `/v1/batch` requests
with fresh random messageIds for `--minutes`. Every `--every` seconds it prints the database
and WAL sizes, SQLite's free pages, the rows stored, and the daemon's RSS. The baseline is
the run's own early state: once the windows have filled (after about three windows), growth
is measured between the second third of the run and the last. Nothing here is a test.

    python bench/retention.py [--minutes 12] [--rate 1000] [--retention 1m] [--every 30]
                              [--function]

With `--function`, a function destination beside the webhook (it prints a line, so each
attempt has a record with logs and its outgoing request, and posts the event to the same
sink): the sink then counts two deliveries per event, and RSS is the daemon's and its
workers' together.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench as B  # bench/ is on sys.path: run as a script


def _mb(path: Path) -> float:
    try:
        return path.stat().st_size / 1e6
    except FileNotFoundError:
        return 0.0


def _rows(db: Path) -> dict:
    """Rows and free pages, read through a read-only connection, as `stats` reads."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        count = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("events", "deliveries", "message_ids", "attempts", "invocations")
        }
        count["free_pages"] = conn.execute("PRAGMA freelist_count").fetchone()[0]
        count["pages"] = conn.execute("PRAGMA page_count").fetchone()[0]
        return count
    finally:
        conn.close()


SOAK_FN = """\
from destfnd.functions import fetch


async def on_track(event, settings):
    print("posting", event["messageId"])
    await fetch(settings["sink"], method="POST", json=event)
"""


def _tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and its children (the function workers), in MB."""
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for one in [str(pid), *children]:
        try:
            status = Path(f"/proc/{one}/status").read_text()
        except OSError:
            continue  # a worker being replaced
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return round(total, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=12.0, help="how long the load runs")
    p.add_argument("--rate", type=int, default=1000, help="events per second")
    p.add_argument("--batch", type=int, default=10, help="events per /v1/batch request")
    p.add_argument("--retention", default="1m", help="storage.retention and dedupe_window")
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--function", action="store_true", help="a function destination too")
    args = p.parse_args()
    if args.rate < args.batch or args.minutes <= 0 or args.every <= 0:
        p.error("--rate must be at least --batch; --minutes and --every must be positive")
    tmp = Path(tempfile.mkdtemp(prefix="destfnd-retention-"))
    db = tmp / "destfnd.sqlite3"
    cpus = sorted(B.os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    sink = B.Sink(client_cpu, tmp / "sink.log")
    config = B.daemon_config(db, sink.url).replace(
        'drain_timeout = "1s"\n',
        f'drain_timeout = "1s"\ndedupe_window = "{args.retention}"\n',
    )
    config = config.replace("[storage]\n", f'[storage]\nretention = "{args.retention}"\n')
    # Attempt records are kept `retention` plus the destination's `max_age` (or until they
    # pass `records_max_size`): the same short window here, so they level off too.
    config += f'\n[destinations.retry]\nmax_age = "{args.retention}"\n'
    if args.function:
        (tmp / "soak_fn.py").write_text(SOAK_FN)
        config += (
            f"\n{B.function_dest('fn', tmp / 'soak_fn.py', sink.url + '/in')}"
            f'[destinations.retry]\nmax_age = "{args.retention}"\n'
        )
    daemon = B.Daemon(tmp / "daemon", config, server_cpu)
    daemon.start()
    duration = args.minutes * 60
    load_argv = [
        B.PY, str(B.HERE / "load.py"), "--url", daemon.url, "--path", "/v1/batch",
        "--auth", B.WRITE_KEY, "--mode", "paced", "--rate", str(args.rate / args.batch),
        "--events", str(args.batch), "--warmup", "0", "--duration", str(duration),
    ]  # fmt: skip
    if client_cpu is not None:
        load_argv += ["--cpu", str(client_cpu)]
    B.log(f"retention soak: {args.rate:,} events/s for {args.minutes:g} min, windows "
          f"{args.retention}, in {tmp}")  # fmt: skip
    load = B.spawn(load_argv, cpu=None, stdout=subprocess.PIPE, stderr=None)
    started = time.monotonic()
    samples: list[dict] = []
    header = (
        f"{'min':>5} {'sent':>10} {'delivered':>10} {'db MB':>7} {'wal MB':>7} {'free pg':>8} "
        f"{'events':>8} {'deliv.':>8} {'keys':>8} {'records':>8} {'RSS MB':>7}"
    )
    print(header, flush=True)
    try:
        while load.poll() is None:
            time.sleep(min(args.every, max(0.0, duration + 5 - (time.monotonic() - started))))
            if load.poll() is not None:
                break
            elapsed = time.monotonic() - started
            rows = _rows(db)
            s = dict(
                minute=elapsed / 60,
                sent=int(min(elapsed, duration) * args.rate),
                delivered=sink.count().get("events", 0),
                db_mb=_mb(db),
                wal_mb=_mb(db.with_name(db.name + "-wal")),
                rss_mb=_tree_rss_mb(daemon.proc.pid) if args.function else daemon.rss_mb(),
                **rows,
            )
            samples.append(s)
            print(
                f"{s['minute']:5.1f} {s['sent']:>10,} {s['delivered']:>10,} {s['db_mb']:7.1f} "
                f"{s['wal_mb']:7.1f} {s['free_pages']:>8,} {s['events']:>8,} "
                f"{s['deliveries']:>8,} {s['message_ids']:>8,} {s['invocations']:>8,} "
                f"{s['rss_mb']:7.1f}",
                flush=True,
            )
        out, _ = load.communicate(timeout=120)
        result = json.loads(out)
    finally:
        daemon.stop()
        sink.stop()
        if not args.keep:
            for path in sorted(tmp.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            tmp.rmdir()
    print(
        f"load: {result.get('ok', 0):,} requests answered 200, errors {result.get('errors')}, "
        f"latency p99 {(result.get('latency_ms') or {}).get('p99')} ms"
    )
    third = len(samples) // 3
    if third < 1:
        print("too few samples for a verdict (run longer, or sample more often)")
        return 0
    mid, last = samples[third : 2 * third], samples[2 * third :]
    for key, label in (("db_mb", "database MB"), ("rss_mb", "RSS MB"), ("events", "events")):
        a = max(s[key] for s in mid)
        b = max(s[key] for s in last)
        print(f"{label}: max {a:,.1f} in the second third, {b:,.1f} in the last ({b / a:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
