-- Demo data (documented in the README): alice and bob can pay, carol has 5.00 EUR.
INSERT INTO accounts (customer_id, balance_cents, currency) VALUES
    ('alice', 100000000, 'EUR'),
    ('bob', 100000000, 'EUR'),
    ('carol', 500, 'EUR');
