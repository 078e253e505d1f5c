-- How many sagas are in each state, kept with every change to `sagas`, so that /stats costs
-- the same at ten million sagas as at ten.
--
-- Statement-level triggers see a statement's changed rows as transition tables, so a
-- set-wise UPDATE of a hundred sagas adds one counting statement, not a hundred, and a
-- statement that moves no saga to another state writes nothing. Each connection adds to its
-- own shard of the counters (by backend pid), so concurrent transactions rarely wait on one
-- another's counter row; /stats sums the shards.
CREATE TABLE saga_state_counts (
    state text NOT NULL,
    shard smallint NOT NULL,
    sagas bigint NOT NULL,
    PRIMARY KEY (state, shard)
);

INSERT INTO saga_state_counts (state, shard, sagas)
SELECT state, 0, count(*) FROM sagas GROUP BY state;

CREATE FUNCTION count_saga_states() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    -- Each branch reads only the transition tables its event has. Rows are written in state
    -- order, so two transactions never lock the same two counters in opposite orders.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO saga_state_counts AS c (state, shard, sagas)
        SELECT state, pg_backend_pid() % 16, count(*) FROM new_rows GROUP BY state ORDER BY state
        ON CONFLICT (state, shard) DO UPDATE SET sagas = c.sagas + EXCLUDED.sagas;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO saga_state_counts AS c (state, shard, sagas)
        SELECT state, pg_backend_pid() % 16, sum(delta)
        FROM (SELECT state, 1 AS delta FROM new_rows
              UNION ALL
              SELECT state, -1 FROM old_rows) AS moved
        GROUP BY state HAVING sum(delta) <> 0 ORDER BY state
        ON CONFLICT (state, shard) DO UPDATE SET sagas = c.sagas + EXCLUDED.sagas;
    ELSE
        INSERT INTO saga_state_counts AS c (state, shard, sagas)
        SELECT state, pg_backend_pid() % 16, -count(*) FROM old_rows GROUP BY state ORDER BY state
        ON CONFLICT (state, shard) DO UPDATE SET sagas = c.sagas + EXCLUDED.sagas;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER sagas_counted_on_insert AFTER INSERT ON sagas
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_saga_states();
CREATE TRIGGER sagas_counted_on_update AFTER UPDATE ON sagas
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_saga_states();
CREATE TRIGGER sagas_counted_on_delete AFTER DELETE ON sagas
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_saga_states();
