-- Shipping: scheduled shipments. The destination deny-list is configuration, not data.
CREATE TABLE shipments (
    order_id     uuid PRIMARY KEY,
    saga_id      uuid NOT NULL,
    country      text NOT NULL,
    city         text NOT NULL,
    line1        text NOT NULL,
    postal_code  text NOT NULL,
    items        jsonb NOT NULL,
    scheduled_at timestamptz NOT NULL DEFAULT now()
);
