-- Parked outbox rows are swept OUTBOX_PARKED_RETENTION_SECS after they were parked, oldest
-- first, in batches: this index finds them without reading the rows' payloads.
CREATE INDEX outbox_parked_parked_at ON outbox_parked (parked_at);
