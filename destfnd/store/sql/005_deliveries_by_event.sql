-- With foreign_keys on, deleting an event (pruning) checks that no delivery still points at
-- it: without an index on the child key, that check scanned every delivery row (8 ms per
-- event at 300k deliveries, so a prune chunk of 2,000 events held the writer for seconds).
-- Event ids only grow, so the index is appended to, not written at random.
CREATE INDEX deliveries_by_event ON deliveries (event_id);
