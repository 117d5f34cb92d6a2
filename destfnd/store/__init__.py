"""SQLite only: the connection, migrations, the write-ahead queue of events and deliveries.

Imports nothing above it; callers hold plain values (ids, bytes), never a cursor.
"""

from __future__ import annotations

from destfnd.store.db import (
    StoreBusy,
    StoreError,
    StoreFull,
    StoreUnavailable,
    open_db,
    store_error,
)
from destfnd.store.dedupe import Dedupe
from destfnd.store.models import Claimed, Finished, IncomingEvent, Status
from destfnd.store.writer import Writer

__all__ = [
    "Claimed",
    "Dedupe",
    "Finished",
    "IncomingEvent",
    "Status",
    "StoreBusy",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "Writer",
    "open_db",
    "store_error",
]
