-- The loyalty participant's own table: the points each saga awarded, one row per saga key.
CREATE TABLE points_awarded (
    saga_key text PRIMARY KEY,
    customer_id text NOT NULL,
    points bigint NOT NULL CHECK (points >= 0),
    awarded_at timestamptz NOT NULL DEFAULT now()
);
