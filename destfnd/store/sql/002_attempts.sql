-- The Event Delivery view: every attempt of every delivery, and the invocation it was part of
-- (one webhook request or one function call; a batch shares one invocation).
CREATE TABLE invocations (
    id          INTEGER PRIMARY KEY,
    destination TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,           -- unix ms
    duration_ms REAL    NOT NULL,
    version     TEXT,                       -- the function's content hash
    logs        TEXT,                       -- print()/logging output, redacted, truncated
    requests    BLOB,                       -- JSON array of outgoing requests, redacted
    size        INTEGER NOT NULL            -- bytes of logs + requests, for the size budget
);

CREATE TABLE attempts (
    delivery_id   INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    invocation_id INTEGER,
    at            INTEGER NOT NULL,         -- unix ms, when the attempt ended
    status        TEXT    NOT NULL,         -- the delivery's status after this attempt
    error_type    TEXT,
    error         TEXT,
    PRIMARY KEY (delivery_id, attempt)
) WITHOUT ROWID;
