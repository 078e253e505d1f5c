-- A step's remembered forward outcome is an enum type instead of text with a CHECK: the
-- participant runtime's `LedgerOutcome` derives `sqlx::Type` with this name, and a test
-- compares its variants with `enum_range`. NULL still means that only the compensation
-- arrived.
CREATE TYPE ledger_outcome AS ENUM ('succeeded', 'refused');
ALTER TABLE step_ledger DROP CONSTRAINT step_ledger_forward_outcome_check;
ALTER TABLE step_ledger
    ALTER COLUMN forward_outcome TYPE ledger_outcome USING forward_outcome::ledger_outcome;
