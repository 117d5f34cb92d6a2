"""The operator's commands that change deliveries, while the daemon runs or not: retry, move,
discard. Each changes SQLite through store.backlog on a connection of its own, in short
transactions that leave a running daemon's writer room, and prints for people or JSON."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from destfnd.config import Config
from destfnd.errors import UsageError
from destfnd.operate import events_of, now_ms
from destfnd.store import StoreError, backlog, open_db, store_error
from destfnd.store.db import transaction
from destfnd.store.lock import DatabaseLock

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
    now = now_ms()

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


def _event_ids(cfg: Config, message_id: str | None) -> list[int] | None:
    """The stored events of `message_id` (from any source), or None: no filter. Within the
    dedupe window through its keys; older events (kept for `retention`) by a scan, as
    `deliveries --message-id` finds them: they matched nothing ("nothing to do")."""
    if message_id is None:
        return None
    # As the command will write: a schema the daemon has not migrated yet is said so.
    with contextlib.closing(open_db(cfg.storage.path, update=True)) as conn:
        try:
            return events_of(conn, cfg, message_id)
        except sqlite3.Error as exc:
            raise store_error(f"{cfg.storage.path}: cannot read", exc, cfg.storage.path) from exc


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
        raise store_error(
            f"{cfg.storage.path}: cannot write{so_far}", exc, cfg.storage.path
        ) from exc
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
        cfg, args.source, None, lambda conn, ids: backlog.move(conn, ids, args.to, now_ms())
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
        lambda conn, ids: backlog.discard(conn, ids, now_ms(), reason),
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
