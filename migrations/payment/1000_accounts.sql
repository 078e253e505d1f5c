-- Payment: customer balances and the charges made against them.
CREATE TABLE accounts (
    customer_id   text PRIMARY KEY,
    balance_cents bigint NOT NULL CHECK (balance_cents >= 0),
    currency      text NOT NULL
);

CREATE TABLE payments (
    order_id     uuid PRIMARY KEY,
    saga_id      uuid NOT NULL,
    customer_id  text NOT NULL REFERENCES accounts (customer_id),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    currency     text NOT NULL,
    status       text NOT NULL CHECK (status IN ('charged', 'refunded')),
    charged_at   timestamptz NOT NULL DEFAULT now(),
    refunded_at  timestamptz
);
