-- The one way deliveries enter the inbox: records one delivery of each id of `delivered` (an
-- id may come more than once: a batch may hold a record and its redelivery) and returns each
-- distinct id with whether this call's deliveries are its first (`fresh`: no earlier call
-- counted it). A handler calls it inside its own first statement (the participants' ledger
-- claim), which saves the transaction a round trip; `messaging::inbox` calls it alone.
-- PL/pgSQL for its kept plan, resolved through the caller's `search_path`, like
-- `outbox_enqueue` (migration 7).
CREATE FUNCTION inbox_first_deliveries(delivered uuid[])
RETURNS TABLE (message_id uuid, fresh boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH batch AS (
        SELECT d.id, count(*)::int AS n FROM UNNEST(delivered) AS d(id) GROUP BY d.id
    ), counted AS (
        INSERT INTO inbox (message_id, deliveries) SELECT batch.id, batch.n FROM batch
        ON CONFLICT (message_id) DO UPDATE SET deliveries = inbox.deliveries + excluded.deliveries
        RETURNING inbox.message_id, inbox.deliveries
    )
    -- The count is the call's own share: no earlier call had the message.
    SELECT counted.message_id, counted.deliveries = batch.n
    FROM counted JOIN batch ON batch.id = counted.message_id;
END
$$;
