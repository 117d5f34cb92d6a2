-- A delivered attempt is not written to `attempts`: the delivery row itself says when it ended
-- and, here, which invocation it was part of. (The common case costs one row write less.)
ALTER TABLE deliveries ADD COLUMN invocation_id INTEGER;
