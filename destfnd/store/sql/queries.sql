-- name: insert_event
-- Ids are given by the (single) writer, so deliveries can be inserted in the same batch.
INSERT INTO events (id, source, message_id, received_at, refs, payload) VALUES (?, ?, ?, ?, ?, ?);

-- name: max_event_id
SELECT coalesce(max(id), 0) FROM events;

-- name: claim_events
-- The events of claimed deliveries, as one JSON array of [id, message_id, payload in hex]
-- (hex: the bytes come back exactly, whatever they are): one row, so one SQLite step (see
-- `due_rows`). ?: a JSON array of event ids.
SELECT json_group_array(json_array(id, message_id, hex(payload))) FROM events
WHERE id IN (SELECT value FROM json_each(?));

-- name: claim_events_rows
-- The same a row at a time, for events too big to come back together. {ids}: event ids.
SELECT id, message_id, payload FROM events WHERE id IN ({ids});

-- name: find_keys
SELECT key, event_id, received_at FROM message_ids WHERE key IN ({ids});

-- name: confirm_events
-- {ids}: event ids a dedupe key matched; their (source, messageId) confirm the match.
SELECT id, source, message_id, received_at FROM events WHERE id IN ({ids});

-- name: dedupe_flushed_through
SELECT flushed_through FROM dedupe_state;

-- name: set_dedupe_flushed_through
UPDATE dedupe_state SET flushed_through = ?;

-- name: unflushed_events_with_message_id
-- The events above flushed_through: their dedupe keys are only in the daemon's memory.
SELECT id FROM events WHERE id > ? AND message_id = ?;

-- name: events_with_message_id_scan
-- An event older than the dedupe window (its key swept): a walk of the events table.
SELECT id FROM events WHERE message_id = ?;

-- name: events_since
SELECT id, source, message_id, received_at FROM events WHERE id > ? ORDER BY id LIMIT ?;

-- name: insert_message_id
-- A key seen again after the dedupe window replaces its older entry.
INSERT OR REPLACE INTO message_ids (key, event_id, received_at) VALUES (?, ?, ?);

-- name: key_scan
-- The next keys in key order, for filling the key filter.
SELECT key FROM message_ids WHERE key >= ? ORDER BY key LIMIT ?;

-- name: key_slice
-- The last key and the number of keys of the next slice of the sweep, in key order.
SELECT max(key), count(*) FROM (SELECT key FROM message_ids WHERE key > ? ORDER BY key LIMIT ?);

-- name: prune_key_slice
DELETE FROM message_ids WHERE key > ? AND key <= ? AND received_at < ?;

-- name: insert_deliveries
-- ?: a JSON array of [event id, destination, created_at (also when due)].
INSERT INTO deliveries (event_id, destination, status, created_at, next_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), 'pending',
       json_extract(value, '$[2]'), json_extract(value, '$[2]')
FROM json_each(?);

