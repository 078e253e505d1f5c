-- What the status API filters on, and what retention deletes by.

-- The step the saga waits on (running, compensating) or is stuck at (failed); NULL otherwise.
ALTER TABLE sagas ADD COLUMN current_step text;
CREATE INDEX sagas_current_step ON sagas (current_step, created_at DESC, id)
    WHERE current_step IS NOT NULL;
-- Rates in /stats and the retention sweep read finished sagas by finish time.
CREATE INDEX sagas_finished_at ON sagas (finished_at) WHERE finished_at IS NOT NULL;

-- The W3C trace context of the order that started the saga, so that what the engine sends on
-- its own (re-sends after a deadline, operator actions) joins the order's trace.
ALTER TABLE sagas ADD COLUMN trace_parent text;
