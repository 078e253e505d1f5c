-- Keys are bytes on the wire. A dead-letter copy keeps the key of the record it copies, which
-- may hold a NUL or invalid UTF-8 that a text column refuses (and a refused copy used to stop
-- the consumer for good).
ALTER TABLE outbox ALTER COLUMN message_key TYPE bytea USING convert_to(message_key, 'UTF8');

-- Rows the broker refused for good (too large, invalid): moved here by the relay, with the
-- broker's reason, so that the rows behind them go out and nothing is lost.
CREATE TABLE outbox_parked (
    id          bigint PRIMARY KEY,
    topic       text NOT NULL,
    message_key bytea,
    payload     bytea NOT NULL,
    headers     jsonb NOT NULL,
    created_at  timestamptz NOT NULL,
    error       text NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now()
);
