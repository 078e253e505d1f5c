-- Ledger entries are swept STEP_LEDGER_RETENTION_SECS after anything last touched them (every
-- command for the step does, a repeated one too), oldest first, in batches.
CREATE INDEX step_ledger_updated_at ON step_ledger (updated_at);
