-- `GET /sagas?reason=...` finds sagas whose failure reason contains a text. A trigram index
-- answers that from the index at any table size instead of scanning every failed saga. It
-- covers only sagas with a reason, so the message path's updates of running sagas never
-- touch it.
--
-- pg_trgm ships with PostgreSQL (Debian's postgresql-15 package included) and is a trusted
-- extension: a database owner may create it. It exists once per database; when another
-- schema's orchestrator created it first, its operator class is named with that schema.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
DO $$
DECLARE
    extension_schema text;
BEGIN
    SELECT n.nspname INTO extension_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_trgm';
    EXECUTE format(
        'CREATE INDEX sagas_failure_reason_trigrams ON sagas '
        'USING gin (failure_reason %I.gin_trgm_ops) WHERE failure_reason IS NOT NULL',
        extension_schema);
END $$;
