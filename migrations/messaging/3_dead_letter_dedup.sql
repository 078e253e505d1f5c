-- Records already dead-lettered, by where they came from. A record comes again when a crash
-- fell between the transaction that dead-lettered it and its offset commit; it must not be
-- copied to the dead-letter topic twice. Swept with the inbox (INBOX_RETENTION_SECS).
CREATE TABLE dead_lettered (
    source_topic     text NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
CREATE INDEX dead_lettered_at ON dead_lettered (dead_lettered_at);
