-- Inventory: stock per SKU and the reservations held against it.
CREATE TABLE stock (
    sku       text PRIMARY KEY,
    available integer NOT NULL CHECK (available >= 0)
);

CREATE TABLE reservations (
    order_id    uuid PRIMARY KEY,
    saga_id     uuid NOT NULL,
    status      text NOT NULL CHECK (status IN ('reserved', 'released')),
    reserved_at timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz
);

CREATE TABLE reservation_lines (
    order_id uuid NOT NULL REFERENCES reservations (order_id),
    sku      text NOT NULL REFERENCES stock (sku),
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku)
);
