-- The return saga's `restock` step: returned items put back in stock, per return, so that the
-- restock can be undone (taken out again) when the refund is refused.
CREATE TABLE restocks (
    return_id   uuid PRIMARY KEY,
    saga_id     uuid NOT NULL,
    status      text NOT NULL CHECK (status IN ('restocked', 'undone')),
    restocked_at timestamptz NOT NULL DEFAULT now(),
    undone_at   timestamptz
);

CREATE TABLE restock_lines (
    return_id uuid NOT NULL REFERENCES restocks (return_id),
    sku       text NOT NULL REFERENCES stock (sku),
    quantity  integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (return_id, sku)
);
