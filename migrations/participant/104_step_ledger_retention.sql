-- Ledger entries are swept STEP_LEDGER_RETENTION_SECS after anything last touched them (every
-- command for the step does, a repeated one too), oldest first, in batches. The sweep walks
-- the entries by when they were made, an index on a column no update changes: an index on
-- `updated_at`, which every command and every outcome changes, would make each of those
-- updates write every index of the table anew instead of a HOT update. Entries that exist
-- already count as made now.
ALTER TABLE step_ledger ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX step_ledger_created_at ON step_ledger (created_at);
