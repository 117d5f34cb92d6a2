"""The huey baseline of bench.py's functions phase: the same trivial destination function as a
huey task (POST the event's JSON to the sink), on SqliteHuey, as a Python user would write it.

  consumer:  BENCH_HUEY_DB=... BENCH_SINK_URL=... \\
             python -m huey.bin.huey_consumer huey_task.huey -w 8 -k thread   (cwd = bench/)
  producer:  BENCH_HUEY_DB=... python bench/huey_task.py enqueue --events N --prefix P
             -> {"enqueued": N, "elapsed_s": ..., "per_s": ...} on stdout

huey tasks are synchronous, so the task uses a blocking HTTP client: http.client with one
keep-alive connection per worker thread (cheaper than urllib, which opens a connection per
request). The consumer runs SqliteHuey with its defaults (WAL, SQLite's default synchronous,
one transaction per dequeue). Only the producer turns fsync off on its own connection, so that
filling the queue does not take a commit-and-fsync per task; that changes nothing for the
consumer, which is what is measured.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from urllib.parse import urlsplit

from huey import SqliteHuey

_DB = os.environ.get("BENCH_HUEY_DB", "huey-bench.db")
_PRODUCER = os.environ.get("BENCH_HUEY_PRODUCER") == "1"

huey = SqliteHuey("bench", filename=_DB, **({"fsync": False} if _PRODUCER else {}))

_local = threading.local()


def _conn() -> http.client.HTTPConnection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        url = urlsplit(os.environ["BENCH_SINK_URL"])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        _local.conn = conn
        _local.path = (url.path or "/") if url.path not in ("", "/") else "/in"
    return conn


def _post(body: bytes) -> int:
    conn = _conn()
    conn.request("POST", _local.path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


@huey.task()
def deliver(event: dict) -> None:
    """The destination function: POST the event as JSON; a non-2xx raises (huey logs it)."""
    body = json.dumps(event).encode()
    for attempt in range(2):  # a keep-alive connection the server closed: reconnect once
        try:
            status = _post(body)
            break
        except (ConnectionError, http.client.HTTPException):
            _local.conn.close()
            _local.conn = None
            if attempt:
                raise
    if not 200 <= status < 300:
        raise RuntimeError(f"sink answered {status}")


def enqueue(n: int, prefix: str) -> dict:
    from load import _EVENT  # the same event bodies as the daemon's figures

    template = json.loads(_EVENT)
    t0 = time.perf_counter()
    for i in range(n):
        deliver(dict(template, messageId=f"{prefix}-{i}"))
    elapsed = time.perf_counter() - t0
    return {
        "enqueued": n,
        "queue_size": huey.pending_count(),
        "elapsed_s": round(elapsed, 3),
        "per_s": round(n / elapsed, 1) if elapsed else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["enqueue"])
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--prefix", default=f"huey-{os.getpid()}")
    p.add_argument("--cpu", type=int, default=None)
    args = p.parse_args()
    if not _PRODUCER:
        p.error("run the producer with BENCH_HUEY_PRODUCER=1")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    # Enqueue through the module as the consumer imports it: huey names a task after its
    # module, and run as a script this file is `__main__`.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import huey_task

    print(json.dumps(huey_task.enqueue(args.events, args.prefix)), flush=True)


if __name__ == "__main__":
    main()
