-- A trigger that repeats a saga's subject (a client's retry, a replayed topic) no longer
-- appends a history line each time: one line per saga notes the first repeat, and counts the
-- ones after it (`duplicates`, the last one's time and record in `last_duplicate_at` and
-- `last_duplicate_detail`). A million replays of one order made one saga's history, and every
-- watch snapshot of it, a million lines long.
ALTER TABLE saga_history
    ADD COLUMN duplicates bigint CHECK (duplicates > 0),
    ADD COLUMN last_duplicate_at timestamptz,
    ADD COLUMN last_duplicate_detail text;

-- The lines earlier releases wrote, one per repeat, folded into their saga's first one.
WITH repeats AS (
    SELECT id,
           row_number() OVER w AS n,
           count(*) OVER w AS seen,
           last_value(at) OVER w AS last_at,
           last_value(detail) OVER w AS last_detail
    FROM saga_history
    WHERE decision = 'ignored' AND message_id IS NULL AND detail LIKE 'duplicate %'
    WINDOW w AS (PARTITION BY saga_id ORDER BY id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
), counted AS (
    UPDATE saga_history h
    SET duplicates = r.seen, last_duplicate_at = r.last_at, last_duplicate_detail = r.last_detail
    FROM repeats r WHERE h.id = r.id AND r.n = 1
)
DELETE FROM saga_history h USING repeats r WHERE h.id = r.id AND r.n > 1;

-- At most one counting line per saga: the conflict arm of the note adds to it.
CREATE UNIQUE INDEX saga_history_duplicates ON saga_history (saga_id) WHERE duplicates IS NOT NULL;
