-- Every order id that started a saga, kept after the saga itself is swept: "one order, one
-- saga" must hold for as long as the `orders` topic can replay a record (a client's retry, an
-- offset reset), not only while the saga row exists. Rows are small (two uuids and a time) and
-- are deleted ORDER_DEDUP_RETENTION_SECS after the order arrived.
CREATE TABLE order_dedup (
    order_id uuid PRIMARY KEY,
    saga_id  uuid NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_dedup_seen_at ON order_dedup (seen_at);
INSERT INTO order_dedup (order_id, saga_id, seen_at) SELECT order_id, id, created_at FROM sagas;
