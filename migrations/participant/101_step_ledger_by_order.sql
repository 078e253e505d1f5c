-- The step ledger is keyed by order, like the participants' own tables (reservations,
-- payments, shipments): one order is one saga, so a command of a second saga for the same
-- order (an order replayed after its saga was swept, say) is answered from the first one's
-- entry instead of acting again or undoing the first one's work. `saga_id` stays as the saga
-- that wrote the entry.
ALTER TABLE step_ledger ADD COLUMN order_id uuid;
-- Entries written before this migration do not know their order; the saga id stands in (it is
-- never an order id), so they stay as history but answer no new command. Let the sagas in
-- flight finish before upgrading.
UPDATE step_ledger SET order_id = saga_id;
ALTER TABLE step_ledger ALTER COLUMN order_id SET NOT NULL;
ALTER TABLE step_ledger DROP CONSTRAINT step_ledger_pkey;
ALTER TABLE step_ledger ADD PRIMARY KEY (order_id, step);