-- name: fan_out
-- One delivery to each destination of the first parameter (a JSON array of names) for each
-- event of source (the fourth) just inserted with an id in [second, third], due at once
-- (received_at is the request's time). Parameters are plain `?`s throughout: Python 3.14's
-- sqlite3 refuses numbered ones (`?1`) with a sequence of values.
-- Walks the rowid range only, once per destination (CROSS JOIN: in this order, so each
-- destination's deliveries are next to each other). One statement for all destinations:
-- each SQLite call hands the GIL to the event loop and back (see `due_rows`).
INSERT INTO deliveries (event_id, destination, status, created_at, next_at)
SELECT e.id, d.value, 'pending', e.received_at, e.received_at
FROM json_each(?) AS d CROSS JOIN events AS e
WHERE e.id BETWEEN ? AND ? AND e.source = ?;

-- name: due
-- Walks deliveries_due in due order, never delivered history.
SELECT id, next_at, event_id, attempts, created_at FROM deliveries
WHERE destination = :destination AND status IN ('pending', 'retrying')
  AND next_at <= :now AND leased = 0
ORDER BY next_at, id LIMIT :limit;

-- name: due_rows
-- `due`'s rows as one JSON array of arrays: one row, so one SQLite step. The writer thread
-- hands the GIL to the event loop at each step and waits to get it back, which is what a
-- busy loop makes slow (a step per row took 0.2 ms each, a transaction of 30 destinations'
-- claims and outcomes 100 ms). The array's order is not relied upon (next_at, id are in it).
SELECT json_group_array(json_array(id, next_at, event_id, attempts, created_at)) FROM (
{due}
);

-- name: lease
-- A leased row is pushed out of the due range (next_at set past the lease) so neither `due`
-- nor next_due sees it until it is finished or released. The lease's end, then a JSON array
-- of delivery ids.
UPDATE deliveries SET leased = 1, attempts = attempts + 1, next_at = ?
WHERE id IN (SELECT value FROM json_each(?));

-- name: next_due
SELECT min(next_at) FROM deliveries
WHERE destination = ? AND status IN ('pending', 'retrying');

-- name: finish
-- ?: a JSON array of [status, finished_at, error type, error, invocation id, delivery id],
-- all in one statement (one SQLite step, see `due_rows`).
UPDATE deliveries
SET status = json_extract(o.value, '$[0]'), leased = 0,
    finished_at = json_extract(o.value, '$[1]'),
    last_error_type = json_extract(o.value, '$[2]'), last_error = json_extract(o.value, '$[3]'),
    invocation_id = json_extract(o.value, '$[4]')
FROM json_each(?) AS o
WHERE deliveries.id = json_extract(o.value, '$[5]');

-- name: schedule_retry
-- ?: a JSON array of [next_at, error type, error, invocation id, delivery id].
UPDATE deliveries
SET status = 'retrying', leased = 0, next_at = json_extract(o.value, '$[0]'),
    last_error_type = json_extract(o.value, '$[1]'), last_error = json_extract(o.value, '$[2]'),
    invocation_id = json_extract(o.value, '$[3]')
FROM json_each(?) AS o
WHERE deliveries.id = json_extract(o.value, '$[4]');

-- The `_row` statements take one row of the JSON arrays above as parameters: for values with
-- a NUL character, where json_extract would cut the text short.

-- name: finish_row
UPDATE deliveries
SET status = ?, leased = 0, finished_at = ?, last_error_type = ?, last_error = ?,
    invocation_id = ?
WHERE id = ?;

-- name: schedule_retry_row
UPDATE deliveries
SET status = 'retrying', leased = 0, next_at = ?, last_error_type = ?, last_error = ?,
    invocation_id = ?
WHERE id = ?;

-- name: release
-- Gives back a lease whose attempt never ran to the end (shutdown): due now, attempt not counted.
UPDATE deliveries SET leased = 0, next_at = ?, attempts = max(attempts - 1, 0) WHERE id = ?;

-- name: shift_retries
-- The wall clock stepped back by -:step ms: retries scheduled before the step become due when
-- they were meant to, not the step later (none before now). Walks unfinished rows only.
UPDATE deliveries SET next_at = max(next_at + :step, :now)
WHERE status IN ('pending', 'retrying') AND status = 'retrying' AND leased = 0
  AND next_at > :now;

-- name: retry_ids
-- `destfnd retry`: the next deliveries in :status (not leased right now) to make due, in id
-- order from :after up to :until. {events}: an optional "AND event_id IN (...)"; {scan}:
-- NOT INDEXED without it (the table walked by id range, see backlog._of_events).
SELECT id FROM deliveries {scan}
WHERE status = :status AND leased = 0 AND id > :after AND id <= :until
  AND (:status != 'retrying' OR next_at > :now)
  AND (:destination IS NULL OR destination = :destination) {events}
ORDER BY id LIMIT :limit;

-- name: retry_now
-- Due now, attempts kept; a finished one is retrying again (the triggers keep the counts).
UPDATE deliveries SET status = 'retrying', next_at = ?, finished_at = NULL WHERE id IN ({ids});

-- name: unfinished_ids
-- `destfnd move` and `discard`: the next unfinished deliveries of :destination not leased
-- right now (leased too if :stale, no daemon running: a lease a killed one left), in id order
-- from :after up to :until (a window within the waiting ids when the command started: not
-- those of events ingested meanwhile). {events} and {scan}: as in retry_ids.
SELECT id FROM deliveries {scan}
WHERE destination = :destination AND status IN ('pending', 'retrying')
  AND (leased = 0 OR :stale) AND id > :after AND id <= :until {events}
ORDER BY id LIMIT :limit;

-- name: newest_delivery
SELECT coalesce(max(id), 0) FROM deliveries;

-- name: waiting_bounds
-- The first and last id of a destination's pending and retrying deliveries: their index
-- holds the ids, so the table is not read.
SELECT min(id), max(id) FROM deliveries INDEXED BY deliveries_due
WHERE destination = :destination AND status IN ('pending', 'retrying');

-- name: waiting_bounds_all
-- The same for every destination's.
SELECT min(id), max(id) FROM deliveries INDEXED BY deliveries_due
WHERE status IN ('pending', 'retrying');

-- name: move_deliveries
-- To destination :to, due :now, attempts kept (a lease a killed daemon left is taken back,
-- as at start); an event :to has a delivery of already stays.
UPDATE deliveries SET destination = :to, next_at = :now, leased = 0
WHERE id IN ({ids}) AND NOT EXISTS (
    SELECT 1 FROM deliveries other
    WHERE other.event_id = deliveries.event_id AND other.destination = :to
);

-- name: discard_deliveries
-- Finished by hand: discarded :now, with :reason (the triggers keep the counts).
UPDATE deliveries SET status = 'discarded', finished_at = :now, next_at = :now, leased = 0,
    last_error_type = NULL, last_error = :reason
WHERE id IN ({ids});

-- name: recover
-- Crash-only recovery: whatever was leased when the daemon died is due again, attempts kept.
UPDATE deliveries SET leased = 0, next_at = ? WHERE leased = 1;

-- name: insert_invocation
-- One record, its id given by SQLite (tests seed records with it; the writer uses
-- insert_invocations).
INSERT INTO invocations (destination, started_at, duration_ms, version, logs, requests, size)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: max_invocation_id
SELECT coalesce(max(id), 0) FROM invocations;

-- name: insert_invocations
-- ?: a JSON array of [id, destination, started_at, duration_ms, version, logs, requests as
-- text, size]; the ids are given by the (single) writer, from max_invocation_id.
INSERT INTO invocations (id, destination, started_at, duration_ms, version, logs, requests, size)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       CAST(json_extract(value, '$[6]') AS BLOB), json_extract(value, '$[7]')
FROM json_each(?);

-- name: insert_invocations_row
INSERT INTO invocations (id, destination, started_at, duration_ms, version, logs, requests, size)
VALUES (?, ?, ?, ?, ?, ?, CAST(? AS BLOB), ?);

-- name: insert_attempts
-- ?: a JSON array of [delivery_id, attempt, invocation_id, at, status, error type, error].
INSERT OR REPLACE INTO attempts (delivery_id, attempt, invocation_id, at, status, error_type, error)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]')
FROM json_each(?);

-- name: insert_attempts_row
INSERT OR REPLACE INTO attempts (delivery_id, attempt, invocation_id, at, status, error_type, error)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: prune_deliveries
DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries
    WHERE finished_at IS NOT NULL AND finished_at < ?
    ORDER BY finished_at LIMIT ?
)
RETURNING id, event_id;

