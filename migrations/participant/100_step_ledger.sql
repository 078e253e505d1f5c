-- What the participant runtime did for each (saga, step): the idempotency key of a step is the
-- pair, not the message id, so a command re-sent with a new attempt gets the first answer again.
-- `compensated_at` is also a tombstone: a forward command that arrives after its compensation
-- is refused instead of acting.
CREATE TABLE step_ledger (
    saga_id        uuid NOT NULL,
    step           text NOT NULL,
    -- 'succeeded' or 'refused'; NULL when only the compensation arrived.
    forward_outcome text CHECK (forward_outcome IN ('succeeded', 'refused')),
    refusal_reason text,
    compensated_at timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step)
);
