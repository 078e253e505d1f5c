-- Saga definitions as data (sagas/*.toml). Every version the orchestrator has deployed is kept
-- here in its canonical form, so that a saga runs to its end on the version it started with
-- even after the file changed or was removed. One version has one content: a file that
-- changes a stored version without raising it is refused at start-up (the digest differs).
CREATE TABLE saga_definitions (
    name text NOT NULL,
    version integer NOT NULL CHECK (version >= 1),
    digest text NOT NULL,
    canonical text NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Which saga type each saga is. Every saga before this migration is an order saga; the
-- default also serves an orchestrator of the previous release still writing during a rolling
-- upgrade.
ALTER TABLE sagas ADD COLUMN definition_name text NOT NULL DEFAULT 'order';
