-- More than one saga type (issue 13): a saga is identified by its type and its key (the
-- trigger message's value at the definition's trigger.key, as text), no longer by an order id.
-- `order_data` keeps its name but now holds any trigger message as JSON (an order saga's is
-- the OrderPlaced it always held).

ALTER TABLE sagas ADD COLUMN saga_key text;
UPDATE sagas SET saga_key = order_id::text;
ALTER TABLE sagas ALTER COLUMN saga_key SET NOT NULL;
-- One saga per saga type and key: a second trigger for the same subject finds this row.
CREATE UNIQUE INDEX sagas_type_key ON sagas (definition_name, saga_key);
-- An order saga is found by (definition_name, saga_key) now; a return saga has no order id of
-- its own. (An orchestrator of the previous release, which writes order_id and order_dedup,
-- cannot run beside this one: upgrade all instances together.)
ALTER TABLE sagas DROP COLUMN order_id;

-- The dedup that outlives the saga row ("a replayed trigger never starts a second saga, even
-- after retention swept the first"), per saga type and key instead of per order id.
ALTER TABLE order_dedup RENAME TO saga_dedup;
ALTER TABLE saga_dedup ADD COLUMN saga_type text NOT NULL DEFAULT 'order';
ALTER TABLE saga_dedup ALTER COLUMN saga_type DROP DEFAULT;
ALTER TABLE saga_dedup ADD COLUMN saga_key text;
UPDATE saga_dedup SET saga_key = order_id::text;
ALTER TABLE saga_dedup ALTER COLUMN saga_key SET NOT NULL;
ALTER TABLE saga_dedup DROP CONSTRAINT order_dedup_pkey;
ALTER TABLE saga_dedup DROP COLUMN order_id;
ALTER TABLE saga_dedup ADD PRIMARY KEY (saga_type, saga_key);
ALTER INDEX order_dedup_seen_at RENAME TO saga_dedup_seen_at;
