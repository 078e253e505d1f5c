-- Each retention sweep runs in one instance of a service at a time: the one holding the
-- sweep's lease (messaging/src/retention.rs). The holder renews it before every sweep; another
-- instance takes it once it has lapsed, or at once when the holder gave it back.
CREATE TABLE retention_leases (
    sweep      text PRIMARY KEY,
    holder     uuid NOT NULL,
    expires_at timestamptz NOT NULL
);
