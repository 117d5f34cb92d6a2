-- Databases made by early versions of 001, 002, 004 and 006 (edited in place since), brought
-- to what those files make now; on any other database this changes nothing.

-- 001 before 5fc04df kept messageIds in `seen` (with its index); 004 replaced it.
DROP TABLE IF EXISTS seen;

-- 004 before 080e97f indexed message_ids by time: a second write per key flushed.
DROP INDEX IF EXISTS message_ids_by_time;

-- 006 before 4f3fde2 did not follow a delivery renamed by hand to another destination.
DROP TRIGGER IF EXISTS finished_counts_on_update;
CREATE TRIGGER finished_counts_on_update AFTER UPDATE OF status, destination ON deliveries
WHEN old.status IS NOT new.status OR old.destination IS NOT new.destination
BEGIN
    UPDATE finished_counts SET n = n - 1
    WHERE destination = old.destination AND status = old.status;
    INSERT INTO finished_counts (destination, status, n)
    SELECT new.destination, new.status, 1 WHERE new.status NOT IN ('pending', 'retrying')
    ON CONFLICT (destination, status) DO UPDATE SET n = n + 1;
END;
-- and counted again, in case such a rename happened.
DELETE FROM finished_counts;
INSERT INTO finished_counts (destination, status, n)
SELECT destination, status, count(*) FROM deliveries
WHERE status NOT IN ('pending', 'retrying')
GROUP BY destination, status;

-- Before 003 a delivered attempt had an `attempts` row too, which `deliveries` listed beside
-- the delivery row's own: its invocation moves to the delivery row, and the row goes.
UPDATE deliveries SET invocation_id = (
    SELECT a.invocation_id FROM attempts a
    WHERE a.delivery_id = deliveries.id AND a.status = 'delivered'
)
WHERE invocation_id IS NULL AND status = 'delivered' AND id IN (
    SELECT delivery_id FROM attempts WHERE status = 'delivered'
);
DELETE FROM attempts WHERE status = 'delivered';
