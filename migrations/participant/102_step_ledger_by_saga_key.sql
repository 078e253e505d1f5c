-- Commands are generic (schema version 2): each carries the saga's key (the trigger message's
-- value at the definition's `trigger.key`, as text) and its step, so the ledger is keyed by
-- them. For the order saga the key is the order id, as before, so the existing rows keep
-- answering: their order id as text is the key the order saga's commands carry.
ALTER TABLE step_ledger ADD COLUMN saga_key text;
UPDATE step_ledger SET saga_key = order_id::text;
ALTER TABLE step_ledger ALTER COLUMN saga_key SET NOT NULL;
ALTER TABLE step_ledger DROP CONSTRAINT step_ledger_pkey;
ALTER TABLE step_ledger ADD PRIMARY KEY (saga_key, step);
ALTER TABLE step_ledger DROP COLUMN order_id;
