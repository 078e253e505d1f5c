-- Saga states and history decisions are PostgreSQL enum types instead of text with a CHECK, so
-- that the database refuses a misspelt state in any statement (a literal in a query, a
-- trigger, an index predicate) and the Rust enums map to them in one place: `SagaState` and
-- `HistoryDecision` derive `sqlx::Type` with these type names, and a test compares their
-- variants with `enum_range` of each type.
--
-- Like 1007, this is not a rolling upgrade: an orchestrator of the previous release binds
-- states as text, which PostgreSQL does not cast to an enum implicitly. Stop every instance,
-- migrate, start the new release.
CREATE TYPE saga_state AS ENUM ('running', 'compensating', 'completed', 'compensated', 'failed');
CREATE TYPE saga_decision AS ENUM ('started', 'applied', 'ignored', 'deadline', 'operator', 'parked');

ALTER TABLE sagas DROP CONSTRAINT sagas_state_check;
ALTER TABLE sagas ALTER COLUMN state TYPE saga_state USING state::saga_state;

-- Before this migration a trigger that repeated a saga's subject was noted with an empty
-- `state_after`. A duplicate moves nothing, so the state after it is the one of the saga's line
-- before it.
UPDATE saga_history h SET state_after = coalesce(
    (SELECT p.state_after FROM saga_history p
     WHERE p.saga_id = h.saga_id AND p.id < h.id AND p.state_after <> ''
     ORDER BY p.id DESC LIMIT 1),
    'running')
WHERE h.state_after = '';

ALTER TABLE saga_history DROP CONSTRAINT saga_history_decision_check;
ALTER TABLE saga_history
    ALTER COLUMN decision TYPE saga_decision USING decision::saga_decision,
    ALTER COLUMN state_after TYPE saga_state USING state_after::saga_state;

-- The counters of 1004 keep their rows; the trigger function copies `state` from the
-- transition tables, whose type now matches.
ALTER TABLE saga_state_counts ALTER COLUMN state TYPE saga_state USING state::saga_state;
