-- `stats` counted every delivery row, so it slowed with rate x retention (1.5 s at 3M rows).
-- Finished deliveries are now counted here, kept exact by the triggers below in the same
-- transaction as each change; unfinished ones (a backlog, usually small) are still counted
-- live, through the deliveries_due index. Deliveries are inserted pending only, so no insert
-- trigger is needed, and ingest pays nothing for this.
CREATE TABLE finished_counts (
    destination TEXT    NOT NULL,
    status      TEXT    NOT NULL,           -- a finished status: delivered, discarded, ...
    n           INTEGER NOT NULL,
    PRIMARY KEY (destination, status)
) WITHOUT ROWID;

INSERT INTO finished_counts (destination, status, n)
SELECT destination, status, count(*) FROM deliveries
WHERE status NOT IN ('pending', 'retrying')
GROUP BY destination, status;

CREATE TRIGGER finished_counts_on_update AFTER UPDATE OF status, destination ON deliveries
WHEN old.status IS NOT new.status OR old.destination IS NOT new.destination
BEGIN
    UPDATE finished_counts SET n = n - 1
    WHERE destination = old.destination AND status = old.status;
    INSERT INTO finished_counts (destination, status, n)
    SELECT new.destination, new.status, 1 WHERE new.status NOT IN ('pending', 'retrying')
    ON CONFLICT (destination, status) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER finished_counts_on_delete AFTER DELETE ON deliveries
WHEN old.status NOT IN ('pending', 'retrying')
BEGIN
    UPDATE finished_counts SET n = n - 1
    WHERE destination = old.destination AND status = old.status;
END;
