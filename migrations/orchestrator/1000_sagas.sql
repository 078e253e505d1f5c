-- The orchestrator's own tables. No participant reads or writes them.

CREATE TABLE sagas (
    id                 uuid PRIMARY KEY,
    -- One saga per order: a second OrderPlaced for the same order finds this row.
    order_id           uuid NOT NULL UNIQUE,
    state              text NOT NULL
        CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'failed')),
    order_data         jsonb NOT NULL,
    steps              jsonb NOT NULL,
    failure_reason     text,
    definition_version integer NOT NULL,
    -- Optimistic concurrency: every update checks and bumps it.
    version            bigint NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    finished_at        timestamptz
);
CREATE INDEX sagas_created_at ON sagas (created_at DESC, id);
CREATE INDEX sagas_state_created_at ON sagas (state, created_at DESC, id);

-- Every message that reached a saga and what the engine decided about it, including the ones
-- it ignored (duplicates, stale attempts, replies out of order).
CREATE TABLE saga_history (
    id           bigserial PRIMARY KEY,
    saga_id      uuid NOT NULL REFERENCES sagas (id),
    at           timestamptz NOT NULL,
    message_id   uuid,
    message_type text NOT NULL,
    decision     text NOT NULL CHECK (decision IN ('started', 'applied', 'ignored')),
    detail       text,
    state_after  text NOT NULL
);
CREATE INDEX saga_history_saga ON saga_history (saga_id, id);