-- name: delete_attempts
DELETE FROM attempts WHERE delivery_id = ?;

-- name: oldest_invocations
-- Invocation ids grow with time, so the oldest are the first by id (no index needed).
SELECT id, started_at, size FROM invocations ORDER BY id LIMIT ?;

-- name: newest_invocation
-- Kept by pruning: an INTEGER PRIMARY KEY takes max(id) + 1, so deleting the newest would
-- give its id to the next record.
SELECT max(id) FROM invocations;

-- name: invocations_after
-- The records after a point in that order, for pruning one destination's sooner.
SELECT id, destination, started_at, size FROM invocations WHERE id > ? ORDER BY id LIMIT ?;

-- name: delete_invocation
DELETE FROM invocations WHERE id = ?;

-- name: invocations_size
SELECT coalesce(sum(size), 0) FROM invocations;

-- name: unref_event
UPDATE events SET refs = refs - ? WHERE id = ?;

-- name: delete_unreferenced_event
DELETE FROM events WHERE id = ? AND refs <= 0;

-- name: status_counts
-- Finished deliveries from their counts (kept by triggers, see 006_finished_counts.sql),
-- unfinished ones counted through deliveries_due: never a walk of delivered history.
SELECT destination, status, n FROM finished_counts WHERE n > 0
UNION ALL
SELECT destination, status, count(*) FROM deliveries INDEXED BY deliveries_due
WHERE status IN ('pending', 'retrying') GROUP BY destination, status;

-- name: status_counts_scan
-- The same from a database not yet migrated to finished_counts (a newer `stats` run before
-- the daemon was restarted on it): every row counted.
SELECT destination, status, count(*) FROM deliveries GROUP BY destination, status;

-- name: waiting_counts
-- Pending and retrying deliveries per destination, counted in deliveries_due alone (it holds
-- exactly those, their status aside: no row of the table is read, where status_counts reads
-- each for its status: 0.2 s against 2 s at 3M).
SELECT destination, count(*) FROM deliveries INDEXED BY deliveries_due
WHERE status IN ('pending', 'retrying') GROUP BY destination;

-- name: earliest_due
-- When a destination's earliest waiting delivery is due (a leased one's: when its lease ends):
-- the first entry of the destination's part of deliveries_due, not a walk of its backlog.
SELECT min(next_at) FROM deliveries INDEXED BY deliveries_due
WHERE destination = ? AND status IN ('pending', 'retrying');

-- name: leased_counts
SELECT destination, count(*) FROM deliveries INDEXED BY deliveries_due
WHERE status IN ('pending', 'retrying') AND leased = 1 GROUP BY destination;
