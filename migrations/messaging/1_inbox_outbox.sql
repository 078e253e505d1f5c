-- The runtime tables every service has, in its own schema.

-- Inbox: ids of the messages this service has handled. A redelivered message finds its id
-- here and has no second effect. Rows are written in the same transaction as the effect;
-- `deliveries` counts how often the message arrived (all but the first were absorbed).
CREATE TABLE inbox (
    message_id  uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    deliveries  integer NOT NULL DEFAULT 1
);
CREATE INDEX inbox_received_at ON inbox (received_at);

-- Transactional outbox: messages to publish, written in the same transaction as the state
-- change that caused them. The relay publishes them in id order and deletes them only after
-- the broker acknowledged them.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    message_key text,
    payload    bytea NOT NULL,
    headers    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
