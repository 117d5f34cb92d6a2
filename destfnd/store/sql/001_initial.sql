-- Accepted events, stored once however many destinations they go to.
-- `refs` counts the delivery rows still pointing at the event; pruning deletes the event at 0.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    received_at INTEGER NOT NULL,           -- unix ms, UTC
    refs        INTEGER NOT NULL,
    payload     BLOB    NOT NULL            -- the enriched event, JSON (orjson)
);

-- Dedupe looks a messageId up here (an event is kept while it has deliveries). Not unique:
-- the same messageId is stored again once the first is older than the dedupe window.
CREATE INDEX events_by_message ON events (source, message_id, received_at);

-- One row per (event, destination). status is one of destfnd.store.Status.
-- An unfinished row is due at next_at; `leased` = 1 while the daemon holds it in memory.
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    destination     TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    leased          INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    next_at         INTEGER NOT NULL,
    finished_at     INTEGER,
    last_error_type TEXT,
    last_error      TEXT
);
-- The due-work query walks only unfinished rows, in due order: delivered history is never scanned.
CREATE INDEX deliveries_due ON deliveries (destination, next_at)
    WHERE status IN ('pending', 'retrying');
-- Retention pruning walks only finished rows, oldest first.
CREATE INDEX deliveries_finished ON deliveries (finished_at)
    WHERE finished_at IS NOT NULL;
