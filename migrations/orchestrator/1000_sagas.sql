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
    finished_at        timestamptz,
    -- When the saga stops waiting for the reply to its last command; NULL when finished.
    -- Durable, so a restarted orchestrator re-sends what got no answer.
    deadline_at        timestamptz
);
CREATE INDEX sagas_created_at ON sagas (created_at DESC, id);
CREATE INDEX sagas_deadline_at ON sagas (deadline_at) WHERE deadline_at IS NOT NULL;
CREATE INDEX sagas_state_created_at ON sagas (state, created_at DESC, id);

-- Every message that reached a saga and what the engine decided about it, including the ones
-- it ignored (duplicates, stale attempts, replies out of order), every deadline that fired and
-- every operator action (with who and why).
CREATE TABLE saga_history (
    id           bigserial PRIMARY KEY,
    saga_id      uuid NOT NULL REFERENCES sagas (id),
    at           timestamptz NOT NULL,
    message_id   uuid,
    message_type text NOT NULL,
    decision     text NOT NULL
        CHECK (decision IN ('started', 'applied', 'ignored', 'deadline', 'operator')),
    detail       text,
    state_after  text NOT NULL
);
CREATE INDEX saga_history_saga ON saga_history (saga_id, id);
