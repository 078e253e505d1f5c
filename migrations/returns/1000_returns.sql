-- Returns: the returns this service received, and what came back in each. A return is
-- received once (the step ledger sees to that) and marked rejected when the return saga
-- undoes its receipt (the refund was refused).
CREATE TABLE returns (
    return_id    uuid PRIMARY KEY,
    saga_id      uuid NOT NULL,
    order_id     uuid NOT NULL,
    customer_id  text NOT NULL,
    refund_cents bigint NOT NULL CHECK (refund_cents > 0),
    currency     text NOT NULL,
    status       text NOT NULL CHECK (status IN ('received', 'rejected')),
    received_at  timestamptz NOT NULL DEFAULT now(),
    rejected_at  timestamptz
);

CREATE TABLE return_lines (
    return_id uuid NOT NULL REFERENCES returns (return_id),
    sku       text NOT NULL,
    quantity  integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (return_id, sku)
);
