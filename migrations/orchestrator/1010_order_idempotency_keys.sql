-- `POST /orders` with an `Idempotency-Key`: the order id the key stands for, reserved before the
-- order is published, so that a client's retry (after a 503, a timeout, a lost answer) publishes
-- the same order again, which the orchestrator dedups by its id, instead of a second order.
-- Keys are per caller (the token's name). Rows are deleted IDEMPOTENCY_KEY_RETENTION_SECS after
-- they were made.
CREATE TABLE order_idempotency_keys (
    caller          text        NOT NULL,
    idempotency_key text        NOT NULL,
    -- SHA-256 of the request as parsed: the same key with another body is refused (422).
    request_hash    bytea       NOT NULL,
    order_id        uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- While a request with this key publishes, no other may: until this time (a request cut
    -- short, by a crash or a timeout, gives its key back when it passes).
    locked_until    timestamptz,
    -- The final answer (202), given again to every retry; NULL until there is one.
    response_status smallint,
    response_body   jsonb,
    PRIMARY KEY (caller, idempotency_key)
);
CREATE INDEX order_idempotency_keys_created_at ON order_idempotency_keys (created_at);
