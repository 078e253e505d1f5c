-- The return saga's `refund` step: money credited back to the customer for a return, out of
-- what the order was charged. The refunds of one order never add up to more than its charge
-- (the step refuses), and an order saga compensated after a return was refunded refunds only
-- what is left of the charge.
CREATE TABLE return_refunds (
    return_id    uuid PRIMARY KEY,
    saga_id      uuid NOT NULL,
    order_id     uuid NOT NULL REFERENCES payments (order_id),
    customer_id  text NOT NULL REFERENCES accounts (customer_id),
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    currency     text NOT NULL,
    refunded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX return_refunds_order ON return_refunds (order_id);
