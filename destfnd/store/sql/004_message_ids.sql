-- Dedupe moves off the random-key index on events (one dirty page per new event) to keys
-- written in sorted bulk (destfnd/store/dedupe.py). `key` is a 64-bit hash of
-- (source, messageId); `event_id` lets a match be confirmed against the stored event.
-- (IF EXISTS: a database made before 001 had this index kept messageIds in a `seen` table.)
DROP INDEX IF EXISTS events_by_message;

CREATE TABLE message_ids (
    key         INTEGER PRIMARY KEY,
    event_id    INTEGER NOT NULL,
    received_at INTEGER NOT NULL            -- unix ms
);
-- No index on received_at: it would double what a flush writes. Pruning sweeps the keys in
-- key order instead, a bounded slice at a time (dedupe.sweep_keys).

-- Events with an id above flushed_through have their keys only in the daemon's memory, which
-- is rebuilt from them at start. 0: every stored event (a database from before this table).
CREATE TABLE dedupe_state (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    flushed_through  INTEGER NOT NULL
);
INSERT INTO dedupe_state (id, flushed_through) VALUES (1, 0);
