-- The slow inventory of backlog.rs keeps no table of its own (the SDK makes its ledger).
SELECT 1;
