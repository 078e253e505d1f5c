-- The one way rows enter the outbox. A handler writes its messages in the same statement as
-- its own last write (a data-modifying statement that also calls this function), which saves
-- the transaction a round trip to the database per hop; the consume loop and the other writers
-- call it alone. One definition, so every writer keeps the queue's order in the ids (the
-- publishing order) and stamps the clock time: the relay's `outbox_pickup_seconds` counts from
-- the last statement before the commit, not from the transaction's start (inside a handler's
-- statement, from before that statement's other writes end: those count as pickup too).
--
-- PL/pgSQL, not SQL: PostgreSQL 15 plans an SQL function's body at every call, where PL/pgSQL
-- keeps the plan for the session. The names resolve through the caller's `search_path`, so
-- each service's schema holds its own copy, writing its own outbox.
--
-- `notify_channel`: when set and a row was written, `NOTIFY` that channel with the schema's
-- name at commit (writers outside the consume loop wake every relay of the schema).
CREATE FUNCTION outbox_enqueue(
    queued_topics text[],
    queued_keys bytea[],
    queued_payloads bytea[],
    queued_headers jsonb[],
    notify_channel text
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    written integer;
BEGIN
    INSERT INTO outbox (topic, message_key, payload, headers, created_at)
    SELECT m.topic, m.message_key, m.payload, m.headers, clock_timestamp()
    FROM UNNEST(queued_topics, queued_keys, queued_payloads, queued_headers)
         WITH ORDINALITY AS m(topic, message_key, payload, headers, n)
    ORDER BY m.n;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 AND notify_channel IS NOT NULL THEN
        PERFORM pg_notify(notify_channel, current_schema());
    END IF;
    RETURN written;
END
$$;
